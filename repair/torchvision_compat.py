"""Let timm and transformers import on a CPU-only torch next to a CUDA torchvision build.

On this platform the only torchvision that matches torch 2.13 is a CUDA build. Its compiled
operators fail to load against the CPU torch, and torchvision's Python code then dies
registering fake kernels for ``torchvision::nms`` / ``torchvision::qnms`` -- schemas that were
never defined. ``import timm`` (and transformers' vision models) import torchvision, so they fail.

Defining those two schemas first lets the pure-Python parts of torchvision import; nothing here
ever *runs* nms. Where the real operators load (a CUDA image with a matching torch), they are
loaded first, so the schemas exist and this is a no-op: defining them there would make
torchvision's own registration abort the process. Call :func:`ensure_torchvision_importable`
before importing timm/transformers; ``repair/__init__.py`` does it once for the whole package.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keep the Library object alive: dropping it unregisters the schemas


def _has_op(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def missing_ops() -> list[str]:
    """The torchvision operator schemas that are not registered in this process."""
    return [name for name in _SCHEMAS if not _has_op(name)]


def _load_compiled_ops() -> None:
    """Load torchvision's compiled operators where they match this torch (without importing
    torchvision): afterwards its schemas are registered exactly when they really work."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for lib in Path(spec.submodule_search_locations[0]).glob("_C*.so"):
        try:
            torch.ops.load_library(str(lib))
        except OSError:  # built against another torch: the schemas are defined below instead
            pass


def ensure_torchvision_importable() -> list[str]:
    """Define the missing schemas (if any) and return which ones were defined."""
    global _library
    if missing_ops():
        _load_compiled_ops()
    missing = missing_ops()
    if not missing:
        return []
    if _library is None:
        _library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _library.define(_SCHEMAS[name])
    return missing
