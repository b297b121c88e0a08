"""AtPatch for fairness on the shared COMPAS FT-Transformer: the build's debugging set (Eq. 4),
the variant it chooses, and unfairness with the patch on."""
from __future__ import annotations

import pytest
import torch

from offline.datasets import load_dataset
from repair.atpatch.runtime import AtPatch, PatchedModel
from repair.bundle import Bundle
from repair.metrics import unfairness


@pytest.fixture(scope="module")
def fair(compas_ft_atpatch):
    version = Bundle(compas_ft_atpatch).version()
    model = version.build_model()
    atp = AtPatch.from_version(version, model)
    yield version, model, atp, load_dataset("compas")
    atp.remove()


def test_build_records_the_protected_tokens_and_the_masked_choice(fair):
    version, model, _, data = fair
    meta = version.manifest["atpatch"]
    assert meta["defect_kind"] == "fairness"
    for name in ("race", "sex"):
        column = data.schema.index(name)
        assert meta["protected"][name]["column"] == column
        assert meta["protected"][name]["token"] == model.feature_token(column)
    assert meta["debugging_set"]["pairs_per_attribute"]["race"] > 0
    # Replacing the column with Q leaves the token's value flowing to [CLS]; masking removes it,
    # so the build's held-out UF picks masked (the measurement on Adult).
    sel = meta["variant_selection"]
    assert meta["variants"]["fairness"] == "masked"
    assert sel["masked"]["defect_metric"] < sel["replace"]["defect_metric"]


def test_masked_protected_token_makes_the_answer_independent_of_it(fair):
    """Where the Detector flags the protected token at every layer, for a row and for its twin with
    the attribute changed, the masked patch gives both the same answer (the token's value cannot
    reach [CLS]); and unfairness falls to the issue's target, UF <= 0.2 %. The Detector has a
    token embedding for fairness (the protected token draws no excess attention), so it flags the
    protected tokens wherever it runs; the gate lets it run only on rows whose answer depends on
    race or sex (the next test). The accuracy cost is measured in bench/results/atpatch_tabular.md."""
    version, model, atp, data = fair
    x = data.x_test[:1000]
    meta = version.manifest["atpatch"]
    assert meta["layers"] == [0, 1, 2]  # fairness masks at every layer
    invariant_pairs = 0
    for name, p in meta["protected"].items():
        net = PatchedModel(atp)
        before = unfairness(model, x, p["column"], p["values"])
        after = unfairness(net, x, p["column"], p["values"])
        assert after < before and after <= 0.002, (name, before, after)
        on = atp(x)
        for value in p["values"]:
            twin = x.clone()
            twin[:, p["column"]] = value
            on_twin = atp(twin)
            both = on.flagged[:, :, p["token"]].all(1) & on_twin.flagged[:, :, p["token"]].all(1)
            same = on.logits[both].argmax(-1) == on_twin.logits[both].argmax(-1)
            assert bool(same.all()), name
            invariant_pairs += int(both.sum())
    assert invariant_pairs > 100


def test_gate_patches_only_rows_the_protected_values_decide(fair):
    """The build gates rows: a row whose answer is the same for every combination of race and sex
    keeps the bare model's logits bit for bit; a row whose answer depends on them is patched exactly
    as without the gate."""
    version, model, atp, data = fair
    x = data.x_test[:600]
    meta = version.manifest["atpatch"]
    assert meta["row_gate"] == "counterfactual" and atp.gate is not None
    # which rows depend on the protected values, by explicit enumeration (the definition of UF)
    base = model(x).argmax(-1)
    dependent = torch.zeros(len(x), dtype=torch.bool)
    race, sex = meta["protected"]["race"], meta["protected"]["sex"]
    for r in race["values"]:
        for s in sex["values"]:
            twin = x.clone()
            twin[:, race["column"]], twin[:, sex["column"]] = r, s
            dependent |= model(twin).argmax(-1) != base
    assert torch.equal(atp.gate.dependent_rows(model, x), dependent)
    assert 0.05 < dependent.float().mean() < 0.6  # the model is unfair on some rows, not all

    gated = atp(x)
    gate, atp.gate = atp.gate, None
    try:
        every_row = atp(x)
    finally:
        atp.gate = gate
    assert torch.equal(gated.patched, dependent & every_row.patched)
    assert torch.equal(gated.logits[~dependent], model(x)[~dependent])
    assert torch.allclose(gated.logits[dependent], every_row.logits[dependent], atol=1e-5)
    # a request with no such row is answered by the gate's own bare pass: nothing patched
    fair_only = atp(x[~dependent][:32])
    assert not fair_only.patched.any()
    assert torch.allclose(fair_only.logits, model(x[~dependent][:32]), atol=1e-5)
    # and the build's held-out numbers show what gating saves: no more unfairness, and clean maps
    # (of rows no protected value decides) no longer flagged
    held = meta["held_out"]
    assert held["patched"]["defect_metric"] <= held["patched_without_gate"]["defect_metric"]
    assert meta["detector_metrics_ungated"]["fpr"] > 0.9
    assert meta["detector_metrics"]["fpr"] < 0.5
