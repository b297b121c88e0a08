"""Request and response bodies of the service's own endpoints (the v2 protocol has its own in
:mod:`server.v2`). Validation failures become 422 ``{"error": ...}`` in :mod:`server.errors`."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from offline.rectify import MAX_STRESS, MAX_TRANSPLANT, MIN_GAIN, STRESS, TRANSPLANT_SAMPLES, VALIDATION_SAMPLES

PatchMode = Literal["on", "off", "shadow"]


class PredictRequest(BaseModel):
    """Exactly one of ``images`` (base64 PNG/JPEG) or ``records`` ({feature: value})."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] | None = Field(default=None, min_length=1)
    records: list[dict[str, Any]] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.images is None) == (self.records is None):
            raise ValueError("send exactly one of 'images' (base64 PNG/JPEG) or 'records'")
        return self


class Shadow(BaseModel):
    """What ``?patch=shadow`` would have answered with the patch applied."""

    patched: bool
    patched_columns: list[tuple[int, int]]
    label: str
    class_index: int
    probabilities: list[float]
    changed: bool


class Prediction(BaseModel):
    label: str
    class_index: int
    probabilities: list[float]
    patched: bool
    patched_columns: list[tuple[int, int]]
    added_latency_ms: float
    shadow: Shadow | None = None


class PredictResponse(BaseModel):
    model_version: str
    predictions: list[Prediction]


# Pairs one /rectify request may carry (the largest n is 20).
MAX_PAIRS = 64


def _listed(value):
    """One image (or label) stands for a list of one."""
    return value if value is None or isinstance(value, list) else [value]


_Images = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_PAIRS),
                    BeforeValidator(_listed)]
_Labels = Annotated[list[Annotated[int, Field(ge=0)]] | None, Field(min_length=1), BeforeValidator(_listed)]


class RectifyRequest(BaseModel):
    """One clean/corrupt pair, or n pairs as two lists in the same order. Strict types: JSON
    ``true`` is not the number 1, nor ``"3"`` the label 3."""

    model_config = ConfigDict(extra="forbid", strict=True)
    clean: _Images = Field(description="base64 PNG/JPEG of the clean input, or a list (one per pair)")
    corrupt: _Images = Field(description="base64 PNG/JPEG of the corrupt input, or a list (one per pair)")
    label: _Labels = Field(default=None, description="the class the corrupt input(s) should get: one for "
                                                     "every pair or one per pair (default: the model's "
                                                     "answer to the clean input)")
    budget: float = Field(default=0.01, gt=0, lt=1, description="ε: tolerated accuracy drop")
    gap: float = Field(default=0.001, gt=0, lt=1, description="δ: target gap")
    validation: int = Field(default=VALIDATION_SAMPLES, ge=1, le=1_000_000,
                            description="training images (the last ones) on which ε is checked")
    stress: float = Field(default=STRESS, ge=0, le=MAX_STRESS,
                          description="amplification of the stressed pair that a round closing "
                                      "the gap must also help; 0: off (the paper's Algorithm 1)")
    candidates: int = Field(default=1, ge=1, le=16,
                            description="the localisation's top layers each round edits, keeping "
                                        "the one that leaves the stressed gap lowest; 1: the argmax")
    min_gain: float = Field(default=MIN_GAIN, ge=0, lt=1,
                            description="relative lowering of the gap a round must bring")
    transplant: int = Field(default=TRANSPLANT_SAMPLES, ge=0, le=MAX_TRANSPLANT,
                            description="clean training images that receive the pairs' corruption "
                                        "and join the pairs; 0: the pairs alone (the paper)")
    hold_anchors: bool = Field(default=False,
                               description="hold clean training images in place in every round, "
                                           "not only when a round broke the budget")
    confirm: bool = Field(default=False,
                          description="keep a round only if it also stays within ε on the "
                                      "`validation` training images before those ε is checked on")
    static: bool = False
    layer: str | None = Field(default=None, max_length=200)

    @field_validator("stress")
    @classmethod
    def _stress_off_or_above_one(cls, value: float) -> float:
        if 0 < value <= 1:
            raise ValueError("stress must be 0 (off) or greater than 1")
        return value

    @model_validator(mode="after")
    def _one_clean_and_one_corrupt_per_pair(self):
        n = len(self.clean)
        if len(self.corrupt) != n:
            raise ValueError(f"{n} clean and {len(self.corrupt)} corrupt images: send one of each per pair")
        if self.label is not None and len(self.label) not in (1, n):
            raise ValueError(f"{len(self.label)} labels for {n} pairs: send one label for all pairs "
                             "or one per pair")
        return self


class RectifyAccepted(BaseModel):
    job_id: str
    status_url: str
