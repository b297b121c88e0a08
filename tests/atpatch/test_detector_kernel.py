"""The compiled CPU Detector (``repair.atpatch.detector_kernel``): the same logits as the
Detector's Eq. 5-6, built where setup.sh put g++ and ninja, imported without a compiler once
built, and replaced by the torch ops where it cannot be built."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from repair.atpatch import detector_kernel
from repair.atpatch.detector import Detector


def _detector(n: int, query_lens: list[int]) -> Detector:
    """A prepared, position-aware Detector with random weights whose logits straddle 0."""
    torch.manual_seed(n)
    det = Detector(len(query_lens), n, query_lens=query_lens, token_embedding=True)
    with torch.no_grad():
        for p in (det.layer_emb, det.token_emb):
            torch.nn.init.normal_(p)
        det.out.bias.fill_(-8.0)
    det.set_benign([torch.randn(nq, n).softmax(-1) for nq in query_lens])
    det.prepare()
    return det


@pytest.mark.parametrize("n", [5, 18])  # fewer tokens than one 8-column block; several, an even count
def test_the_kernel_gives_the_detectors_logits(n):
    det = _detector(n, [n, n, 1])  # the FT-Transformer's last layer attends from [CLS] only
    compiled = detector_kernel.cpu_logits(det)
    assert isinstance(compiled, detector_kernel.CompiledDetector)  # setup.sh installs g++ and ninja
    for layer, nq in enumerate(det.query_lens):
        for batch, heads in ((1, 4), (6, 3)):
            attn = torch.randn(batch, heads, nq, n).mul(3).softmax(-1)
            logits = compiled(attn, layer)
            torch.testing.assert_close(logits, det(attn.mean(1), layer), atol=1e-5, rtol=1e-5)
            assert (logits > 0).any() and (logits < 0).any()
    # a view that is not contiguous, e.g. a map computed with its heads last
    attn = torch.randn(2, n, 4, n).softmax(-1).transpose(1, 2)
    torch.testing.assert_close(compiled(attn, 0), det(attn.mean(1), 0), atol=1e-5, rtol=1e-5)


def test_a_detector_of_other_widths_keeps_the_torch_ops():
    det = Detector(1, 5, channels=8)
    det.prepare()
    assert detector_kernel.cpu_logits(det) == det.logits_from_heads


def _load_in_subprocess(**env: str) -> subprocess.CompletedProcess:
    script = ("from repair.atpatch import detector_kernel as k; "
              "print('compiled' if k.load() is not None else 'torch ops')")
    full = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    return subprocess.run([sys.executable, "-c", script], env={**full, **env},
                          capture_output=True, text=True, timeout=300, check=True)


def test_a_built_kernel_loads_without_a_compiler_and_an_unbuildable_one_falls_back(tmp_path):
    assert detector_kernel.load() is not None  # built (or found) by this process
    no_tools = str(tmp_path / "empty-path")     # neither c++ nor anything else on PATH
    # a server or container after the build: imports the cached build, needs no compiler
    assert _load_in_subprocess(PATH=no_tools).stdout.strip() == "compiled"
    # nothing built in this kernel directory and no compiler: a warning, then the torch ops
    fresh = _load_in_subprocess(PATH=no_tools, REPAIR_PROXY_KERNEL_DIR=str(tmp_path / "kernels"))
    assert fresh.stdout.strip() == "torch ops"
    assert "compiled CPU Detector is unavailable" in fresh.stderr
