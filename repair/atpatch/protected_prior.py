"""P(protected values | the row's other features): what a fairness build's counterfactual average
weighs the model's answers with (``CounterfactualGate``, ``average_answer``).

The gated rows of a fairness build (those whose answer the protected values decide) need one
answer for a row and all its twins. The answer a model blind to the protected attributes would
best give, if the model's probabilities are right, is the law of total probability over them:

    P(y | x_o) = Σ_a P(a | x_o) · P(y | x_o, a)

with ``x_o`` the other features and ``a`` a combination of protected values (Eq. 4's
enumeration). ``P(y | x_o, a)`` is the bare model on the row with ``a`` swapped in, which the gate
computes anyway; ``P(a | x_o)`` is this module: a softmax regression on the other features
(numeric ones as encoded, categorical ones one-hot), fitted on training rows. ``x_o`` is the same
for a row and its twins, so they get the same answer and UF is 0 by construction.

Why conditional and not the combinations' training shares: marital status, relationship and
education say much about age. Adult (age), whole test set, UF 0 either way: −0.16 pt with
``P(a | x_o)``, −0.51 pt with the shares (``bench/results/atpatch_tabular.md``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# L2 penalty on the weights per training row; keeps rare one-hot categories from taking extreme weights.
WEIGHT_DECAY = 1e-4


class PriorError(ValueError):
    """A stored prior that does not fit the model or the protected values it is served with."""


class ProtectedPrior:
    """``P(a | x_o)`` for the ``K`` combinations ``combos`` (K, P) of the protected ``columns``
    (P,): ``weight`` (K, D), ``bias`` (K,), over the features ``D`` = the numeric ``numeric``
    columns as they are plus one-hot ``categorical`` columns of ``cardinalities`` categories
    (protected columns left out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, numeric: list[int], categorical: list[int],
                 cardinalities: list[int], columns: list[int], combos: torch.Tensor):
        self.weight, self.bias = weight, bias
        self.numeric, self.categorical, self.cardinalities = list(numeric), list(categorical), list(cardinalities)
        self.columns, self.combos = list(columns), combos.float()
        width = len(self.numeric) + sum(self.cardinalities)
        if weight.ndim != 2 or weight.shape[1] != width or bias.shape != (weight.shape[0],) \
                or len(self.categorical) != len(self.cardinalities) or min(self.cardinalities, default=1) < 1 \
                or self.combos.shape != (weight.shape[0], len(self.columns)):
            raise PriorError(f"protected prior: weight {tuple(weight.shape)}, bias {tuple(bias.shape)} and "
                             f"combinations {tuple(self.combos.shape)} do not fit {len(self.numeric)} numeric and "
                             f"{len(self.categorical)} categorical features and {len(self.columns)} protected ones")
        columns = self.numeric + self.categorical
        if len(set(columns)) != len(columns) or min(columns, default=0) < 0:
            raise PriorError(f"protected prior: feature columns must be distinct and non-negative, got {columns}")

    @property
    def n_combinations(self) -> int:
        return self.weight.shape[0]

    def aligned(self, columns: list[int], combos: torch.Tensor) -> "ProtectedPrior":
        """The same prior with its combinations in the order of ``combos`` (K, P) over ``columns``.
        Why: a gate enumerates the protected attributes in its manifest's order, which the
        manifest's sorted keys may change from the build's (Adult race, sex, age → age, race, sex)."""
        if sorted(columns) != sorted(self.columns) or len(combos) != self.n_combinations:
            raise PriorError(f"the protected prior is over columns {self.columns} ({self.n_combinations} "
                             f"combinations), the gate enumerates {list(columns)} ({len(combos)})")
        mine = self.combos[:, [self.columns.index(c) for c in columns]]
        match = (combos.float()[:, None, :] == mine[None]).all(-1)            # (K gate, K prior)
        if not bool((match.sum(1) == 1).all()):
            raise PriorError("the protected prior's combinations of values are not the gate's")
        order = match.float().argmax(1)
        return ProtectedPrior(self.weight[order], self.bias[order], self.numeric, self.categorical,
                              self.cardinalities, list(columns), combos)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D): the encoded rows' other features as the regression reads them. Categorical
        codes outside a column's categories are errors (the schema never encodes one)."""
        parts = [x[:, self.numeric]]
        for column, n in zip(self.categorical, self.cardinalities):
            codes = x[:, column].long()
            if len(codes) and (codes.min() < 0 or codes.max() >= n):
                raise PriorError(f"column {column}: categorical codes must lie in 0..{n - 1}")
            parts.append(F.one_hot(codes, n).to(x.dtype))
        return torch.cat(parts, 1)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K): log P(a_k | x_o) for every row."""
        return (self.features(x) @ self.weight.to(x).T + self.bias.to(x)).log_softmax(-1)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.contiguous(), "bias": self.bias.contiguous(),
                "columns": torch.tensor(self.columns, dtype=torch.int64), "combos": self.combos.contiguous(),
                "numeric": torch.tensor(self.numeric, dtype=torch.int64),
                "categorical": torch.tensor(self.categorical, dtype=torch.int64),
                "cardinalities": torch.tensor(self.cardinalities, dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "ProtectedPrior":
        missing = sorted({"weight", "bias", "numeric", "categorical", "cardinalities", "columns", "combos"}
                         - set(tensors))
        if missing:
            raise PriorError(f"protected_prior.safetensors lacks {', '.join(missing)}")
        return cls(tensors["weight"].float(), tensors["bias"].float(), tensors["numeric"].tolist(),
                   tensors["categorical"].tolist(), tensors["cardinalities"].tolist(), tensors["columns"].tolist(),
                   tensors["combos"])


def combination_index(x: torch.Tensor, columns: list[int], combos: torch.Tensor) -> torch.Tensor:
    """(N,) the combination of protected values each row holds (the nearest one: a numeric
    protected attribute is enumerated at quantiles, which a row need not hold exactly)."""
    return torch.cdist(x[:, columns].float(), combos.float()).argmin(1)


def fit_prior(x: torch.Tensor, columns: list[int], combos: torch.Tensor, n_numeric: int,
              cardinalities: list[int]) -> ProtectedPrior:
    """Fit ``P(a | x_o)`` on the encoded training rows ``x`` (numeric features first, then the
    categorical ones with ``cardinalities``, as the FT-Transformer reads them) by L-BFGS on the
    cross-entropy plus ``WEIGHT_DECAY``·‖W‖² (convex)."""
    numeric = [i for i in range(n_numeric) if i not in columns]
    categorical = [(n_numeric + j, n) for j, n in enumerate(cardinalities) if n_numeric + j not in columns]
    k = len(combos)
    width = len(numeric) + sum(n for _, n in categorical)
    prior = ProtectedPrior(torch.zeros(k, width), torch.zeros(k), numeric, [c for c, _ in categorical],
                           [n for _, n in categorical], columns, combos)
    features, target = prior.features(x), combination_index(x, columns, combos)
    weight = torch.zeros(k, width, requires_grad=True)
    # start at the combinations' training shares (all of them seen at least once, else a tiny floor)
    share = torch.bincount(target, minlength=k).float().clamp(min=0.5)
    bias = (share / share.sum()).log().requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = F.cross_entropy(features @ weight.T + bias, target) + WEIGHT_DECAY * weight.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    return ProtectedPrior(weight.detach(), bias.detach(), prior.numeric, prior.categorical, prior.cardinalities,
                          columns, combos)
