"""`repair-proxy evaluate`: accuracy/ASR before and after, strict detector metrics, ablations."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offline.datasets import load_dataset
from offline.defects import Trigger
from offline.evaluate import EvaluateError, detector_metrics, evaluate_bundle
from repair.atpatch.runtime import AtPatch, TargetClassGate
from repair.bundle import Bundle


@pytest.fixture(scope="module")
def evaluated(digits_patched, tmp_path_factory):
    off = evaluate_bundle(digits_patched, patch="off", defect="badnets", ablations=False)
    on = evaluate_bundle(digits_patched, patch="on", defect="badnets",
                         detector_curve=tmp_path_factory.mktemp("curve") / "detector.png")
    return off, on


def test_patch_on_removes_the_backdoor_and_keeps_accuracy(evaluated, digits_patched):
    off, on = evaluated
    assert off["version"] == on["version"]
    assert off["asr"] >= 0.95  # the backdoor fires without the patch
    assert on["asr"] <= 0.01
    assert on["accuracy"] >= off["accuracy"] - 0.005
    # the patch gives the triggered images their labels back (0.84 here, the clean 0.97: the
    # patch hides part of the digit), it does not send them to another class
    assert off["asr_worst_class"] == {"asr": off["asr"], "class": 0}
    assert off["triggered_accuracy"] <= 0.15 and on["triggered_accuracy"] >= 0.75
    assert on["asr_worst_class"]["asr"] <= 0.15
    # the floor under ASR: clean images of other classes the model answers with the target anyway
    data = load_dataset("digits")
    version = Bundle(digits_patched).version()
    target = version.manifest["defect"]["target_class"]
    keep = data.y_test != target
    with torch.no_grad():
        floor = (version.build_model()(data.x_test[keep]).argmax(-1) == target).float().mean().item()
    assert off["clean_to_target"] == pytest.approx(floor, abs=1e-4) and off["clean_to_target"] < off["asr"]


def test_detector_metrics_follow_their_definitions(evaluated):
    d = evaluated[1]["detector"]
    tp, fp, tn, fn = d["tp"], d["fp"], d["tn"], d["fn"]
    assert tp + fn > 0 and tn + fp > 0
    assert d["precision"] == pytest.approx(tp / (tp + fp), abs=1e-4)
    assert d["recall"] == pytest.approx(tp / (tp + fn), abs=1e-4)
    assert d["fpr"] == pytest.approx(fp / (fp + tn), abs=1e-4)
    assert d["fnr"] == pytest.approx(1 - d["recall"], abs=1e-4)
    assert d["trigger_tokens"] == [16]  # the 3x3 BadNets patch sits in the last of 16 patches


def test_the_detector_curve_runs_through_the_served_threshold_and_trades_fpr_for_fnr(evaluated):
    d = evaluated[1]["detector"]
    points = d["curve"]["points"]
    served = d["curve"]["served"]
    assert served in points and served["shift"] == 0
    assert [served[k] for k in ("precision", "recall", "fpr", "fnr")] == [d[k] for k in ("precision", "recall", "fpr", "fnr")]
    fprs = [p["fpr"] for p in points]  # shifts ascending: a higher τ never flags more clean maps
    assert fprs == sorted(fprs, reverse=True) and (fprs[0], fprs[-1]) == (1.0, 0.0)
    assert points[-1]["fnr"] == 1.0  # above every score nothing is flagged, the trigger neither
    taus = [p["thresholds"][0] for p in points]
    assert taus == sorted(taus) and 0 <= taus[0] <= taus[-1] <= 1  # probabilities, rounded to 4 places
    best = d["curve"]["best_fnr_at_fpr"]
    assert best["fpr"] <= 0.1 and best["fnr"] == min(p["fnr"] for p in points if p["fpr"] <= 0.1)
    assert best["fnr"] <= served["fnr"] or served["fpr"] > 0.1
    png = Path(evaluated[1]["detector_curve"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_pictures_of_the_patch_need_the_patch_on_and_a_trigger(digits_patched, compas_ft_atpatch, tmp_path):
    with pytest.raises(EvaluateError, match="need --patch on"):
        evaluate_bundle(digits_patched, patch="off", detector_curve=tmp_path / "c.png")
    with pytest.raises(EvaluateError, match="not a vision model with a trigger"):
        evaluate_bundle(compas_ft_atpatch, patch="on", detector_curve=tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_served_metrics_count_only_the_flags_the_target_gate_lets_through(digits_patched):
    version = Bundle(digits_patched).version()
    model, data = version.build_model(), load_dataset("digits")
    trig = Trigger.from_tensors(version.tensors("defect"))
    target = version.manifest["defect"]["target_class"]
    atp = AtPatch.from_version(version, model)
    try:
        assert isinstance(atp.gate, TargetClassGate) and atp.gate.target == target  # the shared build is gated
        d = detector_metrics(atp, model, data.x_test, trig.apply(data.x_test), data.y_test, target, trig.mask, 4)
        atp.gate = None
        assert "served" not in detector_metrics(atp, model, data.x_test, trig.apply(data.x_test), data.y_test,
                                                target, trig.mask, 4)  # no gate: the Detector is what is served
    finally:
        atp.remove()
    served = d["served"]
    assert (served["tp"], served["fn"]) == (d["tp"], d["fn"])  # the gate lets every triggered map through
    # clean maps flagged on rows answered with another class never reach Γ
    assert served["fp"] + served["tn"] == d["fp"] + d["tn"] and served["fp"] < d["fp"]
    # the Detector targets on the flags served (this machine's build: FPR 0.083, FNR 0.003;
    # without the build's top margin, FNR 0.26: ordinary columns flagged beside the trigger's)
    assert version.manifest["atpatch"]["top_margin"] is not None
    assert served["fpr"] <= 0.10 and served["fnr"] <= 0.01


def test_ablations_show_the_detector_matters(evaluated):
    on = evaluated[1]
    # random columns instead of the Detector leave the backdoor working
    assert on["ablations"]["without_detector"]["asr"] > on["asr"] + 0.5
    # the real trigger's columns patched on every input: the method's ceiling (the issue measured
    # ASR 0 with the true columns of the first layer replaced by Γ)
    assert on["ablations"]["true_columns"]["asr"] <= 0.01


def test_patch_on_without_a_detector_is_a_clear_error(digits_patched):
    parent = Bundle(digits_patched).version().parent
    with pytest.raises(EvaluateError, match="no AtPatch detector"):
        evaluate_bundle(digits_patched, version=parent, patch="on")
