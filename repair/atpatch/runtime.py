"""AtPatch at inference (Algorithm 1, online phase, in ONE forward pass): the contract the server uses.

At layer ``l`` the hook reads the map, the Detector flags columns (Eq. 6, 9), Γ (Eq. 11, or the
masked variant chosen for the bundle's defect) patches the map in place, and the forward goes
on, so layer ``l + 1`` already sees the patched state. Decisions are tensor ops: on a GPU nothing
is read back per layer (``torch.where`` keeps unflagged samples bit-for-bit); on the CPU, where
reading a flag is not a device sync, layers with nothing flagged skip Γ altogether.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from repair.atpatch import benign as benign_io
from repair.atpatch.detector import Detector, DetectorError, layer_logit_thresholds
from repair.atpatch.redistribution import VARIANTS, redistribute
from repair.attention import AttentionAccess

MODES = ("on", "off")
# (layer, per-head map (B, H, Nq, N)) -> bool flags (B, N): stands in for the Detector (ablations).
Selector = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class PatchResult:
    logits: torch.Tensor    # (B, classes)
    patched: torch.Tensor   # bool (B,): any column flagged in any layer
    flagged: torch.Tensor   # bool (B, L, N): per layer, per token

    def columns(self, i: int) -> list[tuple[int, int]]:
        return [(int(l), int(t)) for l, t in self.flagged[i].nonzero().tolist()]


class AtPatch:
    def __init__(self, model: nn.Module, detector: Detector | None, benign: list[torch.Tensor],
                 threshold: float | list[float] = 0.1, variant: str = "replace", layers: list[int] | None = None,
                 rescale: bool = True, selector: Selector | None = None):
        if variant not in VARIANTS:
            raise DetectorError(f"unknown redistribution variant {variant!r}; known: {', '.join(VARIANTS)}")
        self.access = AttentionAccess.for_model(model)
        n_layers, n = self.access.n_layers, self.access.seq_len
        if detector is not None and (detector.n_layers != n_layers or detector.seq_len != n):
            raise DetectorError(
                f"the detector was trained for {detector.n_layers} layers x {detector.seq_len} tokens, "
                f"but the model has {n_layers} layers x {n} tokens")
        if len(benign) != n_layers or any(q.shape != (nq, n) for q, nq in zip(benign, self.access.query_lens)):
            raise DetectorError(f"benign columns {[tuple(q.shape) for q in benign]} do not fit the "
                                f"model's maps {[(nq, n) for nq in self.access.query_lens]}")
        device = next(model.parameters()).device
        self.model, self.threshold, self.variant, self.rescale = model, threshold, variant, rescale
        self.selector = selector
        # (layer, before, after) callback while ``observe`` runs; None in serving.
        self._observer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
        self.detector = detector.to(device).eval() if detector is not None else None
        if self.detector is not None:
            self.detector.prepare()
        # τ per layer: one value (the paper), or the per-layer τ of a calibrated build
        self._tau_logit = layer_logit_thresholds(threshold, n_layers)
        self.layers = sorted(set(range(n_layers) if layers is None else layers))
        self._benign = [None if variant == "masked" else q.to(device) for q in benign]
        self._on = False
        self._flags: torch.Tensor | None = None  # (B, L, N) of the request in flight
        self.access.install(self._hook, self.layers)

    # -- construction from a bundle version -----------------------------------------------------

    @staticmethod
    def available(version) -> bool:
        return version.has("detector") and version.has("benign") and "atpatch" in version.manifest

    @classmethod
    def from_version(cls, version, model: nn.Module, threshold: float | None = None) -> "AtPatch":
        """The version's Detector at its own thresholds (the calibrated per-layer τ where the build
        chose them), or at one ``threshold`` τ for every layer when given."""
        if not cls.available(version):
            raise DetectorError(f"version {version.id} has no AtPatch detector (run `repair-proxy atpatch build`)")
        meta = version.manifest["atpatch"]
        detector = Detector.from_config(meta["detector"], version.tensors("detector"))
        benign = benign_io.from_tensors(version.tensors("benign"), int(meta["detector"]["n_layers"]))
        variant = meta.get("variants", {}).get(meta.get("defect_kind", "backdoor"), "replace")
        if threshold is None:
            threshold = meta.get("layer_thresholds") or meta["threshold"]
        return cls(model, detector, benign, threshold=threshold, variant=variant, layers=meta.get("layers"))

    # -- the hot path ------------------------------------------------------------------------

    def _hook(self, layer: int, attn: torch.Tensor):
        if not self._on or layer not in self.layers:
            if self._on and self._observer is not None:  # a layer the Detector does not run on
                self._observer(layer, attn, attn)
            return None
        cpu = attn.device.type == "cpu"  # on the CPU reading a value is no device sync
        if self.selector is not None:
            flags = self.selector(layer, attn)
            nothing = cpu and not bool(flags.any())
        else:
            scores = self.detector.logits_from_heads(attn, layer)
            # one max decides "nothing flagged" for the whole batch (the common, clean case)
            tau = self._tau_logit[layer]
            nothing = cpu and float(scores.max()) <= tau
            flags = None if nothing else scores > tau
        if nothing:
            out = None  # Γ skipped, the map kept as it is
        else:
            self._flags[:, layer] = flags
            out = redistribute(attn, flags, self._benign[layer], rescale=self.rescale)
        if self._observer is not None:
            self._observer(layer, attn, attn if out is None else out)
        return out

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, mode: str = "on") -> PatchResult:
        if mode not in MODES:
            raise ValueError(f"patch mode must be one of {', '.join(MODES)}, got {mode!r}")
        # The hooks write each layer's flags in place: one allocation per request, no per-layer list.
        flagged = torch.zeros(len(x), self.access.n_layers, self.access.seq_len, dtype=torch.bool,
                              device=x.device)
        self._on, self._flags = mode == "on", flagged
        try:
            logits = self.model(x)
        finally:
            self._on, self._flags = False, None
        return PatchResult(logits, flagged.flatten(1).any(1), flagged)

    def observe(self, x: torch.Tensor, fn: Callable[[int, torch.Tensor, torch.Tensor], None]) -> PatchResult:
        """One "on" forward that calls ``fn(layer, before, after)`` at every layer (``before`` is
        ``after`` where the Detector does not run): offline inspection, such as heatmaps."""
        self._observer = fn
        self.access.install(self._hook)
        try:
            return self(x, "on")
        finally:
            self._observer = None
            self.access.install(self._hook, self.layers)

    @contextmanager
    def bare(self):
        """The model without hooks (each attention layer back to its own, fused, path) for the
        duration: for reading unpatched maps and for baselines."""
        self.access.remove()
        try:
            yield self.model
        finally:
            self.access.install(self._hook, self.layers)

    def remove(self) -> None:
        self.access.remove()


class PatchedModel(nn.Module):
    """``AtPatch`` in a mode as a plain ``model(x) -> logits`` for the shared metrics."""

    def __init__(self, patch: AtPatch, mode: str = "on"):
        super().__init__()
        self.patch, self.mode, self.inner = patch, mode, patch.model

    def forward(self, x):
        return self.patch(x, self.mode).logits
