"""AtPatch for fairness on the shared COMPAS FT-Transformer: the build's debugging set (Eq. 4),
the variant it chooses, and unfairness with the patch on."""
from __future__ import annotations

import itertools
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from offline.atpatch_build import MIN_SHIFT_ROWS, fit_fairness_prior, fit_logit_shift
from offline.datasets import load_dataset
from repair.atpatch.protected_prior import PriorError, ProtectedPrior, combination_index, fit_prior
from repair.atpatch.runtime import AtPatch, CounterfactualGate, PatchedModel, PatchResult, row_gate
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
    with _gate(atp, CounterfactualGate.from_protected(meta["protected"], meta["logit_shift"]["shift"])):
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

    masked = CounterfactualGate.from_protected(meta["protected"], meta["logit_shift"]["shift"])
    with _gate(atp, masked):
        gated = atp(x)
    with _gate(atp, None):
        every_row = atp(x)
    assert torch.equal(gated.patched, dependent & every_row.patched)
    assert torch.equal(gated.logits[~dependent], model(x)[~dependent])
    # the patched rows answer as without the gate, plus the build's logit shift where it fitted one
    if masked.logit_shift is not None:
        every_row.logits[every_row.patched] += masked.logit_shift
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


@contextmanager
def _gate(atp: AtPatch, gate):
    """``atp`` with another row gate for the block (the fixture's is shared)."""
    served, atp.gate = atp.gate, gate
    try:
        yield atp
    finally:
        atp.gate = served


class _FixedPatch:
    """Stands in for a gated AtPatch in ``fit_logit_shift``: fixed logits, rows it patches."""

    def __init__(self, logits: torch.Tensor, patched: torch.Tensor):
        self.logits, self.patched, self.removed = logits, patched, False

    def __call__(self, x: torch.Tensor) -> PatchResult:
        i = x[:, 0].long()  # the rows' indices
        flagged = self.patched[i][:, None, None].expand(-1, 1, 2)
        return PatchResult(self.logits[i], flagged.clone())

    def remove(self):
        self.removed = True


def test_logit_shift_is_fitted_on_patched_rows_and_served_only_where_it_helps():
    """A masked answer that leans to class 0 while most patched rows are class 1 gets a positive
    class-1 shift that makes them more accurate; unpatched rows do not count, and a shift that
    would not make the rows more accurate is not served."""
    g = torch.Generator().manual_seed(0)
    n = 400
    x = torch.arange(n, dtype=torch.float32)[:, None]
    y = (torch.rand(n, generator=g) < 0.7).long()
    margin = torch.randn(n, generator=g) + 2.0 * y - 1.0           # informative about y ...
    logits = torch.stack([torch.zeros(n), margin - 1.5], 1)        # ... but shifted towards class 0
    patched = torch.arange(n) % 4 != 0
    logits[~patched] = torch.tensor([9.0, -9.0])  # unpatched rows: confidently wrong if counted
    fake = _FixedPatch(logits, patched)
    fit = fit_logit_shift(fake, x, y, chunk=64)
    assert fake.removed and fit["rows"] == int(patched.sum())
    # the cross-entropy minimum over the patched rows alone, by a plain search
    grid = torch.arange(-5, 5, 0.01)
    ce = [F.cross_entropy(logits[patched] + torch.stack([torch.zeros(()), b]), y[patched]) for b in grid]
    best = float(grid[int(torch.stack(ce).argmin())])
    assert best > 1.0  # towards class 1
    assert fit["shift"] is not None and fit["shift"][0] == 0.0 and abs(fit["shift"][1] - best) < 0.02
    assert fit["accuracy"] > fit["accuracy_unshifted"] + 0.05

    # cross-entropy and accuracy disagree: 60 confidently wrong class-0 rows pull the shift below
    # -0.1, which turns 100 barely right class-1 rows wrong
    diff = torch.cat([torch.full((100,), 0.1), torch.full((60,), 5.0), torch.full((100,), -3.0)])
    labels = torch.cat([torch.ones(100), torch.zeros(160)]).long()
    skewed = torch.stack([torch.zeros(260), diff], 1)
    fit = fit_logit_shift(_FixedPatch(skewed, torch.ones(260, dtype=torch.bool)), x[:260], labels)
    assert fit["fitted"][1] < -0.1 and fit["accuracy"] < fit["accuracy_unshifted"] and fit["shift"] is None
    few = fit_logit_shift(_FixedPatch(logits, torch.arange(n) < MIN_SHIFT_ROWS - 1), x, y)
    assert few["shift"] is None and few["rows"] == MIN_SHIFT_ROWS - 1


def test_masked_patch_adds_the_builds_logit_shift_to_patched_rows_only(fair):
    """What the build decided (``manifest["atpatch"]["logit_shift"]``) is what the masked patch
    does: its shift (or none) on the rows it patches, every other row's logits untouched."""
    version, model, atp, data = fair
    meta = version.manifest["atpatch"]
    fit = meta["logit_shift"]
    assert fit["rows"] >= MIN_SHIFT_ROWS and fit["fitted_on"]
    assert (fit["shift"] is None) == (fit["accuracy"] <= fit["accuracy_unshifted"])
    gate = row_gate(dict(meta, fairness_answer={"chosen": "masked patch"}))  # the masked answer as served
    if fit["shift"] is None:
        assert gate.logit_shift is None
    else:
        assert gate.logit_shift.tolist() == pytest.approx(fit["shift"])
    x = data.x_test[:600]
    with _gate(atp, gate):
        served = atp(x)
    with _gate(atp, CounterfactualGate.from_protected(meta["protected"])):  # no shift
        unshifted = atp(x)
    assert torch.equal(served.patched, unshifted.patched) and served.patched.any()
    shift = torch.zeros(2) if gate.logit_shift is None else gate.logit_shift
    assert torch.equal(served.logits[~served.patched], unshifted.logits[~served.patched])
    assert torch.allclose(served.logits[served.patched], unshifted.logits[served.patched] + shift, atol=1e-6)


def test_fit_prior_learns_a_protected_value_that_other_features_give_away():
    """``P(a | x_o)``: where a categorical feature gives the protected value away (95 % of rows),
    the softmax regression says so; the protected column itself is not read; the stored tensors
    give back the same prior; a code outside a column's categories is an error."""
    g = torch.Generator().manual_seed(0)
    n = 2000
    numeric = torch.randn(n, generator=g)
    category = torch.randint(0, 3, (n,), generator=g)
    protected = ((category == 2) ^ (torch.rand(n, generator=g) < 0.05)).long()
    x = torch.stack([numeric, category.float(), protected.float()], 1)   # 1 numeric, cardinalities [3, 2]
    combos = torch.tensor([[0.0], [1.0]])
    prior = fit_prior(x, [2], combos, n_numeric=1, cardinalities=[3, 2])
    assert prior.weight.shape == (2, 1 + 3)   # the numeric column and category's one-hot; not the protected one
    p = prior.log_probs(x).exp()
    assert torch.allclose(p.sum(1), torch.ones(n), atol=1e-5)
    assert p[torch.arange(n), protected].mean() > 0.85
    assert p[category == 2, 1].mean() > 0.9 and p[category != 2, 0].mean() > 0.9
    swapped = x.clone()
    swapped[:, 2] = 1 - swapped[:, 2]
    assert torch.equal(prior.log_probs(swapped), prior.log_probs(x))   # twins get the same weights
    again = ProtectedPrior.from_tensors(prior.to_tensors())
    assert torch.equal(again.log_probs(x), prior.log_probs(x))
    bad = x[:4].clone()
    bad[0, 1] = 3.0
    with pytest.raises(PriorError, match="0..2"):
        prior.log_probs(bad)
    with pytest.raises(PriorError, match="distinct"):
        ProtectedPrior(prior.weight, prior.bias, [1], [1], [3], [2], combos)
    with pytest.raises(PriorError, match="lacks bias"):
        ProtectedPrior.from_tensors({k: v for k, v in prior.to_tensors().items() if k != "bias"})


def test_prior_follows_the_gates_order_of_protected_attributes():
    """A build enumerates race, sex, age in the order given; its manifest (sorted keys) gives the
    gate age, race, sex. The gate reorders the prior's combinations to its own, so each weight still
    belongs to its combination of values; a prior over other values is refused."""
    weight, bias = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), torch.arange(6.0)
    built = torch.tensor(list(itertools.product([0.0, 1.0, 2.0], [0.0, 1.0])))   # columns [5, 7]
    prior = ProtectedPrior(weight, bias, [0], [1], [3], [5, 7], built)
    gate = CounterfactualGate([7, 5], [[0.0, 1.0], [0.0, 1.0, 2.0]], prior=prior)   # columns [7, 5]
    for k, (v7, v5) in enumerate(gate.combos.tolist()):
        j = built.tolist().index([v5, v7])
        assert torch.equal(gate.prior.weight[k], weight[j]) and gate.prior.bias[k] == bias[j]
    with pytest.raises(PriorError, match="not the gate's"):
        CounterfactualGate([7, 5], [[0.0, 1.0], [0.0, 1.0, 3.0]], prior=prior)
    with pytest.raises(PriorError, match="gate enumerates"):
        CounterfactualGate([7, 6], [[0.0, 1.0], [0.0, 1.0, 2.0]], prior=prior)


def test_counterfactual_average_is_the_law_of_total_probability_and_leaves_twins_alike(fair):
    """With a prior, the gated rows are answered ``log Σ_k P(a_k | x_o) softmax(f(x with a_k))``
    (checked here combination by combination), every other row keeps the bare logits bit for bit,
    the protected tokens are reported flagged at every layer on exactly those rows, and UF is 0.
    The prior fitted on training rows predicts the held-out rows' race and sex better than their
    training shares do."""
    version, model, atp, data = fair
    meta = version.manifest["atpatch"]
    gate = CounterfactualGate.from_protected(meta["protected"])
    prior, held = fit_fairness_prior(model, gate, data.x_train, seed=0)
    average = CounterfactualGate.from_protected(meta["protected"], prior=prior)
    x = data.x_test[:600]
    with _gate(atp, average):
        out = atp(x)
        net = PatchedModel(atp)
        for name, p in meta["protected"].items():
            assert unfairness(model, x, p["column"], p["values"]) > 0.02
            assert unfairness(net, x, p["column"], p["values"]) == 0.0, name
    dependent = gate.dependent_rows(model, x)
    assert torch.equal(out.patched, dependent) and 0.05 < dependent.float().mean() < 0.6
    weights = prior.log_probs(x).exp()
    expected = torch.zeros(len(x), 2)
    for k, combo in enumerate(gate.combos):
        twin = x.clone()
        twin[:, gate.columns] = combo
        expected += weights[:, k:k + 1] * model(twin).softmax(-1)
    assert torch.allclose(out.logits[dependent].exp(), expected[dependent], atol=1e-5)
    assert torch.equal(out.logits[~dependent], model(x)[~dependent])
    tokens = [p["token"] for p in meta["protected"].values()]
    assert out.flagged[dependent][:, :, tokens].all()
    assert out.flagged.sum() == dependent.sum() * len(meta["layers"]) * len(tokens)
    # the prior is informative: held-out rows' own combination is likelier under it than by shares
    truth = combination_index(data.x_train[held], gate.columns, gate.combos)
    shares = torch.bincount(combination_index(data.x_train, gate.columns, gate.combos), minlength=len(gate.combos))
    by_shares = (shares.float() / shares.sum()).log()[truth].mean()
    assert prior.log_probs(data.x_train[held])[torch.arange(len(held)), truth].mean() > by_shares + 0.05


def test_build_serves_the_counterfactual_average_and_records_the_masked_patch_beside_it(fair):
    """``fairness_answer``: the version holds the prior and serves the average; the manifest
    records both answers' accuracy on the gated training rows the prior was not fitted on (the
    average's re-measured here with the prior refitted as the build fits it)."""
    version, model, atp, data = fair
    meta = version.manifest["atpatch"]
    record = meta["fairness_answer"]
    assert record["chosen"] == "counterfactual average" and version.has("protected_prior")
    assert atp.gate.prior is not None and record["rows"] > 20
    assert set(record["accuracy"]) == {"masked patch", "counterfactual average"}
    gate = CounterfactualGate.from_protected(meta["protected"])
    prior, held = fit_fairness_prior(model, gate, data.x_train, seed=version.manifest["provenance"]["seed"])
    assert record["prior_fitted_on"] == len(data.x_train) - len(held)
    assert torch.allclose(prior.weight, atp.gate.prior.weight, atol=1e-6)
    out = atp(data.x_train[held])
    right = out.logits[out.patched].argmax(-1) == data.y_train[held][out.patched]
    assert int(out.patched.sum()) == record["rows"]
    assert right.float().mean().item() == pytest.approx(record["accuracy"]["counterfactual average"], abs=1e-4)
