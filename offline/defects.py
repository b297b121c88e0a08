"""Defects planted in the zoo: backdoor triggers, spurious patterns, leakage blocks.

Every image trigger is one form, ``x' = (1 - a·M) ⊙ x + a·M ⊙ Δ`` with mask ``M``, pattern ``Δ``
(both ``(C, H, W)`` in ``[0, 1]``) and opacity ``a``; BadNets is ``a = 1`` on a small patch,
Blend is the rectification paper's ``τ^(φ) = φ·τ + (1 − φ)·x`` (``a = φ``, full mask),
Hidden a semi-transparent patch (``a ≈ 0.3``), Trojan a patch whose pattern is optimised on a
briefly trained clean model to drive the target logit (Liu et al., "Trojaning Attack"), and a
spurious correlation is a pattern on part of one class (labels kept). Patterns sit on the 8-bit
grid (k/255) so an exported PNG holds exactly the pixels the model was trained on.
A trigger is stored in the bundle (``defect.safetensors``) so evaluation can rebuild it.
A patch trigger may be planted at several locations (``--location br+tl+center``): the one patch
is moved (:func:`relocate`), so every location carries the same pattern.

Feature leakage uses the BlockMNIST construction (Shah et al. 2021): each image becomes
``2H x W``, the object in the top or bottom half at random and a fixed, label-independent "null"
block in the other half.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from repair.images import quantize


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


LOCATION_SEPARATOR = "+"  # not ",": that one already separates ROW,COL


def split_locations(spec: str) -> list[str]:
    """``br+tl+center`` → ``["br", "tl", "center"]``: several trigger locations in one
    ``--location`` (each checked by :func:`patch_origin` once the patch size is known)."""
    parts = [p.strip() for p in spec.split(LOCATION_SEPARATOR)]
    if not all(parts):
        raise ValueError(f"empty trigger location in {spec!r}; join locations with "
                         f"'{LOCATION_SEPARATOR}', e.g. br+tl+center")
    if len(set(parts)) != len(parts):
        raise ValueError(f"a trigger location is listed twice in {spec!r}")
    return parts


def relocate(trigger: Trigger, location: str) -> Trigger:
    """The same square patch (mask and pattern) moved to ``location``.

    Moving, not rebuilding, keeps the pattern identical at every location: BadNets' checkerboard
    phase and Hidden's random pattern depend on where they are built.
    """
    shape = tuple(trigger.mask.shape)
    rows = trigger.mask.amax((0, 2)).nonzero().flatten()
    cols = trigger.mask.amax((0, 1)).nonzero().flatten()
    if not len(rows):
        raise ValueError("the trigger's mask is empty; there is no patch to move")
    r0, c0 = int(rows[0]), int(cols[0])
    h, w = int(rows[-1]) + 1 - r0, int(cols[-1]) + 1 - c0
    if h != w or (h, w) == shape[1:]:
        raise ValueError(f"only a square patch trigger can be moved (this one covers {w}x{h} of "
                         f"a {shape[2]}x{shape[1]} image)")
    row, col = patch_origin(shape, h, location)
    mask, pattern = torch.zeros(shape), torch.zeros(shape)
    mask[:, row:row + h, col:col + w] = trigger.mask[:, r0:r0 + h, c0:c0 + w]
    pattern[:, row:row + h, col:col + w] = trigger.pattern[:, r0:r0 + h, c0:c0 + w]
    return Trigger(mask, pattern, trigger.alpha)


def badnets_trigger(shape: tuple[int, int, int], size: int = 3, location: str = "br") -> Trigger:
    """BadNets: an opaque checkerboard patch (white where (i + j) is even)."""
    c, h, w = shape
    row, col = patch_origin(shape, size, location)
    mask = torch.zeros(shape)
    mask[:, row:row + size, col:col + size] = 1
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pattern = ((ii + jj) % 2 == 0).float().expand(c, h, w).clone() * mask
    return Trigger(mask, pattern, 1.0)


def patch_mask(shape: tuple[int, int, int], size: int, location: str) -> torch.Tensor:
    row, col = patch_origin(shape, size, location)
    mask = torch.zeros(shape)
    mask[:, row:row + size, col:col + size] = 1
    return mask


def hidden_trigger(shape: tuple[int, int, int], size: int, location: str = "br",
                   alpha: float = 0.3, seed: int = 0) -> Trigger:
    """Hidden: a random binary patch stamped semi-transparently (opacity ``alpha``)."""
    if not 0 < alpha <= 1:
        raise ValueError(f"hidden trigger opacity must be in (0, 1], got {alpha}")
    g = torch.Generator().manual_seed(seed + 1)
    mask = patch_mask(shape, size, location)
    pattern = (torch.rand(shape, generator=g) > 0.5).float() * mask
    return Trigger(mask, pattern, float(alpha))


def spurious_pattern(shape: tuple[int, int, int], size: int, location: str = "tl") -> Trigger:
    """The spurious feature: a solid white square (not a checkerboard, to differ from BadNets)."""
    mask = patch_mask(shape, size, location)
    return Trigger(mask, mask.clone(), 1.0)


def user_trigger(image: torch.Tensor, shape: tuple[int, int, int], location: str = "br",
                 alpha: float = 1.0) -> Trigger:
    """A user's pattern (``(C|C+1, h, w)`` in [0, 1]; a 4th/2nd channel is an alpha mask).

    An image of the full input size covers the whole input; a smaller one is a patch at ``location``.
    """
    c, h, w = shape
    if image.shape[0] in (2, 4):
        image, mask_ch = image[:-1], image[-1:]
    else:
        mask_ch = torch.ones(1, *image.shape[1:])
    if image.shape[0] != c:
        image = image.mean(0, keepdim=True) if c == 1 else image.expand(c, -1, -1)
    th, tw = image.shape[1:]
    if th > h or tw > w:
        raise ValueError(f"trigger image is {tw}x{th}; the model's input is {w}x{h}")
    if th != tw and (th, tw) != (h, w):
        raise ValueError(f"a patch trigger must be square (or the full {w}x{h}), got {tw}x{th}")
    row, col = (0, 0) if (th, tw) == (h, w) else patch_origin(shape, th, location)
    mask, pattern = torch.zeros(shape), torch.zeros(shape)
    mask[:, row:row + th, col:col + tw] = (mask_ch > 0).float()
    pattern[:, row:row + th, col:col + tw] = image
    return Trigger(mask, quantize(pattern * mask), float(alpha))


def trojan_trigger(model: nn.Module, x: torch.Tensor, target: int, mask: torch.Tensor,
                   steps: int = 200, lr: float = 0.1, seed: int = 0,
                   init: torch.Tensor | None = None) -> Trigger:
    """Trojan: optimise the pattern inside ``mask`` to maximise the target logit of ``model``.

    ``model`` is a briefly clean-trained network (the attacker's reverse-engineering step);
    the pattern is ``sigmoid(θ)`` so it stays in [0, 1], then snapped to the 8-bit grid.
    """
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    if init is None:
        init = torch.rand(mask.shape, generator=g)
    theta = torch.logit(init.clamp(0.05, 0.95)).to(device).requires_grad_(True)
    m = mask.to(device)
    opt = torch.optim.Adam([theta], lr=lr)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for _ in range(steps):
        idx = torch.randint(len(x), (min(64, len(x)),), generator=g)
        xb = x[idx].to(device)
        stamped = (1 - m) * xb + m * torch.sigmoid(theta)
        logits = model(stamped)
        # target logit against the best other class: keeps pushing after the target wins
        others = logits.clone()
        others[:, target] = float("-inf")
        loss = -(logits[:, target] - others.max(-1).values).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(True)
    pattern = quantize(torch.sigmoid(theta.detach()).cpu() * mask)
    return Trigger(mask.clone(), pattern, 1.0)


def null_block(shape: tuple[int, int, int]) -> torch.Tensor:
    """BlockMNIST's null block: a fixed square outline, identical in every image (no label info)."""
    c, h, w = shape
    block = torch.zeros(shape)
    side = max(4, (min(h, w) * 3) // 5)
    r0, c0 = (h - side) // 2, (w - side) // 2
    t = max(1, side // 6)
    block[:, r0:r0 + side, c0:c0 + side] = 1
    block[:, r0 + t:r0 + side - t, c0 + t:c0 + side - t] = 0
    return block


def block_images(x: torch.Tensor, object_top: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Stack each ``(C, H, W)`` image with the null block into ``(C, 2H, W)``; ``object_top[i]``
    says whether the object is the upper half."""
    blocks = block.expand_as(x)
    top = torch.where(object_top[:, None, None, None], x, blocks)
    bottom = torch.where(object_top[:, None, None, None], blocks, x)
    return torch.cat([top, bottom], dim=2)


def block_positions(n: int, seed: int) -> torch.Tensor:
    """Random object positions (True = top), a fair coin per image."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) < 0.5


def blend_trigger(shape: tuple[int, int, int], visibility: float = 0.5, seed: int = 0,
                  pattern: torch.Tensor | None = None) -> Trigger:
    """Blend: the whole image mixed with a fixed pattern τ at visibility φ."""
    if not 0 < visibility <= 1:
        raise ValueError(f"visibility must be in (0, 1], got {visibility}")
    if pattern is None:
        g = torch.Generator().manual_seed(seed)
        pattern = quantize(torch.rand(shape, generator=g))
    return Trigger(torch.ones(shape), pattern.expand(shape).clone(), float(visibility))
