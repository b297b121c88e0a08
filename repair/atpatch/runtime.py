"""AtPatch at inference (Algorithm 1, online phase: detect and patch in ONE forward pass): the
contract the server uses.

At layer ``l`` the hook reads the map, the Detector flags columns (Eq. 6, 9), Γ (Eq. 11, or the
masked variant chosen for the bundle's defect) patches the map in place, and the forward goes
on, so layer ``l + 1`` already sees the patched state. Decisions are tensor ops: on a GPU nothing
is read back per layer (``torch.where`` keeps unflagged samples bit-for-bit); on the CPU, where
reading a flag is not a device sync, layers with nothing flagged skip Γ altogether. So a GPU
forward can be captured whole: the server replays it as a CUDA graph with the hook step compiled
(``compile_hot_path``, ``repair.cuda_graphs``). On the CPU the Detector and Γ are compiled C++
functions (``repair.atpatch.cpu_kernel``).

A column the Detector flags at one layer stays flagged at every later layer it runs on (for that
sample). Why: a token keeps its identity through the residual stream, and once layer ``l`` is
patched the trigger's column at ``l + 1`` draws less attention than it would have, often too
little to be flagged again, while it still carries the trigger. Measured on the Fashion-MNIST
ViT builds (Detector on layers 0 and 1, test split, ``bench/results/atpatch_fashion-*.md``): ASR
BadNets 0.112 → 0.037 (and the rebuild could raise τ per layer: accuracy −0.4 → −0.08 pt),
Trojan 0.107 → 0.043 (−2.1 → −2.4 pt). Patching the real trigger's columns on every input
leaves 0.034 / 0.031, and the clean model itself answers 2.3 / 2.2 % of the other classes' clean
images with the target. Builds whose Detector runs on one layer (digits, Fashion-MNIST Hidden)
are unchanged. A ``selector`` (ablations) stands in for this rule too: it says exactly what to
patch per layer.

A row gate may restrict the patch to some rows; the others get the bare model's answer.
Fairness builds always gate (``CounterfactualGate``: rows whose answer depends on the protected
values); backdoor builds may (``TargetClassGate``: rows the bare model assigns to the
target class; an attacked request then runs a detecting pass before the patched one). Each
docstring gives its numbers and its cost.
"""
from __future__ import annotations

import functools
import itertools
import warnings
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from repair.atpatch import benign as benign_io
from repair.atpatch.cpu_kernel import cpu_redistribute, cpu_scores
from repair.atpatch.detector import Detector, DetectorError, flag_columns, layer_logit_thresholds
from repair.atpatch.protected_prior import ProtectedPrior
from repair.atpatch.redistribution import VARIANTS, redistribute
from repair.attention import AttentionAccess

MODES = ("on", "off")
# (layer, per-head map (B, H, Nq, N)) -> bool flags (B, N): stands in for the Detector (ablations).
Selector = Callable[[int, torch.Tensor], torch.Tensor]


def _without_grad(fn):
    """``torch.no_grad()`` around ``fn`` only where grad mode is on. Why: entering it costs ~9 µs
    on the CPU even when nothing changes (torch 2.13), and the server's passes already run in
    inference mode: the two such contexts of every request cost +1.5 to 2 % of the digits ViT's
    eager forward at batch 1 (Intel Xeon)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            with torch.no_grad():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return run


class PatchResult:
    """One pass's answer: ``logits`` (B, classes); ``flagged`` bool (B, L, N), per layer and token;
    ``patched`` bool (B,), any column flagged in any layer.

    ``PatchResult.unpatched``: nothing flagged in any row (a row gate's answer, a CPU request
    the Detector flagged nothing in), which ``nothing_flagged`` says without a tensor op; its
    ``flagged`` and ``patched`` are zeros made only when read. Why: the server reads neither for
    such a request, and the two allocations right after the forward cost ~20 µs at batch 1, 3 %
    of the digits ViT's eager forward (Intel Xeon, ``bench/results/atpatch_latency_xeon.md``
    against ``atpatch_latency_xeon_d7e8019.md``: the unpatched request +8.6 → +6.5 %)."""

    def __init__(self, logits: torch.Tensor, flagged: torch.Tensor | None, shape: tuple[int, ...] = ()):
        self.logits, self._flagged, self._patched = logits, flagged, None
        self.nothing_flagged = flagged is None
        self._shape = shape if flagged is None else tuple(flagged.shape)  # (B, L, N)

    @classmethod
    def unpatched(cls, logits: torch.Tensor, n_layers: int, n_tokens: int) -> "PatchResult":
        return cls(logits, None, (len(logits), n_layers, n_tokens))

    @property
    def flagged(self) -> torch.Tensor:
        if self._flagged is None:
            self._flagged = torch.zeros(self._shape, dtype=torch.bool, device=self.logits.device)
        return self._flagged

    @property
    def patched(self) -> torch.Tensor:
        if self._patched is None:
            self._patched = (torch.zeros(len(self.logits), dtype=torch.bool, device=self.logits.device)
                             if self.nothing_flagged else self._flagged.flatten(1).any(1))
        return self._patched

    def columns(self, i: int) -> list[tuple[int, int]]:
        return [(int(l), int(t)) for l, t in self.flagged[i].nonzero().tolist()]


class CounterfactualGate:
    """Fairness: the rows worth patching are those whose answer changes when the protected
    attributes take other values (the enumeration of Eq. 4, run at inference on the bare model,
    every combination of values in one batch with the rows themselves). Every other row is fair
    already and keeps the bare model's answer (from that batch when no row of the request is
    patched, else from the patched pass, bit for bit); a row and its twin with a protected value changed share their
    combinations, so they are gated alike and unfairness can only fall.

    Why: the Detector cannot tell such rows from attention (the protected token draws no excess
    attention; it flags the token on every row), and masking it on every row costs accuracy where
    the answer never depended on it. Measured on the zoo models (whole test sets, the protected
    token masked at every layer, no logit shift; UF 0 either way): Adult race/sex/age
    −0.4/−0.31/−0.33 pt on every row, −0.12/−0.19/−0.33 pt gated; COMPAS sex −1.45 → −0.72 pt,
    race −0.24 pt and race+sex −0.97 pt either way (bench/results/atpatch_tabular.md; with the
    shift: ``patched_answer``). Cost: one bare forward of
    (K + 1)·B rows per request, K the number of value combinations (60 for Adult's three).

    The gated rows get one of two answers (``offline.atpatch_build.fairness_answer`` says which a
    build serves, and why): with a ``prior``, the counterfactual average (``average_answer``),
    which the enumeration batch already holds the makings of, so no patched pass runs; without
    one (builds before session 35), the masked patch's (Q_k = 0 at the protected tokens, plus a
    logit shift, ``patched_answer``)."""

    name = "counterfactual"   # manifest ``row_gate``

    def __init__(self, columns: list[int], values: list[list[float]], logit_shift: list[float] | None = None,
                 prior: ProtectedPrior | None = None, tokens: list[int] = ()):
        self.columns = list(columns)   # protected columns of the encoded row
        # (K, P): every combination of their encoded values
        self.combos = torch.tensor(list(itertools.product(*values)), dtype=torch.float32)
        # (classes,) added to the logits of every patched row (``patched_answer``), or None
        self.logit_shift = None if logit_shift is None else torch.tensor(logit_shift, dtype=torch.float32)
        # P(combination | other features), in this gate's order of combinations: the gated rows
        # get the counterfactual average instead
        self.prior = None if prior is None else prior.aligned(self.columns, self.combos)
        self.tokens = list(tokens)     # the protected tokens: flagged where the average answers

    @classmethod
    def from_protected(cls, protected: dict, logit_shift: list[float] | None = None,
                       prior: ProtectedPrior | None = None) -> "CounterfactualGate":
        """From a build's ``manifest["atpatch"]["protected"]``: {name: {column, token, values}}."""
        return cls([int(p["column"]) for p in protected.values()],
                   [[float(v) for v in p["values"]] for p in protected.values()], logit_shift, prior,
                   [int(p["token"]) for p in protected.values()] if prior is not None else [])

    @_without_grad
    def _enumerate(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """bool (B,): rows whose predicted class is not the same for every combination of values;
        the logits of ``x`` itself, and (K, B, classes) those of every combination, from one batch."""
        combos = self.combos.to(x)
        variants = x.unsqueeze(0).repeat(len(combos), 1, 1)      # (K, B, F)
        variants[:, :, self.columns] = combos.unsqueeze(1)
        logits = model(torch.cat([x, variants.flatten(0, 1)]))
        own, swapped = logits[:len(x)], logits[len(x):].view(len(combos), len(x), -1)
        return (swapped.argmax(-1) != own.argmax(-1)).any(0), own, swapped

    def dependent_rows(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._enumerate(model, x)[0]

    def rows_to_patch(self, patch: "AtPatch",
                      x: torch.Tensor) -> tuple[torch.Tensor | None, PatchResult]:
        rows, logits, swapped = self._enumerate(patch.model, x)
        if self.prior is None:
            return rows, PatchResult.unpatched(logits, patch.access.n_layers, patch.access.seq_len)
        return None, self.average_answer(patch, x, rows, logits, swapped)

    @_without_grad
    def average_answer(self, patch: "AtPatch", x: torch.Tensor, rows: torch.Tensor, logits: torch.Tensor,
                       swapped: torch.Tensor) -> PatchResult:
        """Rows the protected values decide answered by the law of total probability over them,
        ``log Σ_k P(a_k | x_o) · softmax(f(x with a_k))`` (``repair.atpatch.protected_prior``),
        the others by the bare logits as they are. The answer no longer reads the protected
        tokens: they are reported flagged at every layer the build patches."""
        if not bool(rows.any()):
            return PatchResult.unpatched(logits, patch.access.n_layers, patch.access.seq_len)
        weights = self.prior.log_probs(x[rows])                                  # (R, K)
        average = torch.logsumexp(weights.T.unsqueeze(-1) + swapped[:, rows].log_softmax(-1), 0)
        logits = logits.clone()
        logits[rows] = average
        marked = torch.zeros(patch.access.n_layers, patch.access.seq_len, dtype=torch.bool, device=x.device)
        marked[torch.tensor(patch.layers)[:, None], torch.tensor(self.tokens)] = True
        flagged = patch._no_flags(len(x), x.device)
        flagged[rows] = marked
        return PatchResult(logits, flagged)

    def patched_answer(self, result: PatchResult) -> PatchResult:
        """The masked patch's answer (builds without a prior) with the build's logit shift added
        to the rows it patched (``offline.atpatch_build.fit_logit_shift``). A row and its twins are
        patched alike and shifted alike, so UF stays where the mask put it.

        Why: masking the protected token also takes away the share of the class prior it carried,
        and the masked answer can lean to one class: on COMPAS (sex) it answered 8 % of the
        patched test rows "reoffends", where 54 % do (the bare model: 87 %). The build refits the
        prior on the training rows it patches and serves it where that makes their answers more
        accurate. Whole test sets, UF 0.0 either way (``bench/results/atpatch_tabular.md``):
        COMPAS sex −0.72 → −0.16 pt, race −0.24 → +0.25 pt, Adult sex −0.19 → +0.01 pt; Adult race
        and age get none (it made their training rows' answers less accurate) and stay at −0.12
        and −0.33 pt."""
        if self.logit_shift is None or result.nothing_flagged:
            return result
        result.logits = result.logits + result.patched[:, None] * self.logit_shift.to(result.logits)
        return result  # its flags and patched rows as they were (read once, not recomputed)


class TargetClassGate:
    """Backdoor, opt-in (``atpatch build --target-gate``): patch only rows that the Detector flags
    *and* that the bare model assigns to the target class (the one trigger inversion found). A
    backdoor only ever turns answers into its target, so the attack success rate is the same as
    without the gate, while a false flag on any other row costs nothing: that row keeps the bare
    answer.

    How: a first forward runs the Detector at every layer without patching (the first layer to
    flag sees the same map as in the patched pass, so a row is flagged here exactly when it would
    be there) and yields the bare logits; only if some flagged row is answered with the target
    does a second, patched forward run. A clean request costs what it costs without the gate (or
    less: Γ never runs for it; on the CPU a request with nothing flagged returns the detecting
    pass as it is); an attacked one costs two forward passes. Measured (test sets,
    seed-0 builds): clean accuracy Fashion-MNIST Trojan −2.4 → −0.35 pt, BadNets −0.08 → −0.01
    pt, Hidden −0.07 → −0.04 pt, digits −0 → −0 pt, ASR unchanged (``bench/results/atpatch_target_gate.md``)."""

    name = "target_class"   # manifest ``row_gate``

    def __init__(self, target: int):
        self.target = int(target)

    def rows_to_patch(self, patch: "AtPatch",
                      x: torch.Tensor) -> tuple[torch.Tensor | None, PatchResult]:
        first = patch._forward(x, detect_only=True)
        if first.nothing_flagged:
            return None, first  # nothing flagged (the CPU path knows it without a tensor read)
        rows = first.patched & (first.logits.argmax(-1) == self.target)
        return rows, PatchResult.unpatched(first.logits, patch.access.n_layers, patch.access.seq_len)

    def patched_answer(self, result: PatchResult) -> PatchResult:
        return result


# ``rows_to_patch(patch, x) -> (rows, answer)``: bool (B,) rows to patch (None: none), and the answer
# to give where no row is patched; ``patched_answer(result)``: the answer where rows were patched.
RowGate = CounterfactualGate | TargetClassGate


# ``manifest["atpatch"]["fairness_answer"]["chosen"]``: what a fairness build answers its gated rows with
FAIRNESS_ANSWERS = ("masked patch", "counterfactual average")


def serves_average(meta: dict) -> bool:
    """Whether a fairness build answers its gated rows with the counterfactual average (then the
    version holds ``protected_prior.safetensors``); builds before the choice existed do not."""
    return meta.get("fairness_answer", {}).get("chosen") == FAIRNESS_ANSWERS[1]


def row_gate(meta: dict, prior: ProtectedPrior | None = None) -> RowGate | None:
    """The gate a build chose (``manifest["atpatch"]["row_gate"]``: a gate's ``name``), or None;
    ``prior``: the version's protected prior where it ``serves_average``."""
    kind = meta.get("row_gate")
    if kind is None:
        return None
    if kind == CounterfactualGate.name:
        if serves_average(meta) != (prior is not None):
            raise DetectorError("the manifest's fairness answer and the protected prior given do not match: "
                                f"{meta.get('fairness_answer', {}).get('chosen')!r} with "
                                f"{'a' if prior is not None else 'no'} prior")
        shift = meta.get("logit_shift", {}).get("shift")
        return CounterfactualGate.from_protected(meta["protected"], shift, prior)
    if kind == TargetClassGate.name:
        return TargetClassGate(meta["inversion"]["target"])
    raise DetectorError(f"unknown row gate {kind!r} in the version's manifest; "
                        f"known: {CounterfactualGate.name}, {TargetClassGate.name}")


class AtPatch:
    def __init__(self, model: nn.Module, detector: Detector | None, benign: list[torch.Tensor],
                 threshold: float | list[float] = 0.1, variant: str = "replace", layers: list[int] | None = None,
                 rescale: bool = True, selector: Selector | None = None, gate: RowGate | None = None,
                 cpu_kernel: bool = True, top_margin: float | None = None):
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
        self.selector, self.gate = selector, gate
        # (layer, before, after) callback while ``observe`` runs; None in serving.
        self._observer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
        self.detector = detector.to(device).eval() if detector is not None else None
        if self.detector is not None:
            self.detector.prepare()
        # The CPU path's Detector and Γ: compiled (``repair.atpatch.cpu_kernel``) unless
        # ``cpu_kernel`` is False (benchmarks compare the two) or they cannot be built: torch ops.
        on_cpu = device.type == "cpu"
        self._cpu_scores = None   # (attn, layer) -> (logits, their max)
        if self.detector is not None and on_cpu:
            self._cpu_scores = cpu_scores(self.detector, cpu_kernel)
        self._redistribute = cpu_redistribute(cpu_kernel) if on_cpu else redistribute
        # τ per layer: one value (the paper), or the per-layer τ of a calibrated build
        self._tau_logit = layer_logit_thresholds(threshold, n_layers)
        if top_margin is not None and not top_margin > 0:
            raise DetectorError(f"top margin must be a positive number of logits, got {top_margin}")
        self.top_margin = top_margin  # ``flag_columns``: flag only columns near their map's top
        self.layers = sorted(set(range(n_layers) if layers is None else layers))
        self._benign = [None if variant == "masked" else q.to(device) for q in benign]
        self._on = False
        self._flags: torch.Tensor | None = None  # (B, L, N) of the request in flight
        self._rows: torch.Tensor | None = None   # (B,) rows the gate lets be patched, or None: all
        self._detect_only = False                # flag, do not patch (TargetClassGate's first pass)
        self._carried: torch.Tensor | None = None  # (B, N) flags of the request's earlier layers
        self._step = self._device_step  # the GPU hook step (``compile_hot_path`` swaps it)
        # GPU: decide with tensor ops only (capturable, no host sync). CPU: read the flags and
        # skip Γ for layers with nothing flagged. Tests set it on the CPU to check the GPU path.
        self.tensor_only = device.type != "cpu"
        # CPU: every layer eager (torch's fused CPU attention can be the slower one; ``repair.attention``)
        self._all_eager = device.type == "cpu"
        self._install()

    # -- construction from a bundle version -----------------------------------------------------

    @staticmethod
    def available(version) -> bool:
        return version.has("detector") and version.has("benign") and "atpatch" in version.manifest

    @classmethod
    def from_version(cls, version, model: nn.Module, threshold: float | None = None,
                     cpu_kernel: bool = True) -> "AtPatch":
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
        prior = ProtectedPrior.from_tensors(version.tensors("protected_prior")) if serves_average(meta) else None
        return cls(model, detector, benign, threshold=threshold, variant=variant, layers=meta.get("layers"),
                   gate=row_gate(meta, prior), cpu_kernel=cpu_kernel, top_margin=meta.get("top_margin"))

    # -- the hot path ------------------------------------------------------------------------

    def _hook(self, layer: int, attn: torch.Tensor):
        if not self._on or layer not in self.layers:
            if self._on and self._observer is not None:  # a layer the Detector does not run on
                self._observer(layer, attn, attn)
            return None
        if self.tensor_only and self.selector is None:
            flags, out = self._step(attn, layer, self._carried, self._rows)
            self._flags[:, layer] = flags
            self._carried = flags
            if self._observer is not None:
                self._observer(layer, attn, attn if out is None else out)
            return out
        cpu = not self.tensor_only  # on the CPU reading a value is no device sync
        if self.selector is not None:
            flags = self.selector(layer, attn)
        else:  # the CPU path
            scores, top = self._cpu_scores(attn, layer)
            # one max decides "nothing new flagged" for the whole batch (the common, clean case)
            tau = self._tau_logit[layer]
            if top <= tau:
                flags = None
            elif self.top_margin is not None and len(scores) == 1:  # one row: its max is the batch's
                flags = scores > max(tau, top - self.top_margin)
            else:
                flags = flag_columns(scores, tau, self.top_margin)
            if self._carried is not None:  # flagged at an earlier layer: still flagged here
                flags = self._carried if flags is None else flags | self._carried
        if flags is not None and self._rows is not None:
            flags = flags & self._rows[:, None]
        if flags is None or (cpu and not bool(flags.any())):
            out = None  # Γ skipped, the map kept as it is
        else:
            if self._flags is None:  # the CPU path's first flag of the request
                self._flags = self._no_flags(len(attn), attn.device)
            self._flags[:, layer] = flags
            if self.selector is None:
                self._carried = flags
            out = None if self._detect_only else self._redistribute(attn, flags, self._benign[layer],
                                                                     rescale=self.rescale)
        if self._observer is not None:
            self._observer(layer, attn, attn if out is None else out)
        return out

    def _device_step(self, attn: torch.Tensor, layer: int, carried: torch.Tensor | None,
                     rows: torch.Tensor | None,
                     fusable: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hook on a GPU, tensor ops only (no value read back): flags (Eq. 6 and 9, earlier
        layers' flags carried, the gate's rows) and Γ (Eq. 11; unflagged samples untouched).
        ``fusable``: the Detector written for torch.compile (eager, the matrix-product form
        launches fewer kernels)."""
        detector_logits = self.detector.logits_fusable if fusable else self.detector.logits_from_heads
        flags = flag_columns(detector_logits(attn, layer), self._tau_logit[layer], self.top_margin)
        if carried is not None:
            flags = flags | carried
        if rows is not None:
            flags = flags & rows[:, None]
        if self._detect_only:
            return flags, None
        return flags, redistribute(attn, flags, self._benign[layer], rescale=self.rescale)

    def compile_hot_path(self, example: torch.Tensor) -> bool:
        """torch.compile the GPU hook step: its ~30 small kernels per layer fuse into eight. On an
        H100, with every forward a CUDA graph, the unpatched request's overhead over the graphed
        eager forward (batch 1 / 64) is +27 / +40 % uncompiled (a scratch run) and +6.8 / +8.1 %
        compiled (``bench/results/atpatch_latency_cuda.md``). One compilation per layer and
        batch size, a few seconds each, paid at warm-up (42 s for the digits ViT's six batch
        sizes on an H100). GPU only: the CPU path reads values.

        Compiles on ``example`` at once; where that fails (Triton needs a C compiler, which a slim
        image may lack) the step stays uncompiled and this returns False."""
        # Each served version x layer x batch size is its own entry (hot swaps add versions);
        # past the limit torch.compile would silently run the step uncompiled.
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 1024)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)
        self._step = torch.compile(functools.partial(self._device_step, fusable=True), dynamic=False)
        try:
            self(example, "on")
        except Exception as err:  # noqa: BLE001 - any compiler failure: run uncompiled, correctly
            warnings.warn(f"AtPatch: compiling the GPU hook step failed, it runs uncompiled: {err}")
            self._step = self._device_step
            return False
        return True

    @_without_grad
    def __call__(self, x: torch.Tensor, mode: str = "on") -> PatchResult:
        if mode not in MODES:
            raise ValueError(f"patch mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "off":
            return self._forward(x, on=False)
        if self.gate is None:
            return self._forward(x)
        rows, answer = self.gate.rows_to_patch(self, x)
        # one read per request (GPU too): with no row left to patch, the gate's pass is the answer
        if rows is None or not bool(rows.any()):
            return answer
        return self.gate.patched_answer(self._forward(x, rows=rows))

    @_without_grad
    def _forward(self, x: torch.Tensor, on: bool = True, rows: torch.Tensor | None = None,
                 detect_only: bool = False) -> PatchResult:
        """One forward pass with the hooks ``on`` (Detector and Γ, only on ``rows`` when given;
        ``detect_only``: flags without Γ) or passing every map through."""
        # The hooks write each layer's flags in place, one (B, L, N) per request: on a GPU
        # allocated here (every layer writes it), on the CPU by the first layer that flags.
        flagged = self._no_flags(len(x), x.device) if on and self.tensor_only else None
        self._on, self._flags, self._rows, self._detect_only = on, flagged, rows, detect_only
        self._carried = None
        try:
            logits = self.model(x)
            flagged = self._flags
        finally:
            self._on, self._flags, self._rows, self._detect_only = False, None, None, False
            self._carried = None
        if flagged is None:
            return PatchResult.unpatched(logits, self.access.n_layers, self.access.seq_len)
        return PatchResult(logits, flagged)

    def _no_flags(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(batch, self.access.n_layers, self.access.seq_len, dtype=torch.bool, device=device)

    def observe(self, x: torch.Tensor, fn: Callable[[int, torch.Tensor, torch.Tensor], None]) -> PatchResult:
        """One "on" forward that calls ``fn(layer, before, after)`` at every layer (``before`` is
        ``after`` where the Detector does not run): offline inspection, such as heatmaps. The row
        gate is left out: this shows what the Detector and Γ do to every input."""
        self._observer = fn
        self.access.install(self._hook)
        try:
            return self._forward(x)
        finally:
            self._observer = None
            self._install()

    @contextmanager
    def bare(self):
        """The model without hooks (each attention layer back to its own, fused, path) for the
        duration: for reading unpatched maps and for baselines."""
        self.access.remove()
        try:
            yield self.model
        finally:
            self._install()

    def _install(self) -> None:
        self.access.install(self._hook, self.layers, all_eager=self._all_eager)

    def remove(self) -> None:
        self.access.remove()


class PatchedModel(nn.Module):
    """``AtPatch`` in a mode as a plain ``model(x) -> logits`` for the shared metrics."""

    def __init__(self, patch: AtPatch, mode: str = "on"):
        super().__init__()
        self.patch, self.mode, self.inner = patch, mode, patch.model

    def forward(self, x):
        return self.patch(x, self.mode).logits
