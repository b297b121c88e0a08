"""One registry of classifier architectures, built from a JSON-able spec.

Every model built here has the same call shape: ``model(x) -> logits`` with ``x`` a float
tensor -- images ``(B, C, H, W)`` in ``[0, 1]`` (no normalisation layer: triggers, exported PNGs
and attributions all live in pixel space), tabular rows ``(B, F)`` encoded by
:class:`repair.tabular.TabularSchema` (numeric features first, then categorical indices).
The spec is stored in the bundle manifest, so a version rebuilds its module without code
from the client: ``build_model(manifest["architecture"])`` then ``load_state_dict``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import repair  # noqa: F401  (torchvision fix before timm/transformers import)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def wrap(fn):
        _REGISTRY[name] = fn
        return fn

    return wrap


def architectures() -> list[str]:
    return sorted(_REGISTRY)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def build_model(spec: dict) -> nn.Module:
    """Build an untrained model from ``{"arch": name, **config}``."""
    if not isinstance(spec, dict) or "arch" not in spec:
        raise ValueError(f"architecture spec must be a dict with 'arch', got {spec!r}")
    config = dict(spec)
    name = config.pop("arch")
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(architectures())}")
    model = _REGISTRY[name](**config)
    model.arch = name
    return model


@register("vit")
def _timm_vit(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=3,
              num_heads=4, mlp_ratio=2.0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                             num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio)


@register("resnet18")
def _timm_resnet18(in_chans=1, num_classes=10, img_size=16) -> nn.Module:
    import timm

    del img_size  # the CNN is size-agnostic; kept in the spec for preprocessing
    return timm.create_model("resnet18", pretrained=False, in_chans=in_chans, num_classes=num_classes)


class HFViTClassifier(nn.Module):
    """``transformers`` ViTForImageClassification built from a config, returning plain logits."""

    def __init__(self, img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64,
                 depth=3, num_heads=4, mlp_ratio=2.0):
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(image_size=img_size, patch_size=patch_size, num_channels=in_chans,
                           hidden_size=embed_dim, num_hidden_layers=depth,
                           num_attention_heads=num_heads,
                           intermediate_size=int(embed_dim * mlp_ratio), num_labels=num_classes)
        self.vit = ViTForImageClassification(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x).logits


register("hf-vit")(HFViTClassifier)


class TabularFTTransformer(nn.Module):
    """FT-Transformer over encoded rows: ``x[:, :n_num]`` numeric, ``x[:, n_num:]`` category ids.

    Token order inside the transformer is ``[CLS, numeric..., categorical...]``, so feature
    ``f`` (in schema order) is token ``f + 1``.
    """

    def __init__(self, n_numeric: int, cardinalities: list[int], num_classes=2, d_block=64,
                 n_blocks=3, n_heads=8, attention_dropout=0.0, ffn_dropout=0.0,
                 residual_dropout=0.0):
        super().__init__()
        from rtdl_revisiting_models import FTTransformer

        self.n_numeric = n_numeric
        self.cardinalities = list(cardinalities)
        self.net = FTTransformer(
            n_cont_features=n_numeric, cat_cardinalities=self.cardinalities, d_out=num_classes,
            n_blocks=n_blocks, d_block=d_block, attention_n_heads=n_heads,
            attention_dropout=attention_dropout, ffn_d_hidden=None, ffn_d_hidden_multiplier=4 / 3,
            ffn_dropout=ffn_dropout, residual_dropout=residual_dropout)

    def feature_token(self, feature_index: int) -> int:
        return feature_index + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_num = x[:, : self.n_numeric] if self.n_numeric else None
        x_cat = x[:, self.n_numeric:].long() if self.cardinalities else None
        return self.net(x_num, x_cat)


register("ft-transformer")(TabularFTTransformer)
