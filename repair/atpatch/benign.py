"""Benign attention columns Q (AtPatch Eq. 10): the mean map of clean samples, per layer.

``Q^(l)`` has shape ``(Nq_l, N)``: row ``i``, column ``k`` is the average attention query ``i`` pays
to token ``k`` over clean samples and heads (head average as Eq. 5). Γ takes column ``k`` of it.
"""
from __future__ import annotations

import torch


def benign_columns(clean_maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """``clean_maps[l]``: head-averaged ``(M, Nq, N)`` of clean samples → ``[Q^(l)]``."""
    if not clean_maps or any(len(m) == 0 for m in clean_maps):
        raise ValueError("benign columns need at least one clean attention map per layer")
    return [m.mean(0) for m in clean_maps]


def to_tensors(benign: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"layer{l}": q.contiguous() for l, q in enumerate(benign)}


def from_tensors(tensors: dict[str, torch.Tensor], n_layers: int) -> list[torch.Tensor]:
    missing = [f"layer{l}" for l in range(n_layers) if f"layer{l}" not in tensors]
    if missing:
        raise ValueError(f"benign.safetensors lacks {', '.join(missing)}")
    return [tensors[f"layer{l}"] for l in range(n_layers)]
