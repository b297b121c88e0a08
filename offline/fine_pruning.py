"""Fine-Pruning baseline (Liu et al. 2018; compared with in AtPatch Table 2).

Prune the last block's dormant MLP neurons (lowest mean activation on clean data) and fine-tune on
clean data with the pruned neurons held at zero. Works on the timm ViT (``blocks[-1].mlp.fc1``)
and the FT-Transformer (last block's first FFN linear).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from offline.training import train_classifier


def _last_hidden(model: nn.Module) -> nn.Linear:
    if hasattr(model, "blocks"):
        return model.blocks[-1].mlp.fc1
    if hasattr(model, "net"):
        return model.net.backbone.blocks[-1]["ffn"].linear1
    raise ValueError(f"fine-pruning knows no last MLP layer for {type(model).__name__}")


@torch.no_grad()
def _mean_activation(model: nn.Module, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    acts = []
    h = layer.register_forward_hook(lambda _m, _i, out: acts.append(out.relu().flatten(0, -2).mean(0)))
    try:
        for i in range(0, len(x), 256):
            model(x[i:i + 256])
    finally:
        h.remove()
    return torch.stack(acts).mean(0)


def fine_prune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ratio: float = 0.7,
               epochs: int = 5, lr: float = 1e-3, seed: int = 0, progress: bool = False) -> nn.Module:
    """A pruned and fine-tuned copy of ``model``; ``ratio`` of the last MLP's neurons are pruned."""
    if not 0 < ratio < 1:
        raise ValueError(f"prune ratio must be in (0, 1), got {ratio}")
    model = copy.deepcopy(model).eval()
    layer = _last_hidden(model)
    act = _mean_activation(model, layer, x)
    pruned = act.argsort()[: int(ratio * len(act))]
    keep = torch.ones(len(act))
    keep[pruned] = 0
    with torch.no_grad():
        layer.weight[pruned] = 0
        if layer.bias is not None:
            layer.bias[pruned] = 0
    # The mask stays on during fine-tuning, so pruned neurons cannot come back.
    handle = layer.register_forward_hook(lambda _m, _i, out: out * keep.to(out))
    train_classifier(model, x, y, epochs=epochs, lr=lr, seed=seed, progress=progress, desc="fine-pruning")
    handle.remove()
    with torch.no_grad():
        layer.weight[pruned] = 0
        if layer.bias is not None:
            layer.bias[pruned] = 0
    return model.eval()
