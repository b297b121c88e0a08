"""The Debugging Set (AtPatch §3.2): paired clean/defective attention maps with column labels.

- backdoor (§3.2.1): clean images ``x`` and ``x'`` = ``x`` with the (inverted) trigger; only pairs
  where the trigger works (``f(x) != target``, ``f(x') = target``) are kept. Columns of the tokens
  the trigger mask covers are labelled anomalous in the layers where they are over-attended
  (their mean attention in ``x'`` exceeds ``excess`` times that in ``x``). Measured on the issue's
  digits ViT, the real trigger's columns drew ~50x the attention of other columns in the first
  layer and no excess in later ones; labelling them where they draw none would teach the Detector
  to flag clean-looking maps. ``excess`` = 1.5: on the Fashion-MNIST Trojan ViT the inverted
  trigger drew 1.87x in the first layer, the one where patching works; at 2.0 that layer went
  unlabelled and the real trigger's ASR stayed at 100 %, at 1.5 it fell to 10.7 %
  (``bench/results/atpatch_fashion-trojan.md``).
- fairness (§3.2.2, Eq. 4): every other value of each protected attribute; rows whose
  prediction flips are bias samples, each paired with the clean row (no flip) of the same
  protected value at minimum Hamming distance; the attribute's token column is anomalous at every
  layer (there is no excess to select layers by).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from repair.attention import attention_maps
from repair.metrics import predict


class DebugSetError(ValueError):
    """No usable pairs (the trigger never works, no prediction ever flips, ...)."""


@dataclass
class DebugSet:
    maps: list[torch.Tensor]     # per layer: head-averaged (M, Nq, N)
    labels: list[torch.Tensor]   # per layer: (M, N) in {0, 1}
    partner: torch.Tensor        # (M,): index of each map's counterpart
    clean: torch.Tensor          # bool (M,): clean side of a pair
    info: dict = field(default_factory=dict)
    rows: torch.Tensor | None = None  # fairness: the encoded input row of each map (M, F)

    def __len__(self) -> int:
        return len(self.partner)

    def clean_maps(self) -> list[torch.Tensor]:
        return [m[self.clean] for m in self.maps]


def _pair(maps_c: list[torch.Tensor], maps_b: list[torch.Tensor], labels_b: list[torch.Tensor],
          info: dict, rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> DebugSet:
    n = len(maps_c[0])
    maps = [torch.cat([c, b]) for c, b in zip(maps_c, maps_b)]
    labels = [torch.cat([torch.zeros_like(y), y]) for y in labels_b]
    partner = torch.cat([torch.arange(n) + n, torch.arange(n)])
    clean = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    return DebugSet(maps, labels, partner, clean, info, torch.cat(rows) if rows is not None else None)


def patch_tokens(mask: torch.Tensor, patch_size: int, prefix: int = 1, frac: float = 0.5) -> list[int]:
    """Tokens whose patch holds at least ``frac`` of the heaviest patch's mask mass (row-major)."""
    mass = mask.float().sum(0)
    h, w = mass.shape
    per_patch = mass.reshape(h // patch_size, patch_size, w // patch_size, patch_size).sum((1, 3)).flatten()
    if per_patch.max() <= 0:
        raise DebugSetError("the trigger mask is empty")
    return (per_patch >= frac * per_patch.max()).nonzero().flatten().add(prefix).tolist()


def excess_layers(maps_c: list[torch.Tensor], maps_b: list[torch.Tensor], tokens: list[int],
                  excess: float) -> tuple[list[int], list[float]]:
    """Layers where the tokens' columns draw more than ``excess`` x their clean attention."""
    ratios = [(b[:, :, tokens].mean() / c[:, :, tokens].mean().clamp_min(1e-12)).item()
              for c, b in zip(maps_c, maps_b)]
    return [l for l, r in enumerate(ratios) if r > excess], ratios


def pair_labels(maps_c, maps_b, tokens: list[int], layers: list[int], excess: float) -> list[torch.Tensor]:
    """Per map (the delta of one pair): the trigger's columns are anomalous where they draw more
    than ``excess`` x the attention they draw in the clean counterpart, in the over-attended layers."""
    labels = []
    for l, (mc, mb) in enumerate(zip(maps_c, maps_b)):
        y = torch.zeros(len(mb), mb.shape[-1])
        if l in layers:
            over = mb[:, :, tokens].mean(1) > excess * mc[:, :, tokens].mean(1)   # (M, T)
            y[:, tokens] = over.float()
        labels.append(y)
    return labels


def backdoor_set(model: nn.Module, x: torch.Tensor, apply_trigger, mask: torch.Tensor, target: int,
                 patch_size: int, prefix: int = 1, excess: float = 1.5) -> DebugSet:
    """Clean/triggered pairs (§3.2.1) from clean images ``x``; ``apply_trigger(x) -> x'``."""
    x_bad = apply_trigger(x)
    keep = (predict(model, x) != target) & (predict(model, x_bad) == target)
    if keep.sum() < 2:
        raise DebugSetError(f"the trigger sends only {int(keep.sum())} clean images to class {target}")
    maps_c, maps_b = attention_maps(model, x[keep]), attention_maps(model, x_bad[keep])
    tokens = patch_tokens(mask, patch_size, prefix)
    layers, ratios = excess_layers(maps_c, maps_b, tokens, excess)
    if not layers:  # no over-attention anywhere: fall back to the paper's every-layer labels
        layers = list(range(len(maps_c)))
    labels = pair_labels(maps_c, maps_b, tokens, layers, excess)
    return _pair(maps_c, maps_b, labels, {"defect_kind": "backdoor", "tokens": tokens,
                                          "layers": layers, "excess_ratio": [round(r, 3) for r in ratios],
                                          "pairs": int(keep.sum())})


@dataclass
class Protected:
    name: str
    column: int           # column of the encoded row
    token: int            # its token in the attention map
    values: list[float]   # every encoded value it can take


def flipped_rows(model: nn.Module, x: torch.Tensor, attr: Protected) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4: all ``x'`` = ``x`` with another value of ``attr`` whose prediction differs, and the
    mask of rows of ``x`` that no such change flips (the clean rows)."""
    base = predict(model, x)
    flips, clean = [], torch.ones(len(x), dtype=torch.bool)
    for v in attr.values:
        other = x[:, attr.column] != v
        swapped = x.clone()
        swapped[:, attr.column] = v
        changed = other & (predict(model, swapped) != base)
        clean &= ~changed
        flips.append(swapped[changed])
    return torch.cat(flips), clean


def nearest_clean(bias: torch.Tensor, clean: torch.Tensor, column: int) -> torch.Tensor:
    """Index into ``clean`` of the row with the same protected value at minimum Hamming distance."""
    out = torch.empty(len(bias), dtype=torch.long)
    for i in range(0, len(bias), 256):
        b = bias[i:i + 256]
        dist = (b[:, None, :] != clean[None, :, :]).sum(-1).float()
        dist[b[:, None, column] != clean[None, :, column]] = torch.inf
        out[i:i + 256] = dist.argmin(1)
    return out


def fairness_set(model: nn.Module, x: torch.Tensor, attrs: list[Protected],
                 max_pairs: int = 2000, seed: int = 0) -> DebugSet:
    """Clean-bias pairs (§3.2.2) for every protected attribute, labelled at every layer."""
    g = torch.Generator().manual_seed(seed)
    bias_rows, clean_rows, tokens_of = [], [], []
    for attr in attrs:
        bias, clean_mask = flipped_rows(model, x, attr)
        if len(bias) == 0:
            continue
        bias = bias[torch.randperm(len(bias), generator=g)[: max_pairs // len(attrs)]]
        clean = x[clean_mask]
        has_match = (bias[:, None, attr.column] == clean[None, :, attr.column]).any(1)
        bias = bias[has_match]
        if len(bias) == 0:
            continue
        bias_rows.append(bias)
        clean_rows.append(clean[nearest_clean(bias, clean, attr.column)])
        tokens_of.append(torch.full((len(bias),), attr.token))
    if not bias_rows:
        raise DebugSetError("no protected-attribute change flips any prediction: nothing to debug")
    x_b, x_c, tok = torch.cat(bias_rows), torch.cat(clean_rows), torch.cat(tokens_of)
    maps_c, maps_b = attention_maps(model, x_c), attention_maps(model, x_b)
    labels = []
    for mb in maps_b:
        y = torch.zeros(len(mb), mb.shape[-1])
        y[torch.arange(len(mb)), tok] = 1
        labels.append(y)
    info = {"defect_kind": "fairness", "tokens": sorted({a.token for a in attrs}),
            "layers": list(range(len(maps_b))), "pairs": len(x_b),
            "pairs_per_attribute": {a.name: int((tok == a.token).sum()) for a in attrs}}
    return _pair(maps_c, maps_b, labels, info, rows=(x_c, x_b))
