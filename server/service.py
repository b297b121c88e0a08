"""What every protocol front (``/predict``, v2 ``/infer``) shares: the runtime, the batcher,
the metrics and the jobs, plus :meth:`Service.infer`, the one path from an input tensor to a
:class:`server.runtime.BatchResult` with its metrics recorded."""
from __future__ import annotations

import hmac
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offline.worker import JobStore
from repair.images import MAX_PIXELS
from server.batching import MicroBatcher, Timing
from server.errors import Forbidden, NotReady, PayloadTooLarge, Unauthorized, Unprocessable
from server.metrics import Metrics
from server.runtime import MODES, BatchResult, ModelRuntime, Served


@dataclass
class Settings:
    bundle: str
    device: str = "auto"
    token: str | None = None
    insecure: bool = False
    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    max_body_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = MAX_PIXELS
    max_samples: int = 256
    poll_interval: float = 0.5
    embed_worker: bool = True
    model_name: str | None = None
    access_log: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def admin_enabled(self) -> bool:
        """/rectify and version changes: only with a token, or when explicitly insecure."""
        return bool(self.token) or self.insecure

    @property
    def name(self) -> str:
        return self.model_name or Path(self.bundle).resolve().name


class Service:
    def __init__(self, settings: Settings):
        # The event loop and the model thread share the GIL; at the default 5 ms switch interval
        # the loop waits up to 5 ms for it after every socket call while a forward runs
        # (a convoy that capped concurrency-32 throughput at ~30 req/s here).
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self.settings = settings
        self.store = JobStore(settings.bundle)
        self.metrics = Metrics(job_store=self.store)
        self.runtime = ModelRuntime(settings.bundle, settings.device, settings.max_batch_size,
                                    settings.poll_interval, on_swap=self._on_swap)
        self.batcher = MicroBatcher(self._run, settings.max_batch_size, settings.max_wait_ms,
                                    on_batch=self.metrics.batch_size.observe,
                                    inline=self.runtime.device.type == "cpu",
                                    on_idle=self._refresh_plain_times)

    def _on_swap(self, version: str, previous: str | None) -> None:
        self.metrics.served(version, previous)
        self.metrics.ready.set(1)

    @staticmethod
    def _run(served: Served, mode: str, x: torch.Tensor) -> BatchResult:
        return served.forward(x, mode)

    def _refresh_plain_times(self) -> None:
        served = self.runtime.served
        if served is not None:
            served.refresh_plain()

    # -- guards --------------------------------------------------------------------------------

    def served(self, version: str | None = None) -> Served:
        if not self.runtime.ready:
            raise NotReady(self.runtime.error or "the model is still loading; retry shortly")
        return self.runtime.get(version)

    def check_count(self, n: int) -> None:
        if n > self.settings.max_samples:
            raise PayloadTooLarge(f"{n} samples in one request; the limit is {self.settings.max_samples}")

    def authorize(self, authorization: str | None) -> None:
        s = self.settings
        if not s.admin_enabled:
            raise Forbidden("rectification and version changes are disabled: start the server "
                            "with --token (or --insecure on a trusted network)")
        if not s.token:
            return
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("this endpoint needs a bearer token: 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(value.strip().encode(), s.token.encode()):
            raise Unauthorized("wrong bearer token")

    # -- the one inference path ----------------------------------------------------------------

    async def infer(self, served: Served, x: torch.Tensor, mode: str, endpoint: str,
                    decode_seconds: float) -> tuple[BatchResult, Timing]:
        result, timing = await self.batcher.submit(served, mode, x)
        _require_finite(result)
        m = self.metrics
        m.duration.labels(endpoint=endpoint, stage="decode").observe(decode_seconds)
        m.duration.labels(endpoint=endpoint, stage="queue").observe(timing.queue_seconds)
        m.duration.labels(endpoint=endpoint, stage="model").observe(timing.model_seconds)
        m.samples.labels(endpoint=endpoint).inc(len(result))
        patched = result.shadow if result.shadow is not None else result
        if served.has_patch and mode != "off":
            m.added_latency.observe(result.added_seconds)
            n_patched = int(patched.patched.sum())
            if n_patched:
                m.patched_samples.labels(endpoint=endpoint).inc(n_patched)
            if patched.flagged is not None and n_patched:
                for layer, count in enumerate(patched.flagged.sum(dim=(0, 2)).tolist()):
                    if count:
                        m.patched_columns.labels(layer=str(layer)).inc(count)
        return result, timing


def _require_finite(result: BatchResult) -> None:
    """A sample whose answer is NaN or infinite is the client's input far outside what the model
    was trained on (a tabular value of 1e30 overflows the FT-Transformer): a 422 naming it, not a
    200 whose JSON would carry NaN."""
    for r in (result, result.shadow):
        if r is not None and not bool(torch.isfinite(r.probabilities).all()):  # one check per request
            bad = (~torch.isfinite(r.probabilities).all(-1)).nonzero().flatten().tolist()
            raise Unprocessable(f"the model's answer for sample(s) {bad[:10]} is not finite: their "
                                "values lie far outside what it was trained on")


def patch_mode(value: str | None) -> str:
    """The ``patch`` query parameter (or v2 request parameter); ``on`` when absent."""
    mode = value or "on"
    if mode not in MODES:
        raise Unprocessable(f"patch must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def predictions(served: Served, result: BatchResult) -> list[dict]:
    """Postprocess: one dict per sample, the ``/predict`` response item (DESIGN.md)."""
    probs = result.probabilities
    best = probs.argmax(dim=-1).tolist()
    rows = probs.tolist()
    added_ms = round(result.added_seconds * 1000.0, 4)
    patched = result.patched.tolist()
    shadow = result.shadow
    if shadow is not None:
        s_best, s_rows = shadow.probabilities.argmax(-1).tolist(), shadow.probabilities.tolist()
        s_patched = shadow.patched.tolist()
    out = []
    for i, k in enumerate(best):
        item = {"label": served.labels[k] if k < len(served.labels) else str(k), "class_index": k,
                "probabilities": rows[i], "patched": patched[i],
                "patched_columns": result.columns(i) if patched[i] else [],
                "added_latency_ms": added_ms}
        if shadow is not None:
            sk = s_best[i]
            item["shadow"] = {"patched": s_patched[i],
                              "patched_columns": shadow.columns(i) if s_patched[i] else [],
                              "label": served.labels[sk] if sk < len(served.labels) else str(sk),
                              "class_index": sk, "probabilities": s_rows[i], "changed": sk != k}
        out.append(item)
    return out


def now() -> float:
    return time.perf_counter()
