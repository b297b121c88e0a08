"""AtPatch's compiled CPU hot path (``repair.atpatch.cpu_kernel``): the Detector's logits (Eq. 5-6)
and Γ (Eq. 11) as the torch ops give them, built where setup.sh put g++ and ninja, imported
without a compiler once built, and replaced by the torch ops where it cannot be built."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from repair.atpatch import cpu_kernel
from repair.atpatch.detector import Detector
from repair.atpatch.redistribution import redistribute


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
    compiled = cpu_kernel.cpu_scores(det)
    assert isinstance(compiled, cpu_kernel.CompiledDetector)  # setup.sh installs g++ and ninja
    for layer, nq in enumerate(det.query_lens):
        for batch, heads in ((1, 4), (6, 3)):
            attn = torch.randn(batch, heads, nq, n).mul(3).softmax(-1)
            logits, top = compiled(attn, layer)
            torch.testing.assert_close(logits, det(attn.mean(1), layer), atol=1e-5, rtol=0)
            assert top == logits.max().item()
            assert (logits > 0).any() and (logits < 0).any()
    # a map with NaN (a model that overflowed): what the torch ops give, no undefined ordering
    attn = torch.randn(3, 4, n, n).softmax(-1)
    attn[1, 0, 2, 1] = float("nan")
    torch.testing.assert_close(compiled(attn, 0)[0], det.logits_from_heads(attn, 0), atol=1e-5, rtol=0,
                               equal_nan=True)
    # a view that is not contiguous, e.g. a map computed with its heads last
    attn = torch.randn(2, n, 4, n).softmax(-1).transpose(1, 2)
    torch.testing.assert_close(compiled(attn, 0)[0], det(attn.mean(1), 0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("nq", [1, 17])
def test_the_kernels_redistribution_is_eq_11(nq):
    torch.manual_seed(nq)
    n = 17
    attn = torch.randn(6, 4, nq, n).mul(3).softmax(-1)
    flags = torch.zeros(6, n, dtype=torch.bool)
    flags[1, 3] = True                   # one column
    flags[2, [0, 5, 16]] = True          # several at once
    flags[3] = True                      # every column
    flags[4, 7] = True
    attn[4, :, :, 7] = 1.0               # rows with all their mass on the flagged column
    attn[4] /= attn[4].sum(-1, keepdim=True)
    flags[5, 7] = True                   # sample 0 keeps nothing flagged
    benign = torch.randn(nq, n).softmax(-1)
    compiled = cpu_kernel.cpu_redistribute()
    assert compiled is not redistribute
    for q in (benign, None):             # replace and masked (Q = 0)
        for rescale in (True, False):    # and the paper's "w/o Rec." ablation
            out = compiled(attn, flags, q, rescale=rescale)
            torch.testing.assert_close(out, redistribute(attn, flags, q, rescale=rescale), atol=1e-6, rtol=0)
            assert torch.equal(out[0], attn[0])  # nothing flagged: bit for bit
            if rescale:  # rows sum to 1, but for masked rows that had nothing left unflagged
                rows = list(range(6)) if q is not None else [0, 1, 2, 4, 5]
                torch.testing.assert_close(out[rows].sum(-1), torch.ones(len(rows), 4, nq), atol=1e-5, rtol=0)
    # a flagged column holds Q (replace) or 0 (masked)
    assert torch.equal(compiled(attn, flags, benign)[1, :, :, 3], benign[:, 3].expand(4, nq))
    assert not compiled(attn, flags, None)[2][..., [0, 5, 16]].any()


def test_a_detector_of_other_widths_keeps_the_torch_ops():
    det = _detector(5, [5])
    small = Detector(1, 5, channels=8)
    small.set_benign([torch.randn(5, 5).softmax(-1)])
    small.prepare()
    attn = torch.randn(2, 3, 5, 5).softmax(-1)
    for d in (small, det):  # too narrow for the kernel; not compiled on request
        scores = cpu_kernel.cpu_scores(d, compiled=d is small)
        assert not isinstance(scores, cpu_kernel.CompiledDetector)
        logits, top = scores(attn, 0)
        assert torch.equal(logits, d.logits_from_heads(attn, 0)) and top == logits.max().item()
    assert cpu_kernel.cpu_redistribute(compiled=False) is redistribute


def _load_in_subprocess(**env: str) -> subprocess.CompletedProcess:
    script = ("from repair.atpatch import cpu_kernel as k; "
              "print('compiled' if k.load() is not None else 'torch ops')")
    full = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    return subprocess.run([sys.executable, "-c", script], env={**full, **env},
                          capture_output=True, text=True, timeout=300, check=True)


def test_a_built_kernel_loads_without_a_compiler_and_an_unbuildable_one_falls_back(tmp_path):
    assert cpu_kernel.load() is not None  # built (or found) by this process
    no_tools = str(tmp_path / "empty-path")     # neither c++ nor anything else on PATH
    # a server or container after the build: imports the cached build, needs no compiler
    assert _load_in_subprocess(PATH=no_tools).stdout.strip() == "compiled"
    # nothing built in this kernel directory and no compiler: a warning, then the torch ops; the
    # lock file of a build that was killed does not make it wait (torch's builder would, for ever)
    fresh = tmp_path / "kernels"
    stale = fresh / cpu_kernel._name(cpu_kernel._flags()) / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()
    out = _load_in_subprocess(PATH=no_tools, REPAIR_PROXY_KERNEL_DIR=str(fresh))
    assert out.stdout.strip() == "torch ops"
    assert "compiled CPU kernels are unavailable" in out.stderr
