"""Editable layers as linear associative memories (paper §3, §4.1).

A layer with weight ``W ∈ R^{m×n}`` maps a key ``k ∈ R^n`` to a value ``v = W k`` at every
*position*: for a ``Conv2d`` a position is an output pixel and its key the unfolded input patch
(``C_in·kh·kw``); for a ``Linear`` applied to tokens a position is a token and its key the
token's input. The rank-one edit ``W' = W + Λ dᵀ`` changes each position's output by
``Λ·(dᵀk)``, so it is applied to a conv weight as ``(Λ dᵀ).reshape(weight.shape)``.

**Where the value is read** (``value=`` of :func:`value_at`):

- ``"layer"``: the layer's own output (Eq. 1 read literally);
- ``"block"``: past the residual sum where the layer feeds one: ``attn.proj``/``mlp.fc2`` of a
  ViT block, ``conv2`` of a ResNet BasicBlock, ``W_out``/``linear2`` of an FT-Transformer block
  are followed by ``h = skip + layer(...)``, and the next layer only sees ``h``. The skip term of
  a corrupt input differs from the clean one (a Blend trigger changes every token of the
  residual stream) and the edit is the only thing that can compensate it, so ``v*`` is the
  clean ``h``; for other layers this is the layer's output;
- ``"logits"`` (the default): the model's output, i.e. ``Λ`` minimises the prediction
  discrepancy ``Δ(x, x̃; W + Λdᵀ)`` of §4.3 (Eq. 2), the quantity whose first-order decrease
  ``G_l`` the localization estimates. The key ``k*`` and the direction ``d`` are still the
  layer's own, so the update is the rank-one ``W + Λ(C⁻¹k*)ᵀ`` of Eq. 1 either way.

Why ``"logits"``: a rank-one update cannot restore every position's value at once (one ``Λ``
for all positions), and the least-squares fit of a *local* value spends it on positions that do
not matter for the decision. Measured on the digits ViT (Blend φ=0.5, one pair, one edit, mean
of 3 pairs; ``bench/results/rectify_value_point.md``): editing ``patch_embed.proj`` leaves ASR at
100 % with the layer's output as value and falls to 0.1 % with the logits at the same accuracy;
for ``blocks.0.mlp.fc2`` the block's output (past the residual sum) beats the layer's output
(ASR 61 % vs 99 %), so where a local value is used it is the residual sum.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class LayerError(ValueError):
    """A layer name that is not an editable layer of this model."""


@dataclass(frozen=True)
class EditableLayer:
    name: str                 # module path inside the model (``model.get_submodule(name)``)
    module: nn.Module         # nn.Linear or nn.Conv2d (groups=1)
    value_module: str         # where the value v is read (the layer itself or its residual sum)
    value_at: str = "output"  # "output" of value_module, or its "input" (a pre-norm residual sum)

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def key_dim(self) -> int:
        w = self.module.weight
        return w[0].numel()

    @property
    def value_dim(self) -> int:
        return self.module.weight.shape[0]

    def weight_matrix(self) -> torch.Tensor:
        """``W`` as ``(m, n)`` (a view for convs: out-channels × unfolded patch)."""
        return self.module.weight.reshape(self.value_dim, -1)

    def keys(self, layer_input: torch.Tensor) -> torch.Tensor:
        """Per-position keys ``(B, P, n)`` from the layer's input."""
        if self.is_conv:
            m = self.module
            cols = F.unfold(layer_input, m.kernel_size, dilation=m.dilation, padding=m.padding,
                            stride=m.stride)
            return cols.transpose(1, 2)
        return layer_input.reshape(layer_input.shape[0], -1, layer_input.shape[-1])

    def positions(self, layer_output: torch.Tensor) -> torch.Tensor:
        """Per-position outputs ``(B, P, m)`` (same positions as :meth:`keys`)."""
        if self.is_conv:
            return layer_output.flatten(2).transpose(1, 2)
        return layer_output.reshape(layer_output.shape[0], -1, layer_output.shape[-1])

    def key_projection(self, layer_input: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``dᵀk`` at every position, shaped like one output channel (for the edit hook)."""
        if self.is_conv:
            m = self.module
            kernel = d.reshape(1, *m.weight.shape[1:]).to(layer_input)
            return F.conv2d(layer_input, kernel, stride=m.stride, padding=m.padding,
                            dilation=m.dilation)  # (B, 1, H', W')
        return layer_input @ d.to(layer_input)  # (..., )

    def add_rank_one(self, lam: torch.Tensor, d: torch.Tensor) -> None:
        """``W ← W + Λ dᵀ`` (Eq. 1) in place."""
        w = self.module.weight
        with torch.no_grad():
            w.add_(torch.outer(lam.to(w), d.to(w)).reshape(w.shape))


def _linear_or_conv(module: nn.Module, name: str) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise LayerError(f"{name}: only dense zero-padded convolutions are editable")
        return module
    if isinstance(module, nn.Linear):
        return module
    raise LayerError(f"{name} is a {type(module).__name__}, not a Linear or Conv2d")


def _specs(model: nn.Module) -> list[tuple[str, str, str]]:
    """(layer, value module, value_at) in forward order, per architecture."""
    arch = getattr(model, "arch", None)
    if arch == "vit":
        specs = [("patch_embed.proj", "patch_embed.proj", "output")]
        for i in range(len(model.blocks)):
            b = f"blocks.{i}"
            specs += [(f"{b}.attn.qkv", f"{b}.attn.qkv", "output"),
                      (f"{b}.attn.proj", f"{b}.norm2", "input"),  # x + attn(norm1(x))
                      (f"{b}.mlp.fc1", f"{b}.mlp.fc1", "output"),
                      (f"{b}.mlp.fc2", b, "output")]              # x + mlp(norm2(x))
        return specs
    if arch == "resnet18":
        specs = [("conv1", "conv1", "output")]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for j in range(len(getattr(model, stage))):
                b = f"{stage}.{j}"
                specs += [(f"{b}.conv1", f"{b}.conv1", "output"),
                          (f"{b}.conv2", b, "output")]            # act(bn2(conv2) + shortcut)
        return specs
    if arch == "ft-transformer":
        specs = []
        for i in range(len(model.net.backbone.blocks)):
            b = f"net.backbone.blocks.{i}"
            a = f"{b}.attention"
            specs += [(f"{a}.W_q", f"{a}.W_q", "output"), (f"{a}.W_k", f"{a}.W_k", "output"),
                      (f"{a}.W_v", f"{a}.W_v", "output"),
                      (f"{a}.W_out", f"{b}.ffn_normalization", "input"),  # x + attn(...)
                      (f"{b}.ffn.linear1", f"{b}.ffn.linear1", "output"),
                      (f"{b}.ffn.linear2", f"{b}.output", "output")]      # x + ffn(...)
        return specs
    raise LayerError(f"rank-one editing supports vit, resnet18 and ft-transformer, not {arch!r}")


def editable_layers(model: nn.Module) -> dict[str, EditableLayer]:
    """All editable layers of a model built by :func:`repair.models.build_model`, in forward order."""
    out = {}
    for name, value_module, value_at in _specs(model):
        module = _linear_or_conv(model.get_submodule(name), name)
        out[name] = EditableLayer(name, module, value_module, value_at)
    return out


def resolve_layer(model: nn.Module, name: str) -> EditableLayer:
    layers = editable_layers(model)
    if name not in layers:
        raise LayerError(f"{name!r} is not an editable layer; editable: {', '.join(layers)}")
    return layers[name]


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early (nothing after it is needed)."""


@contextlib.contextmanager
def capture_inputs_outputs(layers: list[EditableLayer]):
    """Record each layer's input and output of the next forward pass: ``{name: (in, out)}``."""
    record: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [layer.module.register_forward_hook(
        lambda mod, args, out, name=layer.name: record.__setitem__(name, (args[0], out)))
        for layer in layers]
    try:
        yield record
    finally:
        for h in handles:
            h.remove()


VALUE_POINTS = ("logits", "block", "layer")


def value_at(model: nn.Module, layer: EditableLayer, x: torch.Tensor,
             value: str = "logits") -> torch.Tensor:
    """The layer's value for input ``x`` (forward stops right after it is computed)."""
    if value == "logits":
        return model(x)
    if value not in VALUE_POINTS:
        raise ValueError(f"value must be one of {', '.join(VALUE_POINTS)}, got {value!r}")
    module_name, at = ((layer.value_module, layer.value_at) if value == "block"
                       else (layer.name, "output"))
    module = model.get_submodule(module_name)
    box = {}

    def grab(t):
        box["v"] = t
        raise _Stop

    if at == "input":
        h = module.register_forward_pre_hook(lambda mod, args: grab(args[0]))
    else:
        h = module.register_forward_hook(lambda mod, args, out: grab(out))
    try:
        model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    if "v" not in box:
        raise RuntimeError(f"value module {module_name} was not reached in the forward pass")
    return box["v"]


@contextlib.contextmanager
def rank_one_hook(layer: EditableLayer, lam: torch.Tensor, d: torch.Tensor):
    """Run the layer as ``W + Λ dᵀ`` without touching ``W`` (output += Λ·(dᵀk) per position)."""
    def hook(mod, args, out):
        s = layer.key_projection(args[0], d)
        if layer.is_conv:
            return out + s * lam.view(1, -1, 1, 1)
        return out + s.unsqueeze(-1) * lam

    h = layer.module.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()
