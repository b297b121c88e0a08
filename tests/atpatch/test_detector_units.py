"""Detector pieces on synthetic data: strict metrics (§4.2.2), training (Eq. 7-8), MAD (NC), Q (Eq. 10)."""
from __future__ import annotations

import pytest
import torch

from repair.atpatch.benign import benign_columns
from repair.atpatch.detector import (Detector, DetectorError, contrastive_loss, detect_maps, flag_columns,
                                     strict_metrics, train_detector)
from repair.atpatch.trigger_inversion import mad_anomaly_index


def test_strict_metrics_count_exact_maps_only():
    truth = torch.tensor([[0, 1, 0], [0, 1, 1], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    flags = torch.tensor([[0, 1, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    m = strict_metrics(flags, truth)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (1, 1, 1, 1)  # missing one column is an FN
    assert m["precision"] == 0.5 and m["fnr"] == 0.5 and m["fpr"] == 0.5


def test_the_top_margin_drops_columns_far_below_their_maps_top_and_never_the_top():
    z = 0.0  # τ = 0.5 as a logit
    logits = torch.tensor([[5.0, 1.0, -3.0, 0.5],    # the trigger's column and one ordinary column above τ
                           [2.0, 1.5, -3.0, -3.0],   # two columns within the margin of each other
                           [0.8, 0.3, -3.0, -3.0],   # a clean map with an ordinary column above τ
                           [-1.0, -2.0, -3.0, -3.0]])  # nothing above τ
    truth = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    plain, margin = flag_columns(logits, z), flag_columns(logits, z, top_margin=2.0)
    assert plain.tolist() == [[True, True, False, True], [True, True, False, False],
                              [True, True, False, False], [False] * 4]
    assert margin.tolist() == [[True, False, False, False], [True, True, False, False],
                               [True, True, False, False], [False] * 4]
    # Eq. 9 alone: an extra column on the triggered map is a strict FN; the margin makes it a TP and
    # leaves the clean map's flag (an FP either way: the margin never drops a map's top column)
    assert (strict_metrics(plain, truth)["fnr"], strict_metrics(margin, truth)["fnr"]) == (0.5, 0.0)
    assert strict_metrics(plain, truth)["fpr"] == strict_metrics(margin, truth)["fpr"] == 0.5


def test_mad_picks_the_small_outlier():
    norms = torch.tensor([30.0, 28.0, 31.0, 4.0, 29.0, 33.0, 27.0, 30.0, 32.0, 29.0])
    index = mad_anomaly_index(norms)
    assert int(index.argmax()) == 3 and index[3] > 2


def test_contrastive_loss_prefers_separated_features():
    labels = torch.tensor([0., 0., 1., 1.])
    pos = torch.tensor([1, 0, 3, 2])
    apart = torch.tensor([[1., 0.], [1., 0.1], [0., 1.], [0.1, 1.]])
    mixed = torch.tensor([[1., 0.], [0., 1.], [1., 0.1], [0.1, 1.]])
    assert contrastive_loss(apart, labels, pos) < contrastive_loss(mixed, labels, pos)
    # equals Eq. 8 read off the full similarity matrix (negatives: every column of the other label)
    z = torch.nn.functional.normalize(mixed, dim=-1)
    sim = z @ z.t() / 0.5
    other = labels[:, None] != labels[None, :]
    full = torch.logsumexp(torch.cat([sim.gather(1, pos[:, None]), sim.masked_fill(~other, -torch.inf)], 1), 1)
    assert torch.allclose(contrastive_loss(mixed, labels, pos), (full - sim.gather(1, pos[:, None])[:, 0]).mean())


def _synthetic(m=96, n=9, seed=0, column=4):
    """Two layers; defective maps over-attend ``column`` in layer 0 only."""
    g = torch.Generator().manual_seed(seed)
    clean = [torch.randn(m, n, n, generator=g).softmax(-1) for _ in range(2)]
    bad = [c.clone() for c in clean]
    logits = torch.randn(m, n, n, generator=g)
    logits[..., column] += 4.0
    bad[0] = logits.softmax(-1)
    maps = [torch.cat([c, b]) for c, b in zip(clean, bad)]
    labels = [torch.zeros(2 * m, n), torch.zeros(2 * m, n)]
    labels[0][m:, column] = 1
    partner = torch.cat([torch.arange(m) + m, torch.arange(m)])
    return maps, labels, partner


def test_detector_learns_over_attended_column_and_fast_path_matches():
    maps, labels, partner = _synthetic()
    clean = torch.cat([torch.ones(96, dtype=torch.bool), torch.zeros(96, dtype=torch.bool)])
    det, history = train_detector(maps, labels, partner, benign_columns([m[clean] for m in maps]),
                                  epochs=15, lr=3e-3, progress=False)
    assert history[-1] < history[0]
    test_maps, test_labels, _ = _synthetic(seed=1)
    flags = detect_maps(det, test_maps, 0.1)
    m = strict_metrics(torch.cat(flags), torch.cat(test_labels))
    assert m["fnr"] <= 0.05 and m["fpr"] <= 0.1
    # trained on column 4, it finds the same over-attention on column 7: an inverted trigger rarely
    # sits on the real trigger's token, so the Detector must not learn positions
    moved_maps, moved_labels, _ = _synthetic(seed=2, column=7)
    moved = strict_metrics(detect_maps(det, moved_maps[:1], 0.1)[0], moved_labels[0])
    assert moved["fnr"] <= 0.05 and moved["fpr"] <= 0.1
    # the folded hot path equals Eq. 5 + the Detector
    det.prepare()
    for layer in (0, 1):
        heads = torch.stack([test_maps[layer][:8]] * 3, 1)
        assert torch.allclose(det.logits_from_heads(heads, layer), det(test_maps[layer][:8], layer), atol=1e-4)


def test_detector_is_equivariant_to_column_order():
    """Nothing in the Detector depends on a column's index: permuting the map's columns (and Q's)
    permutes the logits, on both the training path and the folded hot path."""
    torch.manual_seed(0)
    det = Detector(2, 9)
    torch.nn.init.normal_(det.layer_emb)
    maps = torch.randn(4, 9, 9).softmax(-1)
    q = torch.randn(9, 9).softmax(-1)
    perm = torch.randperm(9)
    det.set_benign([q, q])
    base = det(maps, 1)
    det.set_benign([q[:, perm], q[:, perm]])
    assert torch.allclose(det(maps[..., perm], 1), base[:, perm], atol=1e-5)
    det.prepare()
    assert torch.allclose(det.logits_from_heads(maps[:, None, :, perm], 1), base[:, perm], atol=1e-5)


def test_more_attention_on_a_column_never_lowers_its_score():
    """Every weight enters as |w|: moving attention mass onto a column (rows renormalised) raises
    its profile and its standing against the map's median, so its logit cannot fall. The inverted
    trigger sets how strong the training positives are; the real trigger may be stronger."""
    torch.manual_seed(0)
    det = Detector(1, 9)
    for p in det.parameters():
        torch.nn.init.normal_(p)  # weights of both signs
    det.set_benign([torch.full((9, 9), 1 / 9)])
    maps = torch.randn(16, 9, 9).softmax(-1)
    before = det(maps, 0)
    for boost in (0.5, 2.0, 10.0):
        more = maps.clone()
        more[..., 3] *= 1 + boost
        more = more / more.sum(-1, keepdim=True)
        assert (det(more, 0)[:, 3] >= before[:, 3] - 1e-5).all()


def test_detector_round_trips_through_config():
    det = Detector(3, 17, query_lens=[17, 17, 1])
    again = Detector.from_config(det.config(), det.state_dict())
    x = torch.rand(2, 17, 17).softmax(-1)
    assert torch.equal(det(x, 1), again(x, 1))
    # a detector of the earlier 2-D map design (no "design" key) is refused with what to do
    old = {k: v for k, v in det.config().items() if k != "design"}
    with pytest.raises(DetectorError, match="rebuild it with `repair-proxy atpatch build`"):
        Detector.from_config(old, det.state_dict())


def test_fairness_detector_knows_its_tokens():
    """With ``token_embedding`` (fairness) the same attention on another token scores differently,
    the embedding survives the manifest round trip, and the hot path folds it in."""
    torch.manual_seed(0)
    det = Detector(2, 9, token_embedding=True)
    torch.nn.init.normal_(det.token_emb)
    x = torch.full((1, 9, 9), 1 / 9)  # uniform map: every column looks the same
    logits = det(x, 0)
    assert logits.std() > 0.01
    again = Detector.from_config(det.config(), det.state_dict())
    assert again.token_embedding and torch.equal(again(x, 0), logits)
    det.prepare()
    assert torch.allclose(det.logits_from_heads(x[:, None], 0), logits, atol=1e-5)
    # position-free (backdoor) Detectors keep the term at zero: it is not trained
    assert not Detector(2, 9).token_emb.requires_grad


def test_benign_columns_are_the_clean_mean():
    maps = [torch.rand(10, 3, 4), torch.rand(10, 1, 4)]
    q = benign_columns(maps)
    assert torch.allclose(q[0], maps[0].mean(0)) and q[1].shape == (1, 4)
