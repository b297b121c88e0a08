"""HTTP side of rectification jobs: ``POST /rectify`` → 202, ``GET /rectify/{id}``.

The request path only validates the pair and writes the job (:class:`offline.worker.JobStore`,
whose file format belongs to the worker); the worker runs it. When no external worker is
configured the server embeds one as a child process (:class:`EmbeddedWorker`).
"""
from __future__ import annotations

import base64
import binascii
import logging
import os
import signal
import subprocess
import sys

from repair.editing.layers import LayerError, resolve_layer
from repair.images import encode_png

from offline.worker import JobNotFound, JobStore  # the job format is the worker's
from server.errors import Conflict, NotFound, Unprocessable
from server.schemas import RectifyRequest

log = logging.getLogger("repair.server")


def b64decode(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Unprocessable(f"{what} is not valid base64") from None


def submit(store: JobStore, served, body: RectifyRequest, max_pixels: int) -> dict:
    """Validate the pairs against the served model, then queue the job (no model work here)."""
    if served.kind != "vision":
        raise Conflict("rectification needs an image model; this bundle serves a tabular one")
    for label in body.label or ():
        if label >= len(served.labels):
            raise Unprocessable(f"label {label} is out of range: the model has "
                                f"{len(served.labels)} classes (0..{len(served.labels) - 1})")
    if body.layer is not None:
        try:
            resolve_layer(served.model, body.layer)
        except LayerError as err:
            raise Unprocessable(str(err)) from None
    clean, corrupt = (_images(served, getattr(body, side), side, max_pixels) for side in ("clean", "corrupt"))
    same = (clean == corrupt).flatten(1).all(1).nonzero().flatten().tolist()
    if same:
        raise Unprocessable(f"clean and corrupt images are identical (pair {', '.join(map(str, same))}): "
                            "nothing to rectify")
    params = body.model_dump(exclude={"clean", "corrupt"})
    # Stored as lossless PNGs of exactly what the model would see.
    return store.submit([encode_png(x) for x in clean], [encode_png(x) for x in corrupt], params,
                        parent=served.id)


def _images(served, images: list[str], side: str, max_pixels: int):
    """One side of the pairs, decoded as /predict decodes images; errors name the side and pair."""
    data = [b64decode(b, f"{side} image {i}") for i, b in enumerate(images)]
    try:
        return served.preprocess_images(data, max_pixels)
    except ValueError as err:
        raise type(err)(f"{side} {err}") from None


def public(job: dict, status_url: str) -> dict:
    keep = ("id", "status", "created", "started", "finished", "duration_seconds", "attempts", "pairs",
            "params", "parent", "version", "layers", "rounds", "before", "after", "warnings", "error",
            "note")
    return {"job_id": job["id"], "status_url": status_url,
            **{k: job[k] for k in keep if k in job and k != "id"}}


def get(store: JobStore, job_id: str) -> dict:
    try:
        return store.get(job_id)
    except JobNotFound:
        raise NotFound(f"no rectification job {job_id!r}") from None


class EmbeddedWorker:
    """``python -m offline.worker`` as a child process; exits by itself if the server dies."""

    def __init__(self, bundle: str):
        self.bundle = str(bundle)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "offline.worker", "--bundle", self.bundle,
               "--parent-pid", str(os.getpid())]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        log.info("embedded worker started (pid %d)", self.proc.pid)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: an idle worker exits, a busy one requeues its job and exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
