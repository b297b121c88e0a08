"""Shared, session-scoped fixtures: trained zoo bundles are built once and reused by every test.

Tests must not mutate these bundles; copy one (``copy_bundle``) before writing versions to it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from repair.bundle import copy_bundle as _copy_bundle

torch.set_num_threads(int(os.environ.get("REPAIR_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo")


def _zoo(cache: Path, name: str, **options) -> Path:
    from offline.zoo import train_bundle

    out = cache / name
    if not (out / "CURRENT").exists():
        train_bundle(out, progress=False, **options)
    return out


@pytest.fixture(scope="session")
def digits_vit_badnets(zoo_cache) -> Path:
    """The issue's reference model: digits 16x16, ViT (embed 64, depth 3, patch 4), BadNets → 0."""
    return _zoo(zoo_cache, "digits-vit-badnets", dataset="digits", arch="vit", defect="badnets",
                target_class=0, seed=0)


@pytest.fixture(scope="session")
def digits_vit_blend(zoo_cache) -> Path:
    return _zoo(zoo_cache, "digits-vit-blend", dataset="digits", arch="vit", defect="blend",
                visibility=0.5, target_class=0, seed=0)


@pytest.fixture(scope="session")
def adult_ft(zoo_cache) -> Path:
    """Adult FT-Transformer (d 64, 3 blocks), naturally trained on 4000 rows for 3 epochs, UF
    measured on the first 2000 test rows (manifest metrics.uf: race, sex, age)."""
    return _zoo(zoo_cache, "adult-ft", dataset="adult", arch="ft-transformer", epochs=3,
                max_train=4000, max_test=2000, seed=0)


@pytest.fixture(scope="session")
def compas_ft(zoo_cache) -> Path:
    """COMPAS FT-Transformer, naturally trained (4937 rows, 6 epochs); protected race, sex."""
    return _zoo(zoo_cache, "compas-ft", dataset="compas", arch="ft-transformer", epochs=6, seed=0)


@pytest.fixture(scope="session")
def digits_vit_badnets_atpatch(zoo_cache, digits_vit_badnets) -> Path:
    """``digits_vit_badnets`` plus an AtPatch detector version, built once per session and
    shared (atpatch, server, deploy tests): never write into it.

    The paper's defaults (τ = 0.1, 50 epochs) with the target gate (``--target-gate``): the build
    takes under a minute on 2 threads. Why gated: the model this fixture trains depends on the
    CPU's float kernels. On an AVX-512 machine the trigger inversion finds the planted pattern
    shifted up one patch, which draws 3.5x the clean attention in layer 0; the Detector trained on
    it flags 11-14 % of clean test images and ungated builds cost 5-7 pt of accuracy on build seeds
    0/1/2, gated ones ±0 pt at ASR 0.3 % on all three (bench/results/atpatch_digits-avx512*.md).
    Builds are deterministic on one machine (seed 0); the thresholds the tests assert are the issue's."""
    out = zoo_cache / "digits-vit-badnets-atpatch"
    if not (out / "CURRENT").exists():
        from offline.atpatch_build import build_detector

        _copy_bundle(digits_vit_badnets, out)
        build_detector(out, epochs=50, threshold=0.1, target_gate=True, progress=False)
    return out


@pytest.fixture(scope="session")
def compas_ft_atpatch(zoo_cache, compas_ft) -> Path:
    """``compas_ft`` plus an AtPatch fairness detector for race and sex (``atpatch build
    --protected race,sex``), shared read-only; the paper's 50 epochs (~40 s on 2 threads)."""
    out = zoo_cache / "compas-ft-atpatch"
    if not (out / "CURRENT").exists():
        from offline.atpatch_build import build_detector

        _copy_bundle(compas_ft, out)
        build_detector(out, protected=["race", "sex"], epochs=50, progress=False)
    return out


@pytest.fixture
def copy_bundle(tmp_path):
    """Copy a shared bundle into this test's tmp dir so the test may write versions."""
    def copy(src: Path) -> Path:
        dst = tmp_path / src.name
        _copy_bundle(src, dst)
        return dst
    return copy
