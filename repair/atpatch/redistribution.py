"""The hot patch Γ (AtPatch Eq. 11), for any set of flagged columns at once.

For every row ``i`` of a map ``A`` with flagged columns ``K``:
``B_i = (1 - Σ_k Q_ik) / (1 - Σ_k A_ik) · (A_i ⊙ M_K) + Σ_k Q_ik e_k``: flagged columns get the
benign values ``Q``, the other columns are rescaled so the row still sums to 1. The masked variant
is the same with ``Q_k = 0`` (the flagged token is cut out, the rest renormalised); ``rescale=False``
is the paper's "w/o Rec." ablation (overwrite only). Vectorised over batch, heads, rows and
columns; samples with nothing flagged are returned bit-for-bit (``torch.where`` on a per-sample flag,
so no host-device sync).
"""
from __future__ import annotations

import torch

VARIANTS = ("replace", "masked")
# Below this, a row put (almost) all its mass on flagged columns: spread the rest uniformly.
_DEGENERATE = 1e-6


def redistribute(attn: torch.Tensor, flags: torch.Tensor, benign: torch.Tensor | None,
                 rescale: bool = True) -> torch.Tensor:
    """Γ over ``attn`` ``(B, H, Nq, N)``; ``flags`` bool ``(B, N)``; ``benign`` ``(Nq, N)`` or ``None`` (masked)."""
    m = flags[:, None, None, :].to(attn.dtype)            # (B, 1, 1, N)
    keep = 1 - m
    rest = attn * keep
    q = benign.to(attn.dtype) * m if benign is not None else None  # (B, 1, Nq, N)
    if rescale:
        target = 1 - q.sum(-1, keepdim=True) if q is not None else 1.0
        rest_sum = rest.sum(-1, keepdim=True)
        uniform = keep / keep.sum(-1, keepdim=True).clamp_min(1)
        ok = rest_sum > _DEGENERATE
        rest = torch.where(ok, rest, uniform)
        # Eq. 11's 1 - A_ik + ε is rest_sum in exact arithmetic; the degenerate case is handled above.
        rest = rest * (target / torch.where(ok, rest_sum, torch.ones_like(rest_sum)))
    out = rest + q if q is not None else rest
    return torch.where(flags.any(-1)[:, None, None, None], out, attn)
