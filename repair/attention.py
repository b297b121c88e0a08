"""One interface to every layer's post-softmax attention map, per architecture.

``AttentionAccess.for_model(model)`` finds the attention layers of a timm ViT, the
FT-Transformer (rtdl) or a ``transformers`` ViT; ``install(fn)`` calls ``fn(layer, attn)`` with
the map ``attn`` of shape ``(B, H, Nq, N)`` (rows sum to 1) inside the forward pass, and ``fn``
may return a replacement map of the same shape (or ``None`` to keep it). How each architecture
is reached (measured on the pinned versions):

- timm ``VisionTransformer``: ``fused_attn = False`` on each ``Attention``; a forward hook on
  ``blocks[i].attn.attn_drop`` sees the softmax output and its return value replaces it. The
  eager path is what makes the map visible at all. With ``all_eager`` the layers not hooked run
  eager too, and the model is exactly the eager model plus the hooks (``fn`` returning ``None``
  gives its logits bit for bit, whichever layers are hooked). AtPatch asks for it on the CPU,
  where torch's fused attention can cost more than the eager one: on an AMD EPYC with AVX-512
  (digits ViT, batch 64, 2 threads) 575 µs per fused call against ~120 µs eager; with layers
  1-2 left fused the unpatched request cost +35 % over the eager forward, all eager +11 % (two
  runs each, alternated; the committed run is ``bench/results/atpatch_latency.md``). On a GPU
  the fused kernels are the fast ones, so layers not hooked keep them there.
- rtdl ``FTTransformer``: attention dropout is ``None`` at rate 0, so an ``nn.Dropout(0.0)`` is
  put there to hook; its map is ``(B*H, Nq, N)`` and is viewed as ``(B, H, Nq, N)``. The last block
  attends from ``[CLS]`` only, so that layer's map is ``1 x N``.
- ``transformers`` ViT: the probabilities never leave the attention function, so a custom one is
  registered with ``AttentionInterface`` (the eager computation plus the callback).

Capture-only (``fn`` returns ``None``) leaves the logits bitwise identical to the eager model.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

AttnFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


class NoAttentionError(ValueError):
    """The model has no attention layers this module knows how to reach."""


class AttentionAccess:
    """Hook points of one model's attention layers; at most one callback installed at a time."""

    def __init__(self, model: nn.Module, kind: str, modules: list[nn.Module], num_heads: int,
                 seq_len: int, query_lens: list[int]):
        self.model, self.kind, self.modules = model, kind, modules
        self.num_heads, self.seq_len, self.query_lens = num_heads, seq_len, query_lens
        self._handles: list = []
        self._restore: list[Callable[[], None]] = []

    @property
    def n_layers(self) -> int:
        return len(self.modules)

    # -- discovery ---------------------------------------------------------------------------

    @classmethod
    def for_model(cls, model: nn.Module) -> "AttentionAccess":
        from repair.models import HFViTClassifier, TabularFTTransformer

        if isinstance(model, TabularFTTransformer):
            return cls._rtdl(model)
        if isinstance(model, HFViTClassifier):
            return cls._hf_vit(model)
        try:
            from timm.models.vision_transformer import VisionTransformer
        except ImportError:  # pragma: no cover
            VisionTransformer = ()
        if isinstance(model, VisionTransformer):
            return cls._timm_vit(model)
        raise NoAttentionError(
            f"model {type(model).__name__} (arch {getattr(model, 'arch', '?')!r}) has no attention "
            "layers AtPatch can reach; supported: vit (timm), hf-vit, ft-transformer")

    @classmethod
    def _timm_vit(cls, model) -> "AttentionAccess":
        attns = [blk.attn for blk in model.blocks]
        n = model.patch_embed.num_patches + model.num_prefix_tokens
        return cls(model, "timm-vit", attns, attns[0].num_heads, n, [n] * len(attns))

    @classmethod
    def _rtdl(cls, model) -> "AttentionAccess":
        blocks = model.net.backbone.blocks
        attns = [blk["attention"] for blk in blocks]
        n = 1 + model.n_numeric + len(model.cardinalities)
        queries = [n] * (len(attns) - 1) + [1]  # the last block attends from [CLS] only
        return cls(model, "ft-transformer", attns, attns[0]._n_heads, n, queries)

    @classmethod
    def _hf_vit(cls, model) -> "AttentionAccess":
        attns = [layer.attention for layer in model.vit.vit.layers]
        cfg = model.vit.config
        n = (cfg.image_size // cfg.patch_size) ** 2 + 1
        return cls(model, "hf-vit", attns, cfg.num_attention_heads, n, [n] * len(attns))

    # -- installing ----------------------------------------------------------------------------

    def install(self, fn: AttnFn, layers: list[int] | None = None, all_eager: bool = False) -> None:
        """Call ``fn(layer, attn)`` at each of ``layers`` (default: all) in every forward; its return
        replaces ``attn``. Layers not hooked keep their own (possibly fused) attention, or with
        ``all_eager`` run the eager one too, until ``remove``."""
        self.remove()
        hooked = set(range(self.n_layers) if layers is None else layers)
        if self.kind == "timm-vit":
            for i, attn in enumerate(self.modules):
                if i not in hooked and not all_eager:
                    continue
                prev = attn.fused_attn
                attn.fused_attn = False
                self._restore.append(lambda a=attn, p=prev: setattr(a, "fused_attn", p))
                if i in hooked:
                    self._handles.append(attn.attn_drop.register_forward_hook(
                        lambda _m, _inp, out, i=i: fn(i, out)))
        elif self.kind == "ft-transformer":
            heads = self.num_heads
            for i, attn in enumerate(self.modules):
                if i not in hooked:
                    continue
                if attn.dropout is None:
                    attn.dropout = nn.Dropout(0.0)
                    self._restore.append(lambda a=attn: setattr(a, "dropout", None))
                self._handles.append(attn.dropout.register_forward_hook(
                    lambda _m, _inp, out, i=i: _rtdl_call(fn, i, out, heads)))
        else:  # hf-vit
            _register_hf_function()
            cfg = self.model.vit.config
            prev = cfg._attn_implementation
            cfg._attn_implementation = _HF_NAME
            mods = [(i, a) for i, a in enumerate(self.modules) if i in hooked]
            for i, attn in mods:
                attn._atpatch_hook = (lambda a, i=i: fn(i, a))
            self._restore.append(lambda: setattr(cfg, "_attn_implementation", prev))
            self._restore.extend(lambda a=a: delattr(a, "_atpatch_hook") for _, a in mods)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for undo in reversed(self._restore):
            undo()
        self._handles, self._restore = [], []


def _rtdl_call(fn: AttnFn, layer: int, out: torch.Tensor, heads: int):
    bh, nq, n = out.shape
    new = fn(layer, out.view(bh // heads, heads, nq, n))
    return None if new is None else new.reshape(bh, nq, n)


_HF_NAME = "repair_atpatch"
_hf_registered = False


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``transformers``' eager attention with the callback between softmax and the value product."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    hook = getattr(module, "_atpatch_hook", None)
    if hook is not None:
        new = hook(weights)
        if new is not None:
            weights = new
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _register_hf_function() -> None:
    global _hf_registered
    if not _hf_registered:
        from transformers import AttentionInterface

        AttentionInterface.register(_HF_NAME, _hf_attention)
        _hf_registered = True


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor, batch_size: int = 256,
                   head_average: bool = True) -> list[torch.Tensor]:
    """Every layer's map for ``x`` (on CPU): ``(B, Nq, N)`` head-averaged (Eq. 5) or ``(B, H, Nq, N)``."""
    access = AttentionAccess.for_model(model)
    device = next(model.parameters()).device
    chunks: list[list[torch.Tensor]] = [[] for _ in range(access.n_layers)]

    def grab(layer, attn):
        chunks[layer].append((attn.mean(1) if head_average else attn).detach().cpu())

    access.install(grab)
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size].to(device))
    finally:
        access.remove()
    return [torch.cat(c) for c in chunks]
