"""Request and response bodies of the service's own endpoints (the v2 protocol has its own in
:mod:`server.v2`). Validation failures become 422 ``{"error": ...}`` in :mod:`server.errors`."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from offline.rectify import MAX_STRESS, MIN_GAIN, STRESS, VALIDATION_SAMPLES

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


class RectifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clean: str = Field(min_length=1, description="base64 PNG/JPEG of the clean input")
    corrupt: str = Field(min_length=1, description="base64 PNG/JPEG of the corrupt input")
    label: int | None = Field(default=None, ge=0)
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
    static: bool = False
    layer: str | None = Field(default=None, max_length=200)

    @field_validator("stress")
    @classmethod
    def _stress_off_or_above_one(cls, value: float) -> float:
        if 0 < value <= 1:
            raise ValueError("stress must be 0 (off) or greater than 1")
        return value


class RectifyAccepted(BaseModel):
    job_id: str
    status_url: str
