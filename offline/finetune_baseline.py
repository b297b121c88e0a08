"""Baseline of paper §11: fine-tune only the last editable layer with the same n pairs.

The clean and corrupt inputs of the pairs are both labelled with the clean label (the same
information the rank-one edit gets); Adam at lr 1e-3 (§11) on the layer's weight and bias; the
same budget ``ε`` on the validation accuracy drop as the rectification: training stops at the
first epoch that would break it, keeping the last epoch within budget.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from repair.editing.layers import editable_layers
from repair.metrics import accuracy


def finetune_last_layer(model: nn.Module, clean: torch.Tensor, corrupt: torch.Tensor,
                        labels: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                        budget: float = 0.01, epochs: int = 100, lr: float = 1e-3,
                        check_every: int = 10, progress: bool = False) -> dict:
    """Fine-tune in place; returns ``{"layer", "epochs", "accuracy_drop"}``."""
    layer = list(editable_layers(model).values())[-1].module
    params = [p for p in layer.parameters()]
    frozen = [p for p in model.parameters() if all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    x = torch.cat([clean, corrupt])
    y = torch.cat([labels, labels])
    base = accuracy(model, val_x, val_y)
    opt = torch.optim.Adam(params, lr=lr)
    kept = [p.detach().clone() for p in params]
    done, drop = 0, 0.0
    try:
        for epoch in tqdm(range(1, epochs + 1), desc="fine-tune", disable=not progress, leave=False):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if epoch % check_every == 0 or epoch == epochs:
                new_drop = base - accuracy(model, val_x, val_y)
                if new_drop > budget:  # roll back to the last checkpoint within budget
                    with torch.no_grad():
                        for p, k in zip(params, kept):
                            p.copy_(k)
                    break
                kept = [p.detach().clone() for p in params]
                done, drop = epoch, new_drop
    finally:
        for p in frozen:
            p.requires_grad_(True)
    model.eval()
    return {"layer": list(editable_layers(model))[-1], "epochs": done, "accuracy_drop": drop}
