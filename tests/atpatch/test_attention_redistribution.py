"""Attention access per architecture and the hot patch Γ (Eq. 11) on synthetic maps."""
from __future__ import annotations

import pytest
import torch

from repair.atpatch.redistribution import redistribute
from repair.attention import AttentionAccess, NoAttentionError, attention_maps
from repair.models import build_model

ARCHS = {
    "vit": ({"arch": "vit"}, lambda: torch.rand(3, 1, 16, 16)),
    "hf-vit": ({"arch": "hf-vit"}, lambda: torch.rand(3, 1, 16, 16)),
    "ft-transformer": ({"arch": "ft-transformer", "n_numeric": 3, "cardinalities": [2, 5]},
                       lambda: torch.cat([torch.randn(3, 3), torch.tensor([[0., 1.], [1., 4.], [0., 2.]])], 1)),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_capture_only_leaves_logits_bitwise_identical(name):
    torch.manual_seed(0)
    spec, make_x = ARCHS[name]
    model, x = build_model(spec).eval(), make_x()
    access = AttentionAccess.for_model(model)
    seen = []
    access.install(lambda layer, attn: seen.append((layer, attn.shape)))
    with torch.no_grad():
        hooked = model(x)
    access.remove()
    # the reference is the same eager computation without any hook
    access.install(lambda layer, attn: None)
    with torch.no_grad():
        plain = model(x)
    access.remove()
    assert torch.equal(hooked, plain)
    assert [l for l, _ in seen] == list(range(access.n_layers))
    n = access.seq_len
    assert seen[0][1] == (3, access.num_heads, n, n)


def test_ft_transformer_last_layer_attends_from_cls_only():
    spec, make_x = ARCHS["ft-transformer"]
    model = build_model(spec).eval()
    maps = attention_maps(model, make_x())
    assert [tuple(m.shape[1:]) for m in maps] == [(6, 6), (6, 6), (1, 6)]
    assert torch.allclose(maps[-1].sum(-1), torch.ones(3, 1))


@pytest.mark.parametrize("name", ["vit", "ft-transformer", "hf-vit"])
def test_replacement_changes_the_forward(name):
    spec, make_x = ARCHS[name]
    torch.manual_seed(0)
    model, x = build_model(spec).eval(), make_x()
    access = AttentionAccess.for_model(model)
    access.install(lambda l, a: None)
    with torch.no_grad():
        before = model(x)
    access.install(lambda l, a: torch.full_like(a, 1.0 / a.shape[-1]))
    with torch.no_grad():
        after = model(x)
    access.remove()
    assert not torch.allclose(before, after)


def test_hooking_one_layer_of_a_timm_vit_all_eager():
    """Installed on layer 0 only with ``all_eager``, the model is the eager model plus the hook,
    bit for bit; ``remove`` gives every layer its fused attention back. Without it only the hooked
    layer is eager."""
    torch.manual_seed(0)
    model, eager = build_model({"arch": "vit"}).eval(), build_model({"arch": "vit"}).eval()
    eager.load_state_dict(model.state_dict())
    for attn in AttentionAccess.for_model(eager).modules:
        attn.fused_attn = False
    access = AttentionAccess.for_model(model)
    assert all(attn.fused_attn for attn in access.modules)
    x = torch.rand(3, 1, 16, 16)
    access.install(lambda layer, attn: None, layers=[0])
    assert [attn.fused_attn for attn in access.modules] == [False] + [True] * (access.n_layers - 1)
    access.install(lambda layer, attn: None, layers=[0], all_eager=True)
    assert not any(attn.fused_attn for attn in access.modules)
    with torch.no_grad():
        assert torch.equal(model(x), eager(x))
    access.remove()
    assert all(attn.fused_attn for attn in access.modules)


def test_model_without_attention_is_refused():
    with pytest.raises(NoAttentionError, match="resnet18"):
        AttentionAccess.for_model(build_model({"arch": "resnet18"}))


def _maps(b=4, h=3, nq=5, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, nq, n, generator=g).softmax(-1)


def test_gamma_replaces_many_columns_and_rows_sum_to_one():
    a = _maps()
    q = torch.rand(5, 6).softmax(-1) * 0.5
    flags = torch.zeros(4, 6, dtype=torch.bool)
    flags[0, [1, 4]] = True
    flags[2, 0] = True
    out = redistribute(a, flags, q)
    assert torch.allclose(out.sum(-1), torch.ones(4, 3, 5), atol=1e-5)
    assert torch.equal(out[0][:, :, [1, 4]], q[:, [1, 4]].expand(3, 5, 2))
    # unflagged columns are rescaled proportionally (Eq. 11's first term)
    ratio = out[0][:, :, [0, 2, 3, 5]] / a[0][:, :, [0, 2, 3, 5]]
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), atol=1e-6)
    # samples with nothing flagged are bit-for-bit the input
    assert torch.equal(out[1], a[1]) and torch.equal(out[3], a[3])


def test_masked_variant_zeroes_columns_and_renormalises():
    a = _maps()
    flags = torch.zeros(4, 6, dtype=torch.bool)
    flags[:, 2] = True
    out = redistribute(a, flags, None)
    assert torch.equal(out[..., 2], torch.zeros(4, 3, 5))
    assert torch.allclose(out.sum(-1), torch.ones(4, 3, 5), atol=1e-5)


def test_without_rescaling_only_overwrites():
    a = _maps()
    q = torch.full((5, 6), 0.01)
    flags = torch.zeros(4, 6, dtype=torch.bool)
    flags[:, 3] = True
    out = redistribute(a, flags, q, rescale=False)
    keep = [0, 1, 2, 4, 5]
    assert torch.equal(out[..., keep], a[..., keep])
    assert torch.allclose(out[..., 3], torch.full((4, 3, 5), 0.01))


def test_degenerate_row_all_mass_on_the_flagged_column():
    a = torch.zeros(1, 1, 2, 4)
    a[..., 1] = 1.0
    q = torch.full((2, 4), 0.25)
    flags = torch.tensor([[False, True, False, False]])
    out = redistribute(a, flags, q)
    assert torch.allclose(out.sum(-1), torch.ones(1, 1, 2), atol=1e-6)
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.25, 0.25, 0.25, 0.25]))
