"""AtPatch fixtures: one detector build on the shared digits BadNets bundle per test session."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# Reduced from the paper's 50 epochs to fit the test budget; the thresholds asserted are the issue's.
TEST_EPOCHS = 25
# τ = 0.3, not the paper's 0.1: measured on this model (bench/results/atpatch_digits.md), τ = 0.1 flags
# too many clean maps and costs 0.56 pt of accuracy; ASR is 0 % at both.
TEST_THRESHOLD = 0.3


@pytest.fixture(scope="session")
def digits_patched(digits_vit_badnets, tmp_path_factory) -> Path:
    """A writable copy of the shared BadNets bundle with an AtPatch detector built on it."""
    from offline.atpatch_build import build_detector

    dst = tmp_path_factory.mktemp("atpatch") / "digits-badnets"
    shutil.copytree(digits_vit_badnets, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    build_detector(dst, epochs=TEST_EPOCHS, threshold=TEST_THRESHOLD, progress=False)
    return dst
