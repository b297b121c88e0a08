"""Model-level metrics shared by both methods and the server's evaluation.

- accuracy: share of inputs classified as their label;
- attack success rate (ASR): among triggered inputs whose true label is *not* the target,
  the share classified as the target (AtPatch §4.1, rectification Table 1);
- ASR to the worst class: the same share for whichever class receives the most triggered inputs
  of other classes. It equals ASR while the backdoor points at its target, and stays high when a
  repair only moves the trigger's answer to another class (a rectification fitted to one pair can
  send every triggered input to that pair's class: ASR 0, the backdoor intact);
- unfairness (UF): share of rows whose prediction changes when only one protected attribute
  is changed to another value (AtPatch §4.1, individual fairness).
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted class indices, in batches, on the model's device."""
    device = next(model.parameters()).device
    out = [model(x[i:i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(model, x) == y).float().mean().item()


def attack_success_rate(model: nn.Module, x_triggered: torch.Tensor, y_true: torch.Tensor,
                        target: int) -> float:
    keep = y_true != target
    if not keep.any():
        raise ValueError("ASR needs triggered inputs whose true label is not the target")
    return (predict(model, x_triggered[keep]) == target).float().mean().item()


def worst_class_asr(model: nn.Module, x_triggered: torch.Tensor,
                    y_true: torch.Tensor) -> tuple[float, int]:
    """The largest ASR over all classes taken as the target, and that class."""
    pred = predict(model, x_triggered)
    classes = int(max(pred.max(), y_true.max())) + 1
    wrong_answers = torch.bincount(pred[pred != y_true], minlength=classes)
    other_inputs = len(y_true) - torch.bincount(y_true, minlength=classes)
    rates = wrong_answers / other_inputs.clamp_min(1)
    worst = int(rates.argmax())
    return rates[worst].item(), worst


def unfairness(model: nn.Module, x: torch.Tensor, column: int, values: list[float]) -> float:
    """UF for one protected attribute: ``column`` of encoded rows takes each of ``values``.

    A row counts as unfair when any other value of the attribute changes its prediction.
    """
    base = predict(model, x)
    changed = torch.zeros(len(x), dtype=torch.bool)
    for v in values:
        swapped = x.clone()
        swapped[:, column] = v
        differs = x[:, column] != v
        changed |= differs & (predict(model, swapped) != base)
    return changed.float().mean().item()
