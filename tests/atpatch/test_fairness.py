"""AtPatch for fairness on the shared COMPAS FT-Transformer: the build's debugging set (Eq. 4),
the variant it chooses, and unfairness with the patch on."""
from __future__ import annotations

import pytest

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
    protected tokens on every row: the accuracy cost is measured in bench/results/atpatch_tabular.md."""
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
