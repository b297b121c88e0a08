"""AtPatch end to end on the shared digits BadNets ViT: build, runtime contract, bad input."""
from __future__ import annotations

import functools
import itertools
from contextlib import contextmanager

import pytest
import torch

from offline.atpatch_build import (CLEAN_FLAG_RATES, GATED_THRESHOLDS, TOP_MARGIN, BuildError, _calibrate,
                                   _check_top_margin, _lower_threshold, _warnings, build_detector)
from offline.datasets import load_dataset
from offline.defects import Trigger
from repair.atpatch import benign as benign_io
from repair.atpatch import cpu_kernel
from repair.atpatch.debugging_set import DebugSet, patch_tokens
from repair.atpatch.detector import Detector, DetectorError, logit_threshold, map_logits
from repair.atpatch.protected_prior import PriorError, ProtectedPrior
from repair.atpatch.redistribution import redistribute
from repair.atpatch.runtime import AtPatch, CounterfactualGate, TargetClassGate, row_gate
from repair.atpatch.trigger_inversion import RESTARTS
from repair.attention import NoAttentionError, attention_maps
from repair.bundle import Bundle, state_dict_for_saving
from repair.models import build_model


@pytest.fixture(scope="module")
def patched(digits_patched):
    version = Bundle(digits_patched).version()
    model = version.build_model()
    atp = AtPatch.from_version(version, model)
    yield version, model, atp
    atp.remove()


def test_build_writes_a_child_version_with_detector_and_benign(digits_patched, digits_vit_badnets):
    b = Bundle(digits_patched)
    v = b.version()
    assert v.parent == Bundle(digits_vit_badnets).current_id()
    assert v.has("detector") and v.has("benign")
    meta = v.manifest["atpatch"]
    assert meta["threshold"] == 0.1 and meta["seq_len"] == 17
    assert meta["inversion"]["target"] == 0  # Neural Cleanse found the real target
    assert meta["inversion"]["restarts"] == RESTARTS
    assert set(meta["variant_selection"]) >= {"replace", "masked", "chosen"}
    assert meta["variants"]["backdoor"] in ("replace", "masked")
    assert all(k in meta["detector_metrics"] for k in ("precision", "recall", "f1", "fpr", "fnr"))
    # the Detector runs on the shortest layer prefix that did as well as all layers on held-out inputs
    layers, sel = meta["layers"], meta["layer_selection"]
    assert layers == list(range(len(layers))) and sel["chosen"] == layers
    full, chosen = sel["prefixes"]["0..2"], sel["prefixes"][f"0..{len(layers) - 1}"]
    tol = sel["tolerance"]
    assert chosen["defect_metric"] <= full["defect_metric"] + tol and chosen["accuracy"] >= full["accuracy"] - tol
    # held-out inverted-trigger inputs: the backdoor works without the patch and not with it (the
    # inverted trigger's success depends on the CPU's model: 0.86 on an Intel Xeon with AVX-512)
    held = meta["held_out"]
    assert held["unpatched"]["defect_metric"] > 0.8 and held["patched"]["defect_metric"] <= 0.05
    assert held["patched"] == chosen and meta["warnings"] == []
    # the shared build is target-gated: served with its gate, τ searched downwards for every layer at once
    assert meta["row_gate"] == "target_class" and "patched_without_gate" in held
    taus, cal = meta["layer_thresholds"], meta["calibration"]
    assert cal["method"] == "gated_lowest_threshold" and cal["tried"] and all(float(t) < 0.1 for t in cal["tried"])
    assert taus == [cal["chosen"] or 0.1] * 3
    atp = AtPatch.from_version(v, v.build_model())
    try:
        assert isinstance(atp.gate, TargetClassGate) and atp.gate.target == meta["inversion"]["target"]
    finally:
        atp.remove()


class _ScoresAreTheMaps:
    """A stand-in Detector whose column logits are the maps' single row."""

    def __call__(self, maps, layer):
        return maps[:, 0, :]


def test_calibration_takes_the_smallest_clean_flag_rate_that_keeps_the_trigger_stopped():
    g = torch.Generator().manual_seed(0)
    clean = [torch.randn(1000, 1, 5, generator=g) * s for s in (1.0, 3.0)]  # logits of clean maps
    base = {"defect_metric": 0.0, "accuracy": 0.97}
    tried = []

    def runner_at(taus):
        tried.append(taus)
        # the trigger gets through once layer 0's τ is above σ(2.5)
        return lambda variant, layers: {"defect_metric": 0.2 if taus[0] > 0.924 else 0.0, "accuracy": 0.97}

    out = _calibrate(runner_at, _ScoresAreTheMaps(), clean, 0.1, "replace", base, 0.005)
    assert len(tried) >= 2 and out["chosen"] in CLEAN_FLAG_RATES
    taus = out["layer_thresholds"]
    assert taus[0] <= 0.924 and min(taus) >= 0.1
    for maps, tau in zip(clean, taus):  # at most a share α of clean maps has a column above τ
        flagged = (maps[:, 0, :].amax(1) > logit_threshold(tau)).float().mean().item()
        assert flagged <= out["chosen"] + 1e-3
    # the next smaller rate was tried and let the trigger through; a rate that fails first keeps τ
    smaller = [r for r in CLEAN_FLAG_RATES if r < out["chosen"]]
    assert not smaller or out["tried"][str(smaller[0])]["defect_metric"] == 0.2
    # the trigger gets through above σ(1.9): α = 0.1 (layer 0's τ at logit 2.09) fails, so the build
    # falls back to α = 0.2 (1.71) rather than to τ alone
    loose = _calibrate(lambda taus: lambda v, l: {"defect_metric": 0.2 if taus[0] > 0.8699 else 0.0,
                                                  "accuracy": 0.97},
                       _ScoresAreTheMaps(), clean, 0.1, "replace", base, 0.005)
    assert loose["chosen"] == 0.2 and loose["layer_thresholds"][0] <= 0.8699
    never = _calibrate(lambda taus: lambda v, l: {"defect_metric": 0.3, "accuracy": 0.97},
                       _ScoresAreTheMaps(), clean, 0.1, "replace", base, 0.005)
    assert never["chosen"] is None and "layer_thresholds" not in never
    # τ that already lets the held-out trigger through: nothing to compare a higher τ against
    tried.clear()
    blind = _calibrate(runner_at, _ScoresAreTheMaps(), clean, 0.1, "replace",
                       {"defect_metric": 0.9, "accuracy": 0.97}, 0.005)
    assert blind["chosen"] is None and tried == [] and "held-out" in blind["reason"]


class _OneLayerScores(_ScoresAreTheMaps):
    n_layers = 1


def test_the_top_margin_is_served_only_where_held_out_inputs_allow_it():
    """``_check_top_margin`` with stand-in held-out runners; the held-out debugging maps' strict
    metrics are taken with and without the margin (the stand-in's logits are the maps' row)."""
    maps = torch.tensor([[[5.0, 1.0, -3.0]], [[4.0, -3.0, -3.0]], [[1.0, -3.0, -3.0]], [[-3.0, -3.0, -3.0]]])
    labels = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    held = DebugSet([maps], [labels], torch.tensor([2, 3, 0, 1]), torch.tensor([False, False, True, True]))
    base = {"defect_metric": 0.02, "accuracy": 0.97}

    def check(asr, acc):
        return _check_top_margin(lambda margin: lambda v, l: {"defect_metric": asr, "accuracy": acc},
                                 _OneLayerScores(), held, [0.5], "replace", base, 0.005)

    kept = check(0.02, 0.97)
    assert kept["chosen"] == TOP_MARGIN
    assert (kept["without"]["fnr"], kept["with"]["fnr"]) == (0.5, 0.0)  # map 0's extra column dropped
    assert kept["without"]["fpr"] == kept["with"]["fpr"] == 0.5
    assert check(0.04, 0.97)["chosen"] == TOP_MARGIN  # below the level the build warns at
    assert check(0.06, 0.97)["chosen"] is None        # the inverted trigger gets through
    assert check(0.02, 0.96)["chosen"] is None        # held-out accuracy falls


def test_gated_builds_lower_tau_until_accuracy_or_asr_says_stop():
    """A stand-in held-out runner: ASR falls as τ falls; accuracy holds down to ``cliff``."""
    base = {"defect_metric": 0.18, "accuracy": 0.87}
    tried = []

    def runner_at(cliff):
        def at(taus):
            tried.append(taus[0])
            return lambda variant, layers: {"defect_metric": round(taus[0] / 10, 4),
                                            "accuracy": 0.87 if taus[0] >= cliff else 0.80}
        return at

    out = _lower_threshold(runner_at(0.02), 3, 0.1, "replace", base, 0.005)
    assert out["chosen"] == 0.02 and out["layer_thresholds"] == [0.02] * 3
    assert out["measured"] == {"defect_metric": 0.002, "accuracy": 0.87}
    assert tried == [0.05, 0.02, 0.01]  # 0.01 tried, costs accuracy, search stops above it
    # no lower τ affordable: τ kept
    tried.clear()
    none = _lower_threshold(runner_at(0.1), 3, 0.1, "replace", base, 0.005)
    assert none["chosen"] is None and "layer_thresholds" not in none and tried == [0.05]
    # a lower τ that lets more of the held-out trigger through is refused
    worse = _lower_threshold(lambda taus: lambda v, l: {"defect_metric": 0.2, "accuracy": 0.87}, 3, 0.1,
                             "replace", base, 0.005)
    assert worse["chosen"] is None
    # only values below the build's own τ are tried
    tried.clear()
    _lower_threshold(runner_at(0.0), 3, 0.03, "replace", base, 0.005)
    assert tried == [t for t in GATED_THRESHOLDS if t < 0.03]


def test_per_layer_thresholds_decide_per_layer(patched):
    version, model, atp = patched
    assert atp.threshold == version.manifest["atpatch"]["layer_thresholds"]
    benign = benign_io.from_tensors(version.tensors("benign"), 3)
    x = load_dataset("digits").x_test[:32]
    only_middle = AtPatch(model, atp.detector, benign, threshold=[1 - 1e-9, 1e-9, 1 - 1e-9],
                          layers=[0, 1, 2])
    try:
        flagged = only_middle(x).flagged
    finally:
        only_middle.remove()  # its own hooks only: the fixture's stay (checked by the test below)
    # layer 2's τ flags nothing by itself; it patches what layer 1 flagged (the test below)
    assert flagged[:, 1].all() and not flagged[:, 0].any() and torch.equal(flagged[:, 2], flagged[:, 1])
    with pytest.raises(DetectorError, match="per-layer thresholds"):
        AtPatch(model, atp.detector, benign, threshold=[0.1, 0.1], layers=[0])


def test_a_flagged_column_stays_flagged_at_later_layers(patched):
    """Once the Detector flags a column, later layers patch it too, though their own τ would
    not flag it (a patched layer leaves the trigger's column less over-attended after it)."""
    version, model, atp = patched
    data = load_dataset("digits")
    x_bad = Trigger.from_tensors(version.tensors("defect")).apply(data.x_test[:64])
    benign = benign_io.from_tensors(version.tensors("benign"), 3)
    tau0 = version.manifest["atpatch"]["layer_thresholds"][0]
    first_only = AtPatch(model, atp.detector, benign, threshold=[tau0, 1 - 1e-9, 1 - 1e-9], layers=[0, 1, 2])
    try:
        flagged = first_only(x_bad).flagged
    finally:
        first_only.remove()
    assert flagged[:, 0].any(1).float().mean() > 0.9  # the trigger found at layer 0
    assert torch.equal(flagged[:, 1], flagged[:, 0]) and torch.equal(flagged[:, 2], flagged[:, 0])


def test_the_gpu_hook_path_flags_and_answers_as_the_cpu_path(patched):
    """On a GPU the hook decides with tensor ops only (no host read: capturable in a CUDA graph,
    see ``repair.cuda_graphs``). Run here on the CPU, that path must give the CPU path's flags
    and logits bit for bit, with and without a row gate."""
    version, _, atp = patched
    maps = torch.softmax(3 * torch.randn(16, 4, 17, 17, generator=torch.Generator().manual_seed(0)), -1)
    for layer in range(3):  # the GPU step's formulation of the Detector (what torch.compile fuses)
        torch.testing.assert_close(atp.detector.logits_fusable(maps, layer),
                                   atp.detector.logits_from_heads(maps, layer), rtol=1e-5, atol=1e-5)
    data = load_dataset("digits")
    x = torch.cat([data.x_test[:48], Trigger.from_tensors(version.tensors("defect")).apply(data.x_test[:48])])
    served_gate, served_margin = atp.gate, atp.top_margin
    for gate, margin in itertools.product((None, TargetClassGate(version.manifest["defect"]["target_class"])),
                                          (None, TOP_MARGIN)):
        atp.gate, atp.top_margin = gate, margin
        try:
            with _torch_ops(atp):  # the same Γ as the tensor path's (the kernels: the test below)
                cpu_path = atp(x, "on")
            atp.tensor_only = True
            tensor_paths = [atp(x, "on")]
            atp._step = functools.partial(atp._device_step, fusable=True)  # what compile_hot_path compiles
            tensor_paths.append(atp(x, "on"))
        finally:
            atp.gate, atp.top_margin, atp.tensor_only, atp._step = served_gate, served_margin, False, atp._device_step
        assert cpu_path.patched[48:].float().mean() > 0.9 and not cpu_path.patched[:48].all()
        for tensor_path in tensor_paths:
            assert torch.equal(tensor_path.flagged, cpu_path.flagged)
            assert torch.equal(tensor_path.logits, cpu_path.logits)


def test_the_top_margin_leaves_the_trigger_flagged_and_the_columns_far_below_it_alone(patched):
    """At a low τ the Detector flags ordinary columns beside the real trigger's (strict FNs);
    with the margin only the columns near each map's top stay flagged, the trigger's among them."""
    version, model, atp = patched
    data = load_dataset("digits")
    trigger = Trigger.from_tensors(version.tensors("defect"))
    x_bad = trigger.apply(data.x_test[data.y_test != version.manifest["defect"]["target_class"]][:96])
    tokens = patch_tokens(trigger.mask, int(version.manifest["architecture"]["patch_size"]))
    benign = benign_io.from_tensors(version.tensors("benign"), 3)
    flags = {}
    with atp.bare():  # the fixture's hooks out of the way
        for margin in (None, TOP_MARGIN):
            low = AtPatch(model, atp.detector, benign, threshold=0.02, layers=[0], top_margin=margin)
            try:
                flags[margin] = low(x_bad).flagged[:, 0]
                for i in range(8):  # one image a request: the CPU path's batch-1 form of the margin
                    assert torch.equal(low(x_bad[i:i + 1]).flagged[0, 0], flags[margin][i])
            finally:
                low.remove()
        logits = map_logits(atp.detector, attention_maps(model, x_bad)[:1])[0]
    plain, kept = flags[None], flags[TOP_MARGIN]
    assert plain[:, tokens].all() and kept[:, tokens].all()   # the real trigger's column, either way
    assert (plain & ~kept).any() and not (kept & ~plain).any()   # the margin only drops flags
    def share_with_extra_flags(f):
        return (f.sum(1) > len(tokens)).float().mean()

    assert share_with_extra_flags(plain) > 0.5 and share_with_extra_flags(kept) < 0.1
    top = logits.amax(1, keepdim=True)
    assert (logits[kept] >= (top - TOP_MARGIN).expand_as(logits)[kept]).all()
    with pytest.raises(DetectorError, match="top margin"):
        AtPatch(model, atp.detector, benign, top_margin=0.0)


def test_a_hook_step_that_fails_to_compile_runs_uncompiled(patched, monkeypatch):
    """Triton needs a C compiler at run time; where compiling fails the GPU step runs as it is."""
    _, _, atp = patched
    x = load_dataset("digits").x_test[:4]

    def broken(fn, **options):
        def compiled(*args, **kwargs):
            raise RuntimeError("no C compiler")
        return compiled

    expected = atp(x, "on")
    monkeypatch.setattr(torch, "compile", broken)
    atp.tensor_only = True
    try:
        with pytest.warns(UserWarning, match="runs uncompiled: no C compiler"):
            assert atp.compile_hot_path(x) is False
        assert atp._step == atp._device_step
        assert torch.equal(atp(x, "on").logits, expected.logits)
    finally:
        atp.tensor_only, atp._step = False, atp._device_step


def test_build_warns_when_the_patch_misses_the_defect_or_costs_accuracy():
    ok = {"defect_metric": 0.0, "accuracy": 0.97}
    assert _warnings("backdoor", {"defect_metric": 1.0, "accuracy": 0.97}, ok) == []
    missed = _warnings("backdoor", {"defect_metric": 1.0, "accuracy": 0.97}, {"defect_metric": 0.32, "accuracy": 0.97})
    assert len(missed) == 1 and "32.0%" in missed[0] and "misses" in missed[0]
    costly = _warnings("fairness", {"defect_metric": 0.15, "accuracy": 0.687}, {"defect_metric": 0.0, "accuracy": 0.545})
    assert len(costly) == 1 and "14.2 pt" in costly[0]


def test_only_the_chosen_layers_are_hooked(patched):
    version, _, atp = patched
    layers = version.manifest["atpatch"]["layers"]
    assert atp.layers == layers
    # on the CPU every layer runs the eager attention while AtPatch is installed, hooked or not
    assert [m.fused_attn for m in atp.access.modules] == [False] * 3
    x = load_dataset("digits").x_test[:64]
    on = atp(x, "on")
    assert not on.flagged[:, [l for l in range(3) if l not in layers]].any()


def test_backdoor_is_patched_within_the_issue_thresholds(patched):
    version, model, atp = patched
    data = load_dataset("digits")
    trigger = Trigger.from_tensors(version.tensors("defect"))
    target = version.manifest["defect"]["target_class"]
    keep = data.y_test != target
    x_bad = trigger.apply(data.x_test[keep])
    asr_off = (atp(x_bad, "off").logits.argmax(-1) == target).float().mean().item()
    asr_on = (atp(x_bad, "on").logits.argmax(-1) == target).float().mean().item()
    acc_off = (atp(data.x_test, "off").logits.argmax(-1) == data.y_test).float().mean().item()
    acc_on = (atp(data.x_test, "on").logits.argmax(-1) == data.y_test).float().mean().item()
    assert asr_off > 0.9
    assert asr_on <= 0.01, f"ASR with AtPatch {asr_on:.4f}"
    assert acc_off - acc_on <= 0.005, f"accuracy {acc_off:.4f} -> {acc_on:.4f}"


def test_runtime_contract(patched):
    _, model, atp = patched
    x = load_dataset("digits").x_test[:16]
    off = atp(x, "off")
    with torch.no_grad():
        plain = model(x)
    assert torch.equal(off.logits, plain)
    assert off.nothing_flagged and not off.patched.any() and off.flagged.shape == (16, 3, 17)
    on = atp(x, "on")
    # the CPU path knows "nothing flagged" without a tensor op; then the zeros are made when read
    assert on.nothing_flagged == (not on.patched.any())
    unflagged = atp(x[~on.patched], "on")
    assert unflagged.nothing_flagged and unflagged.flagged.shape == (int((~on.patched).sum()), 3, 17)
    assert on.flagged.dtype == torch.bool and on.flagged.shape == (16, 3, 17)
    assert torch.equal(on.patched, on.flagged.flatten(1).any(1))
    for i in range(16):
        cols = on.columns(i)
        assert len(cols) == int(on.flagged[i].sum())
        if not on.patched[i]:  # nothing flagged: bit-for-bit the unpatched logits
            assert torch.equal(on.logits[i], plain[i])
    with pytest.raises(ValueError, match="patch mode"):
        atp(x, "shadow-typo")


def test_target_gate_patches_only_rows_answered_with_the_target(patched):
    """``--target-gate``: a flagged row the bare model does not answer with the target keeps the
    bare logits bit for bit (a false flag costs nothing), and the attack is stopped exactly as
    without the gate (a backdoor only ever turns answers into its target)."""
    version, model, atp = patched
    data = load_dataset("digits")
    target = version.manifest["atpatch"]["inversion"]["target"]
    assert target == version.manifest["defect"]["target_class"]
    trigger = Trigger.from_tensors(version.tensors("defect"))
    x = data.x_test[:600]
    x_bad = trigger.apply(x[data.y_test[:600] != target])
    served_gate = atp.gate
    try:
        atp.gate = None
        off, every_row, every_row_bad = atp(x, "off"), atp(x), atp(x_bad)
        atp.gate = TargetClassGate(target)
        gated, gated_bad = atp(x), atp(x_bad)
    finally:
        atp.gate = served_gate
    bare_target = off.logits.argmax(-1) == target
    assert every_row.patched.any()  # the Detector flags some clean images: the case the gate is for
    assert torch.equal(gated.patched, every_row.patched & bare_target)
    assert torch.equal(gated.logits[~gated.patched], off.logits[~gated.patched])
    assert torch.equal(gated_bad.logits.argmax(-1), every_row_bad.logits.argmax(-1))
    assert gated_bad.patched.float().mean() > 0.9  # the triggered images are still patched


def test_row_gate_comes_from_the_manifest():
    assert row_gate({}) is None
    gate = row_gate({"row_gate": "target_class", "inversion": {"target": 3}})
    assert isinstance(gate, TargetClassGate) and gate.target == 3
    gate = row_gate({"row_gate": "counterfactual",
                     "protected": {"sex": {"column": 2, "values": [0.0, 1.0]}, "race": {"column": 5, "values": [0.0, 1.0, 2.0]}}})
    assert isinstance(gate, CounterfactualGate) and gate.columns == [2, 5] and gate.combos.shape == (6, 2)
    assert gate.logit_shift is None  # built before fairness builds fitted one, or none served
    gate = row_gate({"row_gate": "counterfactual", "protected": {"sex": {"column": 2, "values": [0.0, 1.0]}},
                     "logit_shift": {"shift": [0.0, 0.48], "rows": 488}})
    assert gate.logit_shift.tolist() == pytest.approx([0.0, 0.48]) and gate.prior is None
    # a build that serves the counterfactual average needs its prior, and a prior needs such a build
    average = {"row_gate": "counterfactual", "fairness_answer": {"chosen": "counterfactual average"},
               "protected": {"sex": {"column": 2, "token": 3, "values": [0.0, 1.0]}}}
    with pytest.raises(DetectorError, match="do not match"):
        row_gate(average)
    prior = ProtectedPrior(torch.zeros(2, 3), torch.zeros(2), [0], [1], [2], [2], torch.tensor([[0.0], [1.0]]))
    gate = row_gate(average, prior)
    assert torch.equal(gate.prior.weight, prior.weight) and gate.tokens == [3]
    with pytest.raises(DetectorError, match="do not match"):
        row_gate(dict(average, fairness_answer={"chosen": "masked patch"}), prior)
    with pytest.raises(PriorError, match="gate enumerates"):  # a prior over 3 combinations, 2 enumerated
        row_gate(average, ProtectedPrior(torch.zeros(3, 3), torch.zeros(3), [0], [1], [2], [2],
                                         torch.tensor([[0.0], [1.0], [2.0]])))
    with pytest.raises(DetectorError, match="unknown row gate"):
        row_gate({"row_gate": "sometimes"})


def test_heatmaps_show_the_map_before_and_after_the_patch(patched, tmp_path):
    """``observe`` hands every layer's map before and after Γ to a callback (what the PNG
    heatmaps of ``evaluate --heatmaps`` draw): on a triggered image the patched layer's map
    changes and its rows still sum to 1; the PNGs are written."""
    from offline.evaluate import save_heatmaps

    version, _, atp = patched
    data = load_dataset("digits")
    trigger = Trigger.from_tensors(version.tensors("defect"))
    x_bad = trigger.apply(data.x_test[data.y_test != version.manifest["defect"]["target_class"]][:2])
    seen = {}
    result = atp.observe(x_bad, lambda layer, before, after: seen.__setitem__(layer, (before, after)))
    assert result.patched.all() and set(seen) == {0, 1, 2}
    layer = int(result.flagged[0].any(-1).nonzero()[0])
    before, after = seen[layer]
    assert not torch.equal(before, after)
    assert torch.allclose(after.sum(-1), torch.ones_like(after.sum(-1)), atol=1e-5)
    files = save_heatmaps(atp, x_bad, tmp_path, "triggered")
    assert len(files) == 2
    assert all(open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for f in files)


def test_remove_restores_the_plain_model(digits_patched):
    version = Bundle(digits_patched).version()
    model = version.build_model()
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        fused = model(x)
    atp = AtPatch.from_version(version, model)
    atp.remove()
    with torch.no_grad():
        assert torch.equal(model(x), fused)


def test_detector_for_another_sequence_length_is_refused(digits_patched):
    version = Bundle(digits_patched).version()
    model = build_model({"arch": "vit", "img_size": 16, "patch_size": 2, "in_chans": 1})
    with pytest.raises(DetectorError, match="17 tokens"):
        AtPatch.from_version(version, model)
    with pytest.raises(DetectorError, match="layers"):
        AtPatch(version.build_model(), Detector(2, 17), [torch.ones(17, 17)] * 2)


def test_bundle_without_attention_is_refused_before_writing(tmp_path):
    model = build_model({"arch": "resnet18", "in_chans": 1, "num_classes": 10})
    b = Bundle(tmp_path / "cnn")
    b.write_version({"kind": "vision", "architecture": {"arch": "resnet18", "in_chans": 1, "num_classes": 10},
                     "dataset": {"name": "digits"}, "labels": [str(i) for i in range(10)]},
                    {"model": state_dict_for_saving(model)})
    with pytest.raises(NoAttentionError, match="no attention layers"):
        build_detector(b.root, progress=False)
    assert b.version_ids() == ["v0001"]


def test_ungated_build_raises_tau_per_layer_by_clean_flag_rate(digits_vit_badnets, copy_bundle):
    """A small build without the gate (few epochs: only the wiring is checked) calibrates τ per
    layer on clean images (``_calibrate``), never below the paper's τ, and is served ungated."""
    path = copy_bundle(digits_vit_badnets)
    v = build_detector(path, epochs=2, n_clean=300, progress=False)
    meta = v.manifest["atpatch"]
    assert meta["row_gate"] is None and "patched_without_gate" not in meta["held_out"]
    taus, cal = meta["layer_thresholds"], meta["calibration"]
    assert cal["method"] == "clean_flag_rate" and cal["clean_images"] >= 100
    assert len(taus) == 3 and min(taus) >= 0.1
    assert taus == (cal["layer_thresholds"] if cal["chosen"] is not None else [0.1] * 3)
    atp = AtPatch.from_version(v, v.build_model())
    try:
        assert atp.gate is None
    finally:
        atp.remove()


def test_target_gate_on_tabular_data_is_refused(compas_ft, copy_bundle):
    path = copy_bundle(compas_ft)
    with pytest.raises(BuildError, match="target-gate"):
        build_detector(path, protected=["sex"], target_gate=True, progress=False)
    assert Bundle(path).version_ids() == ["v0001"]


def test_protected_attributes_on_images_are_refused(digits_vit_badnets, copy_bundle):
    path = copy_bundle(digits_vit_badnets)
    with pytest.raises(BuildError, match="tabular"):
        build_detector(path, protected=["race"], progress=False)
    with pytest.raises(ValueError, match="τ"):
        build_detector(path, threshold=1.5, progress=False)
    with pytest.raises(BuildError, match="inversion restarts must be at least 1, got 0"):
        build_detector(path, inversion_restarts=0, progress=False)
    assert Bundle(path).version_ids() == ["v0001"]


def test_the_cpu_path_runs_the_compiled_kernels_and_answers_as_the_torch_ops(patched):
    """On the CPU the hook's Detector and Γ are compiled (``repair.atpatch.cpu_kernel``); the torch
    ops they replace give the same flags and the same answers (Γ's row sums are taken in another
    order, so patched logits agree to float rounding)."""
    version, _, atp = patched
    assert isinstance(atp._cpu_scores, cpu_kernel.CompiledDetector) and atp._redistribute is not redistribute
    data = load_dataset("digits")
    x = torch.cat([data.x_test[:64], Trigger.from_tensors(version.tensors("defect")).apply(data.x_test[:64])])
    compiled = atp(x, "on")
    with _torch_ops(atp):
        ops = atp(x, "on")
    assert compiled.patched[64:].float().mean() > 0.9
    assert torch.equal(compiled.flagged, ops.flagged)
    assert torch.equal(compiled.logits[~compiled.patched], ops.logits[~ops.patched])
    torch.testing.assert_close(compiled.logits, ops.logits, atol=1e-5, rtol=0)
    assert torch.equal(compiled.logits.argmax(-1), ops.logits.argmax(-1))


@contextmanager
def _torch_ops(atp: AtPatch):
    """The CPU path with the torch ops instead of the compiled kernels."""
    kernels = atp._cpu_scores, atp._redistribute
    atp._cpu_scores, atp._redistribute = cpu_kernel.cpu_scores(atp.detector, compiled=False), redistribute
    try:
        yield atp
    finally:
        atp._cpu_scores, atp._redistribute = kernels
