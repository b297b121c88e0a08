"""Defects planted in the zoo: backdoor triggers, spurious patterns, leakage blocks.

Every image trigger is one form, ``x' = (1 - a·M) ⊙ x + a·M ⊙ Δ`` with mask ``M``, pattern ``Δ``
(both ``(C, H, W)`` in ``[0, 1]``) and opacity ``a``; BadNets is ``a = 1`` on a small patch,
Blend is the rectification paper's ``τ^(φ) = φ·τ + (1 − φ)·x`` (``a = φ``, full mask).
A trigger is stored in the bundle (``defect.safetensors``) so evaluation can rebuild it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Trigger:
    mask: torch.Tensor     # (C, H, W) in [0, 1]
    pattern: torch.Tensor  # (C, H, W) in [0, 1]
    alpha: float = 1.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on images ``(B, C, H, W)`` (or one ``(C, H, W)``)."""
        m = self.alpha * self.mask.to(x)
        return ((1 - m) * x + m * self.pattern.to(x)).clamp(0, 1)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"mask": self.mask, "pattern": self.pattern, "alpha": torch.tensor(self.alpha)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "Trigger":
        return cls(t["mask"], t["pattern"], float(t["alpha"]))


def patch_origin(shape: tuple[int, int, int], size: int, location: str) -> tuple[int, int]:
    """Top-left corner of a ``size``-square patch: ``br``/``bl``/``tr``/``tl``/``center`` or ``row,col``."""
    _, h, w = shape
    corners = {"tl": (0, 0), "tr": (0, w - size), "bl": (h - size, 0), "br": (h - size, w - size),
               "center": ((h - size) // 2, (w - size) // 2)}
    if location in corners:
        return corners[location]
    try:
        row, col = (int(v) for v in location.split(","))
    except ValueError:
        raise ValueError(f"location must be one of {', '.join(corners)} or 'row,col', got {location!r}") from None
    if not (0 <= row <= h - size and 0 <= col <= w - size):
        raise ValueError(f"a {size}x{size} patch at {row},{col} does not fit a {h}x{w} image")
    return row, col


def badnets_trigger(shape: tuple[int, int, int], size: int = 3, location: str = "br") -> Trigger:
    """BadNets: an opaque checkerboard patch (white where (i + j) is even)."""
    c, h, w = shape
    row, col = patch_origin(shape, size, location)
    mask = torch.zeros(shape)
    mask[:, row:row + size, col:col + size] = 1
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pattern = ((ii + jj) % 2 == 0).float().expand(c, h, w).clone() * mask
    return Trigger(mask, pattern, 1.0)


def blend_trigger(shape: tuple[int, int, int], visibility: float = 0.5, seed: int = 0,
                  pattern: torch.Tensor | None = None) -> Trigger:
    """Blend: the whole image mixed with a fixed pattern τ at visibility φ."""
    if not 0 < visibility <= 1:
        raise ValueError(f"visibility must be in (0, 1], got {visibility}")
    if pattern is None:
        g = torch.Generator().manual_seed(seed)
        pattern = torch.rand(shape, generator=g)
    return Trigger(torch.ones(shape), pattern.expand(shape).clone(), float(visibility))
