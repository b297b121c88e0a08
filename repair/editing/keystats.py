"""Key statistics per editable layer: ``C = K Kᵀ`` (uncentred), shrinkage, whitening (§3, §9).

``C`` is the mean second moment of the layer's keys over clean training data (the sum ``K Kᵀ``
divided by the number of keys, so its scale does not depend on the sample size). It is stored as
its leading eigenpairs ``C ≈ U diag(σ) Uᵀ + σ₀ (I − U Uᵀ)`` with ``σ₀`` the mean of the dropped
eigenvalues: exact when the key dimension is at most ``max_rank`` (every ViT/FT-Transformer
layer here), a spiked approximation for the wide ResNet convolutions (4608-dim keys would
need 85 MB per layer in full). Shrinkage ``C + λI`` with ``λ = shrinkage · tr(C)/n`` makes the
inverse and the ZCA whitening ``Z = C^{-1/2} = U Σ^{-1/2} Uᵀ`` (appendix §9, Eq. 19) well defined
where keys never vary (zero padding, dead channels).

Saved as ``keystats.safetensors``: ``<layer>.eigvecs``, ``<layer>.eigvals``, ``<layer>.floor``,
``<layer>.lam`` for every layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from repair.editing.layers import EditableLayer, capture_inputs_outputs


@dataclass
class LayerStats:
    eigvecs: torch.Tensor  # (n, r)
    eigvals: torch.Tensor  # (r,)
    floor: torch.Tensor    # () mean eigenvalue outside the kept subspace
    lam: torch.Tensor      # () shrinkage λ

    def _apply_power(self, k: torch.Tensor, power: float) -> torch.Tensor:
        """``(C + λI)^power`` applied to keys ``k`` of shape ``(..., n)``."""
        u = self.eigvecs.to(k)
        coef = k @ u                                   # (..., r)
        scale = (self.eigvals.to(k) + self.lam.to(k)) ** power
        rest = k - coef @ u.T
        return (coef * scale) @ u.T + rest * (self.floor.to(k) + self.lam.to(k)) ** power

    def inverse(self, k: torch.Tensor) -> torch.Tensor:
        """``C⁻¹ k`` (with shrinkage) for keys ``(..., n)``."""
        return self._apply_power(k, -1.0)

    def sqrt(self, k: torch.Tensor) -> torch.Tensor:
        """``C^{1/2} k = Z⁻¹ k`` (back from the whitened space)."""
        return self._apply_power(k, 0.5)

    def whiten(self, k: torch.Tensor) -> torch.Tensor:
        """``Z k = C^{-1/2} k`` (ZCA whitening, appendix §9)."""
        return self._apply_power(k, -0.5)


@torch.no_grad()
def compute_keystats(model: nn.Module, layers: list[EditableLayer], x: torch.Tensor,
                     batch_size: int = 128, shrinkage: float = 1e-2, max_rank: int = 256,
                     progress: bool = True) -> dict[str, LayerStats]:
    """Second moments of every layer's keys over clean inputs ``x`` (one pass over the data)."""
    device = next(model.parameters()).device
    sums = {layer.name: None for layer in layers}
    grams: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    counts = {layer.name: 0 for layer in layers}
    for start in tqdm(range(0, len(x), batch_size), desc="key statistics", disable=not progress,
                      leave=False):
        with capture_inputs_outputs(layers) as rec:
            model(x[start:start + batch_size].to(device))
        for layer in layers:
            k = layer.keys(rec[layer.name][0]).reshape(-1, layer.key_dim).double()
            counts[layer.name] += len(k)
            if layer.key_dim <= 2 * max_rank:
                c = k.T @ k
                sums[layer.name] = c if sums[layer.name] is None else sums[layer.name] + c
            else:  # wide keys: keep them and factor the smaller Gram matrix if that is cheaper
                grams[layer.name].append(k.float().cpu())
    return {layer.name: _factor(layer, sums[layer.name], grams[layer.name], counts[layer.name],
                                shrinkage, max_rank) for layer in layers}


def _factor(layer: EditableLayer, c_sum, keys: list[torch.Tensor], count: int, shrinkage: float,
            max_rank: int) -> LayerStats:
    n = layer.key_dim
    if c_sum is not None:
        vals, vecs = torch.linalg.eigh(c_sum / count)
    else:
        k = torch.cat(keys).double()
        if len(k) < n:  # eigenpairs of K Kᵀ from the (N×N) Gram matrix Kᵀ K
            gvals, gvecs = torch.linalg.eigh(k @ k.T)
            gvals = gvals.clamp_min(0)
            vecs = (k.T @ gvecs) / gvals.clamp_min(1e-12).sqrt()
            vals = gvals / count
        else:
            vals, vecs = torch.linalg.eigh(k.T @ k / count)
    vals = vals.clamp_min(0)
    trace = vals.sum()
    order = vals.argsort(descending=True)[:max_rank]
    kept = vals[order]
    floor = (trace - kept.sum()).clamp_min(0) / max(n - len(kept), 1)
    lam = shrinkage * trace / n
    return LayerStats(vecs[:, order].float().contiguous(), kept.float(), floor.float(), lam.float())


def stats_to_tensors(stats: dict[str, LayerStats]) -> dict[str, torch.Tensor]:
    out = {}
    for name, s in stats.items():
        out.update({f"{name}.eigvecs": s.eigvecs, f"{name}.eigvals": s.eigvals,
                    f"{name}.floor": s.floor.reshape(()), f"{name}.lam": s.lam.reshape(())})
    return out


def stats_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, LayerStats]:
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return {n: LayerStats(tensors[f"{n}.eigvecs"], tensors[f"{n}.eigvals"], tensors[f"{n}.floor"],
                          tensors[f"{n}.lam"]) for n in names}
