"""The embedded demo: a small backdoored digits ViT bundle, built once and cached.

``repair-proxy demo`` serves :func:`demo_bundle`. The bundle lives under
``$REPAIR_PROXY_HOME/demo`` (default ``~/.cache/repair-proxy/demo``); a second call returns the
cached bundle without training. The build goes to a temp directory first and is renamed into
place, so an interrupted build never leaves a half-made demo behind.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from repair.bundle import Bundle

# The reference model: digits 16x16, ViT (embed 64, depth 3, patch 4), BadNets -> class 0.
DEMO_OPTIONS = dict(dataset="digits", arch="vit", defect="badnets", target_class=0, seed=0)
# Its detector: the paper's defaults (50 epochs, τ = 0.1) served with the target gate, which keeps
# clean accuracy on every CPU the model was measured on (bench/results/atpatch_digits*.md).
DEMO_BUILD = dict(target_gate=True)


def demo_home() -> Path:
    home = os.environ.get("REPAIR_PROXY_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "repair-proxy"


def demo_bundle(progress: bool = True) -> Path:
    """Path of the demo bundle, training the model and its AtPatch detector on first use."""
    from offline.atpatch_build import build_detector
    from offline.zoo import train_bundle
    from repair.atpatch.detector import DESIGN

    target = demo_home() / "demo"
    bundle = Bundle(target)
    if bundle.exists():
        design = bundle.version().manifest.get("atpatch", {}).get("detector", {}).get("design")
        if design != DESIGN:  # built by an older release: the detector (not the model) is rebuilt
            build_detector(target, progress=progress, **DEMO_BUILD)
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".demo-{uuid.uuid4().hex}"
    try:
        train_bundle(staging, progress=progress, **DEMO_OPTIONS)
        # The detector is built before the rename, so the demo serves AtPatch from its first request.
        build_detector(staging, progress=progress, **DEMO_BUILD)
        try:
            os.rename(staging, target)
        except OSError:
            if not Bundle(target).exists():  # another process won the race: use theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
