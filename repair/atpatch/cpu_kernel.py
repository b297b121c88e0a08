"""AtPatch's CPU hot path compiled (``cpu_kernel.cpp``): the Detector (Eq. 5-6) and Γ (Eq. 11),
one C++ function each.

Why: at inference their torch ops (16 for the Detector, ``Detector.logits_from_heads``; ~15 for
Γ, ``redistribution.redistribute``) run between the model's own ops, where each costs 2-3x what
it costs back to back, and at batch 1 their dispatch is all there is. On an Intel Xeon with
AVX-512 (digits ViT maps, 4 heads x 17 x 17, a tight loop) the Detector's torch ops take 46-49 µs
at batch 1 and ~180 µs at batch 64, the kernel 6-8 µs and 94-124 µs: it sums heads and rows in
one pass and runs the per-column MLP 8 columns at a time in vector registers; only the log is an
ATen call. Γ: 61 → 4 µs and 880 → 160 µs. Inside the forward, over the eager model, in one run
(``bench/results/atpatch_latency_xeon.md``; batch 1 / 64): unpatched +22.3 / +17.5 % with the
torch ops, +5.3 / +8.2 % compiled (target ≤ 10 %); patched +40.1 / +27.4 % → +9.0 / +13.5 %.

Numbers: the Detector's logits are the torch ops' within 1e-6 (float sums in another order); Γ
gives the same values up to the order of its row sums (≤ 3e-7), copies unflagged samples bit for
bit, and is exact where a row's sums have one term.

How: torch's C++ extension builder (g++ and ninja, ``scripts/setup.sh`` installs both) compiles
them on first use, ~30 s, into ``$REPAIR_PROXY_KERNEL_DIR`` (default
``~/.cache/repair-proxy/kernels``) under a name that hashes the source, the flags and the torch
and Python versions; later processes import that build directly, without a compiler (the Docker
image compiles it in its build stage). Processes starting together build it once (a file lock
the OS releases if its holder dies, so a killed build never blocks the next). Where it cannot
be built, AtPatch warns once and uses the torch ops: the same numbers, slower. GPU paths never
use it.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

from repair.atpatch.detector import Detector
from repair.atpatch.redistribution import redistribute

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
_NO_BENIGN = torch.empty(0)  # Γ's masked variant (Q = 0) in the kernel's arguments
CHANNELS, HIDDEN = 16, 32  # the widths the kernel is compiled for (``cpu_kernel.cpp``)


def kernel_dir() -> Path:
    return Path(os.environ.get("REPAIR_PROXY_KERNEL_DIR", Path.home() / ".cache" / "repair-proxy" / "kernels"))


def _flags() -> list[str]:
    # AVX2 + FMA where torch itself runs its AVX2 or AVX-512 kernels; the build is per machine.
    simd = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return ["-O3", "-mavx2", "-mfma"] if simd else ["-O3"]


def _name(flags: list[str]) -> str:
    key = "\0".join([SOURCE.read_text(), *flags, torch.__version__, sys.version])
    return "repair_atpatch_" + hashlib.sha256(key.encode()).hexdigest()[:16]


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernels' module, built on first use; None (with one warning) where it cannot be."""
    flags = _flags()
    name = _name(flags)
    build = kernel_dir() / name
    built = build / f"{name}.so"
    try:
        if built.exists():
            return _import(name, built)
        build.mkdir(parents=True, exist_ok=True)
        # One builder at a time, by a lock the OS releases when its holder dies: a process that
        # finds the build finished while it waited imports it.
        with open(build / "build.flock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            if built.exists():
                return _import(name, built)
            return _build(name, flags, build)
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, a failed build: the torch ops
        warnings.warn(f"AtPatch: the compiled CPU kernels are unavailable, using torch ops (slower): {err}")
        return None


def _import(name: str, built: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, built)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(name: str, flags: list[str], build: Path) -> ModuleType:
    """Build under ``load``'s lock."""
    import ninja
    from torch.utils.cpp_extension import load as build_extension

    # torch's builder waits for as long as its own lock file exists; holding ours, any such file
    # is what a killed build left behind, and would block every later load for ever
    (build / "lock").unlink(missing_ok=True)
    # it runs `ninja` from PATH: the pip package's binary, which a venv's PATH may not hold
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    try:
        return build_extension(name, [str(SOURCE)], extra_cflags=flags, build_directory=str(build))
    finally:
        os.environ["PATH"] = path


class CompiledDetector:
    """``Detector.logits_from_heads`` through the kernel (CPU float32 maps, after ``prepare``),
    with the logits' maximum: ``(logits (B, N), max)``."""

    def __init__(self, detector: Detector, kernel: ModuleType):
        self.detector, self.kernel = detector, kernel
        self._weights: dict[tuple[int, int, int], tuple] = {}

    def __call__(self, attn: torch.Tensor, layer: int) -> tuple[torch.Tensor, float]:
        key = (layer, attn.shape[1], attn.shape[2])
        weights = self._weights.get(key)
        if weights is None:
            weights = self._weights[key] = self._kernel_weights(*key)
        return self.kernel.detector_logits(attn, *weights)

    def _kernel_weights(self, layer: int, heads: int, nq: int) -> tuple:
        """The sum form's weights (``Detector._sum_form``) laid out as the kernel reads them."""
        f, w = self.detector._fast, self.detector._sum_form(layer, heads, nq)
        mix_b_t = f["mix_b_t"][layer]                                    # (hidden, N)
        pad = -mix_b_t.shape[1] % self.kernel.lanes                      # zero columns to a full vector
        return (w["q_per_head"].contiguous(), w["eps_q"].contiguous(), w["conv_w"].t().contiguous(),
                w["neg_median_w"].contiguous(), f["conv_b"].contiguous(), f["mix_w"].contiguous(),
                torch.nn.functional.pad(mix_b_t, (0, pad)).contiguous(), f["out_w"].contiguous(),
                float(f["out_b"]))


def cpu_scores(detector: Detector, compiled: bool = True):
    """What the CPU hot path calls for a prepared Detector: ``(attn, layer) -> (logits, max)``, the
    kernel where it is built (and ``compiled``), else the torch ops."""
    if compiled and (detector.channels, detector.hidden) == (CHANNELS, HIDDEN):
        kernel = load()
        if kernel is not None:
            return CompiledDetector(detector, kernel)

    def torch_ops(attn: torch.Tensor, layer: int) -> tuple[torch.Tensor, float]:
        logits = detector.logits_from_heads(attn, layer)
        return logits, float(logits.max())

    return torch_ops


def cpu_redistribute(compiled: bool = True):
    """What the CPU hot path calls for Γ, with ``redistribute``'s signature: the kernel where it is
    built (and ``compiled``), else ``redistribute`` itself."""
    kernel = load() if compiled else None
    if kernel is None:
        return redistribute

    def kernel_redistribute(attn: torch.Tensor, flags: torch.Tensor, benign: torch.Tensor | None,
                            rescale: bool = True) -> torch.Tensor:
        return kernel.redistribute(attn, flags, _NO_BENIGN if benign is None else benign, rescale)

    return kernel_redistribute
