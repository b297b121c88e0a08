"""The repair bundle: a directory of immutable, versioned model states (see DESIGN.md).

    BUNDLE/CURRENT                  the served version id (replaced atomically by rename)
    BUNDLE/versions/<id>/           manifest.json, model.safetensors, optional artefacts

A version is written into a hidden temp directory, every file fsynced, then renamed into
``versions/`` in one step, and only then is ``CURRENT`` replaced (temp file + rename). A crash at
any point leaves the previous version served and no partial version visible. Weights are read
with safetensors only: a pickle in a version is refused, because loading one runs code.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from repair.models import build_model

MANIFEST = "manifest.json"
EDITS = "edits.json"
# Tensor artefacts a version may hold; nothing else (no pickle, no code) is ever read.
TENSOR_FILES = ("model", "detector", "benign", "keystats", "defect", "protected_prior")
ALLOWED_FILES = {MANIFEST, EDITS} | {f"{name}.safetensors" for name in TENSOR_FILES}
MAX_VERSION_ID = 64  # characters (ids written here are v0001, v0002, ...)


class BundleError(Exception):
    """A bundle or version that is missing, malformed, or holds files we refuse to read."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; safetensors refuses shared or strided storage."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def copy_bundle(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a whole bundle (every version and CURRENT) to ``dst``, e.g. to build on it without
    touching the original. The copied versions stay read-only: new versions are new directories."""
    if not Bundle(src).exists():
        raise BundleError(f"{src} is not a repair bundle (no CURRENT file)")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".tmp-*", ".CURRENT-*"))
    return Path(dst)


@dataclass(frozen=True)
class Version:
    """One immutable version, read lazily."""

    id: str
    path: Path
    manifest: dict

    @property
    def parent(self) -> str | None:
        return self.manifest.get("parent")

    def has(self, artefact: str) -> bool:
        return (self.path / f"{artefact}.safetensors").is_file()

    def tensors(self, artefact: str) -> dict[str, torch.Tensor]:
        """Load ``<artefact>.safetensors`` (checked against the manifest's hash)."""
        if artefact not in TENSOR_FILES:
            raise BundleError(f"unknown artefact {artefact!r}; known: {', '.join(TENSOR_FILES)}")
        path = self.path / f"{artefact}.safetensors"
        if not path.is_file():
            raise BundleError(f"version {self.id} has no {path.name}")
        expected = self.manifest.get("files", {}).get(path.name)
        if expected is not None and _sha256(path) != expected:
            raise BundleError(f"{path} does not match the hash in its manifest (corrupted?)")
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise BundleError(f"{path} is not a readable safetensors file: {err}") from err

    def edits(self) -> list[dict]:
        path = self.path / EDITS
        return json.loads(path.read_text()) if path.is_file() else []

    def build_model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The version's classifier with its weights, in eval mode."""
        model = build_model(self.manifest["architecture"])
        model.load_state_dict(self.tensors("model"), strict=True)
        return model.to(device).eval()


class Bundle:
    """A bundle directory. ``Bundle(path)`` opens one; :meth:`write_version` adds versions."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"

    # -- reading -----------------------------------------------------------------------------

    def exists(self) -> bool:
        return (self.root / "CURRENT").is_file()

    def current_id(self) -> str:
        pointer = self.root / "CURRENT"
        if not pointer.is_file():
            raise BundleError(f"{self.root} is not a repair bundle (no CURRENT file)")
        return pointer.read_text().strip()

    def version_ids(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir()
                      if p.is_dir() and not p.name.startswith("."))

    def version(self, version_id: str | None = None) -> Version:
        """Open a version (default: the current one), refusing anything but safetensors + JSON."""
        version_id = version_id or self.current_id()
        # ids come from clients too (``POST /versions/{id}/activate``): a name of this folder's,
        # never a path, and short enough for any file system (a 5000-character id was a 500)
        if not version_id or "/" in version_id or "\0" in version_id or version_id.startswith(".") \
                or len(version_id) > MAX_VERSION_ID:
            shown = version_id if len(version_id or "") <= MAX_VERSION_ID else version_id[:MAX_VERSION_ID] + "..."
            raise BundleError(f"invalid version id {shown!r}")
        path = self.versions_dir / version_id
        if not path.is_dir():
            raise BundleError(f"bundle {self.root} has no version {version_id!r}")
        foreign = sorted(p.name for p in path.iterdir() if p.name not in ALLOWED_FILES)
        if foreign:
            raise BundleError(
                f"version {version_id} holds {', '.join(foreign)}: a version may only hold "
                f"{', '.join(sorted(ALLOWED_FILES))} (weights are read as safetensors only, never pickle)")
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError as err:
            raise BundleError(f"version {version_id} has no {MANIFEST}") from err
        except json.JSONDecodeError as err:
            raise BundleError(f"{path / MANIFEST} is not valid JSON: {err}") from err
        return Version(id=version_id, path=path, manifest=manifest)

    # -- writing -----------------------------------------------------------------------------

    def write_version(self, manifest: dict, tensors: dict[str, dict[str, torch.Tensor]],
                      edits: list[dict] | None = None, parent: str | None = None,
                      activate: bool = True) -> Version:
        """Write a new immutable version atomically and (by default) make it current.

        ``tensors`` maps artefact names (``model``, ``detector``, ...) to tensor dicts. Artefacts
        not given are copied from ``parent`` (a detector build keeps the parent's weights).
        """
        if "model" not in tensors and parent is None:
            raise BundleError("a version without a parent needs model weights")
        unknown = set(tensors) - set(TENSOR_FILES)
        if unknown:
            raise BundleError(f"unknown artefacts {sorted(unknown)}; known: {', '.join(TENSOR_FILES)}")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        parent_version = self.version(parent) if parent else None
        staging = self.root / f".tmp-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            files = {}
            for name in TENSOR_FILES:
                target = staging / f"{name}.safetensors"
                if name in tensors:
                    save_file({k: v.detach().cpu().contiguous() for k, v in tensors[name].items()}, target)
                elif parent_version is not None and parent_version.has(name):
                    shutil.copyfile(parent_version.path / target.name, target)
                else:
                    continue
                with open(target, "rb") as f:
                    os.fsync(f.fileno())
                files[target.name] = _sha256(target)
            all_edits = (parent_version.edits() if parent_version else []) + list(edits or [])
            if all_edits:
                _write_bytes(staging / EDITS, json.dumps(all_edits, indent=1).encode())
            version_id = self._publish(staging, manifest, files, parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if activate:
            self.activate(version_id)
        return self.version(version_id)

    def _publish(self, staging: Path, manifest: dict, files: dict, parent: str | None) -> str:
        """Pick the next free id and rename the staged directory into place (atomic)."""
        number = len(self.version_ids()) + 1
        while True:
            version_id = f"v{number:04d}"
            full = dict(manifest, id=version_id, parent=parent, created=time.time(), files=files)
            _write_bytes(staging / MANIFEST, json.dumps(full, indent=1, sort_keys=True).encode())
            for f in staging.iterdir():
                f.chmod(0o444)
            _fsync_dir(staging)
            try:
                os.rename(staging, self.versions_dir / version_id)  # fails if the id is taken
            except OSError:
                number += 1
                continue
            _fsync_dir(self.versions_dir)
            return version_id

    def activate(self, version_id: str) -> None:
        """Point ``CURRENT`` at an existing version (rename over the old pointer)."""
        self.version(version_id)  # validates
        pointer_tmp = self.root / f".CURRENT-{uuid.uuid4().hex}"
        _write_bytes(pointer_tmp, version_id.encode())
        os.replace(pointer_tmp, self.root / "CURRENT")
        _fsync_dir(self.root)

    def rollback(self) -> str:
        """Serve the current version's parent again; returns its id."""
        parent = self.version().parent
        if parent is None:
            raise BundleError(f"version {self.current_id()} has no parent to roll back to")
        self.activate(parent)
        return parent
