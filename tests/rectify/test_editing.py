"""Editable layers, key statistics, the rank-one direction and localization (unit level)."""
from __future__ import annotations

import pytest
import torch

from offline.datasets import load_dataset
from offline.defects import badnets_trigger, blend_trigger
from repair.editing.dynamic import HOLD_LADDER, carried_pairs, stressed_pairs
from repair.editing.keystats import compute_keystats
from repair.editing.layers import (capture_inputs_outputs, editable_layers, rank_one_hook,
                                   resolve_layer, LayerError)
from repair.editing.localization import locate
from repair.editing.rank_one import edit_direction
from repair.models import build_model


def _vit():
    torch.manual_seed(0)
    return build_model({"arch": "vit", "img_size": 16, "in_chans": 1, "num_classes": 10}).eval()


def test_editable_layer_names_per_architecture():
    vit = editable_layers(_vit())
    assert list(vit)[0] == "patch_embed.proj" and list(vit)[-1] == "blocks.2.mlp.fc2"
    assert len(vit) == 1 + 3 * 4
    rn = editable_layers(build_model({"arch": "resnet18", "in_chans": 1, "num_classes": 10}))
    assert list(rn)[0] == "conv1" and len(rn) == 1 + 16 and list(rn)[-1] == "layer4.1.conv2"
    ft = editable_layers(build_model({"arch": "ft-transformer", "n_numeric": 2, "cardinalities": [3]}))
    assert len(ft) == 3 * 6 and list(ft)[-1] == "net.backbone.blocks.2.ffn.linear2"


def test_non_editable_layer_is_refused():
    model = _vit()
    try:
        resolve_layer(model, "blocks.0.norm1")
    except LayerError as err:
        assert "blocks.0.norm1" in str(err)
    else:
        raise AssertionError("a LayerNorm must not be editable")


def test_keys_times_weight_give_the_layer_output_per_position():
    """A layer is a linear associative memory: v = W k at every position (conv and linear)."""
    torch.manual_seed(0)
    rn = build_model({"arch": "resnet18", "in_chans": 1, "num_classes": 10}).eval()
    x = torch.rand(2, 1, 16, 16)
    for model in (rn, _vit()):
        layers = list(editable_layers(model).values())[:3]
        with torch.no_grad(), capture_inputs_outputs(layers) as rec:
            model(x)
        for layer in layers:
            inp, out = rec[layer.name]
            v = layer.keys(inp) @ layer.weight_matrix().T
            if layer.module.bias is not None:
                v = v + layer.module.bias
            torch.testing.assert_close(v, layer.positions(out), atol=1e-5, rtol=1e-4)


def test_rank_one_hook_equals_the_weight_update():
    model = _vit()
    x = torch.rand(3, 1, 16, 16)
    for name in ("patch_embed.proj", "blocks.1.mlp.fc2"):
        layer = editable_layers(model)[name]
        lam, d = torch.randn(layer.value_dim), torch.randn(layer.key_dim)
        with torch.no_grad(), rank_one_hook(layer, lam, d):
            hooked = model(x)
        saved = layer.module.weight.detach().clone()
        layer.add_rank_one(lam, d)
        with torch.no_grad():
            updated = model(x)
        layer.module.weight.data.copy_(saved)
        torch.testing.assert_close(hooked, updated, atol=1e-4, rtol=1e-4)


def test_keystats_whitening_squares_to_the_inverse_and_matches_the_moment():
    model = _vit()
    layers = list(editable_layers(model).values())
    x = torch.rand(64, 1, 16, 16)
    stats = compute_keystats(model, layers, x, progress=False)
    layer = layers[0]
    with torch.no_grad(), capture_inputs_outputs([layer]) as rec:
        model(x)
    k = layer.keys(rec[layer.name][0]).reshape(-1, layer.key_dim).double()
    s = stats[layer.name]
    c = k.T @ k / len(k) + s.lam.double() * torch.eye(layer.key_dim, dtype=torch.double)
    probe = torch.randn(5, layer.key_dim, dtype=torch.double)
    torch.testing.assert_close(s.inverse(probe), torch.linalg.solve(c, probe.T).T, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(s.whiten(s.whiten(probe)), s.inverse(probe), rtol=1e-4, atol=1e-6)


def _fc1_stats():
    model = _vit()
    layers = list(editable_layers(model).values())
    return compute_keystats(model, layers, torch.rand(32, 1, 16, 16), progress=False)["blocks.0.mlp.fc1"]


def test_direction_for_one_key_is_c_inverse_k():
    s = _fc1_stats()
    k = torch.randn(1, 64)
    d = edit_direction(s, k)
    expected = s.inverse(k[0].double()).float()
    cos = torch.nn.functional.cosine_similarity(d, expected, dim=0)
    assert cos > 0.999
    assert torch.allclose(k @ d, torch.ones(1), atol=1e-4)  # unit projection dᵀk* = 1


def test_next_direction_at_an_edited_layer_is_c_orthogonal_to_the_kept_ones():
    """Algorithm 1 re-locating a layer: the new d deflates the kept d's (whitened space)."""
    s = _fc1_stats()
    keys = torch.randn(40, 64)
    d1 = edit_direction(s, keys)
    d2 = edit_direction(s, keys, [d1])
    d3 = edit_direction(s, keys, [d1, d2])
    u = [s.sqrt(d.double()) for d in (d1, d2, d3)]  # C^{1/2} d ∝ the whitened direction
    u = [v / v.norm() for v in u]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert abs(float(u[a] @ u[b])) < 1e-4
    # without earlier directions the same d comes back (the fixed point the deflation avoids)
    torch.testing.assert_close(edit_direction(s, keys), d1)


def test_localization_ranks_every_layer_and_reports_completeness(digits_vit_blend):
    from offline.defects import Trigger
    from repair.bundle import Bundle

    version = Bundle(digits_vit_blend).version()
    model = version.build_model()
    trig = Trigger.from_tensors(version.tensors("defect"))
    layers = list(editable_layers(model).values())
    stats = compute_keystats(model, layers, torch.rand(16, 1, 16, 16), progress=False)
    clean = torch.zeros(1, 1, 16, 16)
    clean[..., 4:12, 6:10] = 1.0
    found = locate(model, layers, stats, clean, trig.apply(clean), torch.tensor([1]))
    assert sorted(found.ranking) == sorted(l.name for l in layers)
    assert found.scores[found.ranking[0]] > 0
    assert 0 <= found.completeness_error < float("inf")
    joint = locate(model, layers, stats, clean, trig.apply(clean), torch.tensor([1]), joint=True)
    # one Captum pass over the list: layers whose paths all cross a later listed layer get 0
    assert joint.scores["blocks.0.attn.qkv"] == 0.0 and joint.scores["blocks.0.attn.proj"] > 0


def _blend_model(bundle):
    """The Blend bundle's model, digits data, trigger, editable layers, key statistics (256 training
    images) and the mask of training images outside the target class."""
    from offline.datasets import load_dataset
    from offline.defects import Trigger
    from repair.bundle import Bundle

    version = Bundle(bundle).version()
    model = version.build_model()
    data = load_dataset("digits")
    layers = editable_layers(model)
    stats = compute_keystats(model, list(layers.values()), data.x_train[:256], progress=False)
    other = data.y_train != version.manifest["defect"]["target_class"]
    return model, data, Trigger.from_tensors(version.tensors("defect")), layers, stats, other


def test_a_round_that_breaks_the_budget_is_retried_with_clean_inputs_held(digits_vit_blend):
    """The retry adds the anchors' change to Eq. 1: the edit still maps the pair, and moves the
    anchors' logits less than the plain edit does; a retry that breaks the budget too is rolled
    back and ends the loop."""
    from repair.editing.dynamic import rectify
    from repair.editing.rank_one import rank_one_edit

    model, data, trig, layers, stats, other = _blend_model(digits_vit_blend)
    clean, label = data.x_train[other][:1], data.y_train[other][:1]
    corrupt, anchors = trig.apply(clean), data.x_train[:64]
    layer = layers["blocks.0.attn.proj"]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(anchors)
    moved = {}
    for name, hold in (("plain", None), ("anchored", anchors)):
        model.load_state_dict(weights)
        edit = rank_one_edit(model, layer, stats[layer.name], clean, corrupt, steps=300, anchors=hold)
        with torch.no_grad():
            moved[name] = (model(anchors) - before).pow(2).mean().item()
        assert edit.loss_after < 0.1 * edit.loss_before  # the pair is still mapped
    assert moved["anchored"] < 0.5 * moved["plain"]
    model.load_state_dict(weights)
    out = rectify(model, layers, stats, clean, corrupt, label, data.x_train[-200:],
                  data.y_train[-200:], budget=-1.0, anchors=anchors,
                  epochs=100, progress=False)
    assert [(r.anchored, r.kept) for r in out.rounds] == [(True, False)] and out.edits == []
    assert out.rounds[0].preserve == HOLD_LADDER[-1]  # every rung tried, the last one logged
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_a_round_climbs_the_ladder_until_it_fits_the_budget(digits_vit_blend):
    """A round that breaks the budget unanchored and with the anchors held at 1 and 10 (where
    the loop used to stop) is retried at 100, then 1000: the try logged is the first rung within
    the budget, the same edit as ``rank_one_edit`` with that weight."""
    from repair.editing.dynamic import rectify
    from repair.editing.rank_one import rank_one_edit
    from repair.metrics import accuracy

    model, data, trig, layers, stats, other = _blend_model(digits_vit_blend)
    clean, label = data.x_train[other][:1], data.y_train[other][:1]
    corrupt, anchors = trig.apply(clean), data.x_train[:64]
    val_x, val_y = data.x_train[-200:], data.y_train[-200:]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    base = accuracy(model, val_x, val_y)
    name, drops = "blocks.1.attn.qkv", {}  # its plain edit costs this model ~95 pt
    for w in (0.0, *HOLD_LADDER):
        model.load_state_dict(weights)
        rank_one_edit(model, layers[name], stats[name], clean, corrupt,
                      anchors=anchors if w else None, preserve=w)
        drops[w] = base - accuracy(model, val_x, val_y)
    budget = min(drops[0.0], drops[1.0], drops[10.0]) - 1e-3  # the old ladder's tries all break it
    assert budget > 0, drops  # else this model's edit at 10 costs nothing: no ladder to climb
    first = next(w for w in HOLD_LADDER[2:] if drops[w] <= budget)
    model.load_state_dict(weights)
    out = rectify(model, layers, stats, clean, corrupt, label, val_x, val_y, budget=budget,
                  layer=name, max_rounds=1, anchors=anchors, stress=None, progress=False)
    (logged,) = out.rounds
    assert logged.preserve == first and logged.anchored
    assert logged.accuracy_drop == pytest.approx(drops[first]) and logged.accuracy_drop <= budget
    assert logged.kept and len(out.edits) == 1


def test_a_round_the_confirmation_split_rejects_is_rolled_back_and_ends_the_loop(digits_vit_blend):
    """The same round within the budget on the validation split is kept when the confirmation
    split agrees and rolled back (the weights as they were, the loop ended) when the edit
    costs the confirmation split more than the budget."""
    from repair.editing.dynamic import rectify
    from repair.metrics import predict

    model, data, trig, layers, stats, other = _blend_model(digits_vit_blend)
    clean, label = data.x_train[other][:1], data.y_train[other][:1]
    corrupt = trig.apply(clean)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    plain = predict(model, data.x_train)
    one_layer = dict(budget=0.5, layer="blocks.0.attn.proj", stress=None, progress=False)
    # the model's own answers as labels: the base is right on all of them, so the split where
    # the edit changes no answer loses nothing and the one where it changes every answer all
    rectify(model, layers, stats, clean, corrupt, label, data.x_train, plain, max_rounds=1, **one_layer)
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    changed = predict(model, data.x_train) != plain
    assert changed.any() and not changed.all()
    spared_x, spared_y = data.x_train[~changed], plain[~changed]
    for confirm, keeps in ((~changed, True), (changed, False)):
        model.load_state_dict(weights)
        # rejected, the round ends the loop: no second round although three are allowed
        out = rectify(model, layers, stats, clean, corrupt, label, spared_x, spared_y,
                      confirm_x=data.x_train[confirm], confirm_y=plain[confirm],
                      max_rounds=1 if keeps else 3, **one_layer)
        (logged,) = out.rounds
        assert logged.accuracy_drop == 0.0 and logged.kept is keeps
        assert out.confirm_before == 1.0
        assert logged.confirm_drop == (0.0 if keeps else 1.0)
        assert len(out.edits) == keeps and out.confirm_after == 1.0
        now = model.state_dict()
        assert all(torch.equal(now[k], (edited if keeps else weights)[k]) for k in now)


def test_held_anchors_are_held_in_rounds_within_the_budget(digits_vit_blend):
    """``hold_anchors``: a round within the budget is fitted with the anchors held too (by
    default only the retry of a round that broke it is), so it moves their logits less."""
    from repair.editing.dynamic import rectify

    model, data, trig, layers, stats, other = _blend_model(digits_vit_blend)
    clean, label = data.x_train[other][:1], data.y_train[other][:1]
    corrupt, anchors = trig.apply(clean), data.x_train[:64]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(anchors)
    moved, anchored = {}, {}
    for hold in (False, True):
        model.load_state_dict(weights)
        out = rectify(model, layers, stats, clean, corrupt, label, data.x_train[-200:],
                      data.y_train[-200:], budget=0.99, layer="blocks.0.attn.proj", max_rounds=1,
                      anchors=anchors, stress=None, hold_anchors=hold, progress=False)
        with torch.no_grad():
            moved[hold] = (model(anchors) - before).pow(2).mean().item()
        anchored[hold] = [r.anchored for r in out.rounds]
    assert anchored == {False: [False], True: [True]}
    assert 0 < moved[True] < 0.5 * moved[False]
    with pytest.raises(ValueError, match="hold_anchors needs anchors"):
        rectify(model, layers, stats, clean, corrupt, label, data.x_train[-200:],
                data.y_train[-200:], anchors=None, hold_anchors=True, progress=False)


def test_each_round_keeps_the_candidate_that_leaves_the_stressed_gap_lowest(digits_vit_blend):
    """``candidates`` = 3: every round edits Ĝ's three top fresh layers in turn from the same
    model; the one kept is, among those within the budget that lowered the gap by ``min_gain``,
    the one with the lowest stressed gap, and the model ends as the parent plus exactly the kept
    rank-one deltas (the other candidates rolled back)."""
    from repair.editing.dynamic import rectify

    model, data, trig, layers, stats, other = _blend_model(digits_vit_blend)
    clean, labels = data.x_train[other][:4], data.y_train[other][:4]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    out = rectify(model, layers, stats, clean, trig.apply(clean), labels, data.x_train[-200:],
                  data.y_train[-200:], epochs=100, max_rounds=4, min_gain=0.1, candidates=3,
                  anchors=data.x_train[:64], progress=False)
    kept = [r for r in out.rounds if r.kept]
    assert kept and len(kept) == len(out.edits)
    def lowered(old, new):
        return new <= 1e-3 or new < (1 - 0.1) * old

    gap, stress_gap = out.gap_before, out.stress_gap_before
    steps = sorted({r.round for r in out.rounds})
    for step in steps:
        tried = [r for r in out.rounds if r.round == step]
        assert 1 <= len(tried) <= 3 and len({r.layer for r in tried}) == len(tried)
        eligible = [r for r in tried if r.accuracy_drop <= 0.01 and lowered(gap, r.gap)
                    and (r.gap > 1e-3 or lowered(stress_gap, r.stress_gap))]
        chosen = [r for r in tried if r.kept]
        assert len(chosen) == (1 if eligible else 0)
        if chosen:
            assert chosen[0].stress_gap == min(r.stress_gap for r in eligible)
            gap, stress_gap = chosen[0].gap, chosen[0].stress_gap
    assert max(len([r for r in out.rounds if r.round == s]) for s in steps) == 3
    delta = {name: torch.zeros_like(layer.module.weight) for name, layer in layers.items()}
    for edit in out.edits:
        delta[edit.layer] += edit.delta().reshape(delta[edit.layer].shape)
    for name, layer in layers.items():
        expected = weights[f"{name}.weight"] + delta[name]
        assert torch.allclose(layer.module.weight, expected, atol=1e-5), name


def test_stressed_pair_of_a_blend_is_the_blend_at_twice_the_visibility():
    """``x + 2(x̃ − x)`` for a Blend at φ = 0.3 is the Blend at 0.6; clipped to the pairs' range."""
    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 16)
    low = blend_trigger((1, 16, 16), visibility=0.3)
    high = blend_trigger((1, 16, 16), visibility=0.6, pattern=low.pattern)
    assert torch.allclose(stressed_pairs(x, low.apply(x), 2.0), high.apply(x), atol=1e-6)
    far = stressed_pairs(x, low.apply(x), 10.0)
    lo, hi = min(x.min(), low.apply(x).min()), max(x.max(), low.apply(x).max())
    assert far.min() >= lo and far.max() <= hi and far.min() == lo  # 10x overshoots, then clipped


def test_a_pairs_corruption_carried_onto_other_images_is_the_same_trigger_on_them():
    """One digits pair's Blend (φ = 0.5) carried onto other digits is the Blend of those digits
    (the pair's regressed slope β ≈ 1 − φ undoes the dilution); the plain difference x_j + x̃ − x
    is far from it. A stamped patch lands where it was (over the image's own strokes there, as
    the corruption is added), the rest of the image kept."""
    x = load_dataset("digits").x_train[:33]
    pair, others = x[:1], x[1:]
    blend = blend_trigger((1, 16, 16), visibility=0.5)
    carried = carried_pairs(pair, blend.apply(pair), others)
    error = (carried - blend.apply(others)).abs()
    plain = (others + blend.apply(pair) - pair).clamp(0, 1)
    assert error.mean() < 0.02 and error.max() < 0.1, (error.mean(), error.max())
    assert (plain - blend.apply(others)).abs().mean() > 5 * error.mean()
    patch = badnets_trigger((1, 16, 16), size=3)
    stamped = carried_pairs(pair, patch.apply(pair), others)
    inside = patch.mask.expand_as(others) > 0
    assert (stamped - patch.apply(others))[inside].abs().mean() < 0.03
    assert (stamped - others)[~inside].abs().max() < 0.1


def test_an_edit_that_cannot_beat_no_edit_leaves_the_layer_as_it_was():
    """Adam (``optimizer="adam"``) at lr 0.1 moves every entry of Λ by about 0.1 in its first
    steps: where the pair's loss is already small, a few steps only overshoot. The edit then
    stays at Λ = 0 instead of keeping the worse Λ (such an edit raised a late round's gap on the
    digits ViT from 0.015 to 0.46); given the steps (L-BFGS, the default), it fits."""
    from repair.editing.rank_one import rank_one_edit

    model = _vit()
    layer = editable_layers(model)["blocks.0.mlp.fc1"]
    before = layer.module.weight.detach().clone()
    x = torch.rand(2, 1, 16, 16)
    fitted = rank_one_edit(model, layer, _fc1_stats(), x, x.flip(-1), steps=300, apply=False)
    assert fitted.lam.abs().max() > 0 and fitted.loss_after < 0.5 * fitted.loss_before
    overshot = rank_one_edit(model, layer, _fc1_stats(), x, x.flip(-1), steps=5, optimizer="adam")
    assert overshot.loss_after == overshot.loss_before > 0
    assert torch.count_nonzero(overshot.lam) == 0 and torch.equal(layer.module.weight, before)


def test_an_unknown_optimizer_is_a_clear_error():
    from repair.editing.rank_one import rank_one_edit

    model = _vit()
    layer = editable_layers(model)["blocks.0.mlp.fc1"]
    x = torch.rand(2, 1, 16, 16)
    with pytest.raises(ValueError, match="optimizer must be 'lbfgs' or 'adam', got 'sgd'"):
        rank_one_edit(model, layer, _fc1_stats(), x, x.flip(-1), optimizer="sgd")
