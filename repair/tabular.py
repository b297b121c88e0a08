"""Tabular schema: how a record ``{feature: value}`` becomes the model's input row.

Stored in the manifest (``preprocessing``) so the server encodes requests exactly as training
did: numeric features standardised with the training mean/std, categorical values mapped
through the training vocabulary. Numeric features come first, then categorical, matching
:class:`repair.models.TabularFTTransformer`. Anything a client sends is checked here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch


class RecordError(ValueError):
    """A record that cannot be encoded (missing field, unknown category, NaN, ...)."""


@dataclass
class Feature:
    name: str
    kind: str  # "numeric" | "categorical"
    mean: float = 0.0
    std: float = 1.0
    categories: list[str] = field(default_factory=list)
    # numeric: "log1p" compresses heavy tails (capital gain/loss) before standardising
    transform: str = "none"
    # categorical built from a number (e.g. a protected age): ascending edges; a numeric value v
    # falls in bucket ``sum(v >= e for e in bins)`` and the category is that bucket's label
    bins: list[float] = field(default_factory=list)


@dataclass
class TabularSchema:
    features: list[Feature]
    protected: list[str] = field(default_factory=list)

    def __post_init__(self):
        kinds = [f.kind for f in self.features]
        if kinds != sorted(kinds, key=lambda k: k != "numeric"):
            raise ValueError("numeric features must come before categorical ones")
        self._index = {f.name: i for i, f in enumerate(self.features)}

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def n_numeric(self) -> int:
        return sum(f.kind == "numeric" for f in self.features)

    @property
    def cardinalities(self) -> list[int]:
        return [len(f.categories) for f in self.features if f.kind == "categorical"]

    def index(self, name: str) -> int:
        if name not in self._index:
            raise KeyError(f"unknown feature {name!r}; features: {', '.join(self.names)}")
        return self._index[name]

    def feature(self, name: str) -> Feature:
        return self.features[self.index(name)]

    def to_json(self) -> dict:
        return {"features": [asdict(f) for f in self.features], "protected": list(self.protected)}

    @classmethod
    def from_json(cls, data: dict) -> "TabularSchema":
        return cls([Feature(**f) for f in data["features"]], list(data.get("protected", [])))

    def encode_value(self, feature: Feature, value) -> float:
        if feature.kind == "numeric":
            if isinstance(value, bool):  # JSON true is not 1
                raise RecordError(f"feature {feature.name!r} must be a number, got {value!r}")
            if not isinstance(value, (int, float)):
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise RecordError(f"feature {feature.name!r} must be a number, got {value!r}") from None
            if not math.isfinite(value):
                raise RecordError(f"feature {feature.name!r} must be finite, got {value!r}")
            value = float(value)
            if feature.transform == "log1p":
                if value <= -1:
                    raise RecordError(f"feature {feature.name!r} must be > -1, got {value!r}")
                value = math.log1p(value)
            return (value - feature.mean) / (feature.std or 1.0)
        if feature.bins and isinstance(value, str) and value not in feature.categories:
            try:
                value = float(value)
            except ValueError:
                pass
        if feature.bins and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise RecordError(f"feature {feature.name!r} must be finite, got {value!r}")
            return float(sum(value >= e for e in feature.bins))
        value = str(value)
        try:
            return float(feature.categories.index(value))
        except ValueError:
            shown = ", ".join(feature.categories[:20])
            raise RecordError(f"feature {feature.name!r}: unknown category {value!r}; known: {shown}") from None

    def protected_values(self, name: str) -> list[float]:
        """Encoded values a protected attribute can take (UF enumerates them, AtPatch Eq. 4).

        Protected attributes are categorical (a protected age is bucketed, see ``bins``), so the
        values are the category ids.
        """
        f = self.feature(name)
        if f.kind != "categorical":
            raise ValueError(f"protected attribute {name!r} must be categorical (bucket it)")
        return [float(i) for i in range(len(f.categories))]

    def encode(self, records: list[dict]) -> torch.Tensor:
        """Encode records into a ``(B, F)`` float tensor; raises :class:`RecordError`."""
        rows = []
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise RecordError(f"record {i} must be an object of feature: value")
            missing = [f.name for f in self.features if f.name not in record]
            if missing:
                raise RecordError(f"record {i} is missing {', '.join(missing)}")
            extra = sorted(set(record) - set(self._index))
            if extra:
                raise RecordError(f"record {i} has unknown features {', '.join(extra)}")
            rows.append([self.encode_value(f, record[f.name]) for f in self.features])
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(self.features))

    def decode(self, row: torch.Tensor) -> dict:
        """The record a row encodes (numeric values de-standardised)."""
        out = {}
        for f, v in zip(self.features, row.tolist()):
            if f.kind == "numeric":
                v = v * (f.std or 1.0) + f.mean
                out[f.name] = math.expm1(v) if f.transform == "log1p" else v
            else:
                out[f.name] = f.categories[int(v)]
        return out
