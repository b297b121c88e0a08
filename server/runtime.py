"""The model lifecycle behind the HTTP layer: load → preprocess → predict → postprocess.

Nothing here knows about HTTP. :class:`ModelRuntime` loads the bundle's ``CURRENT`` version on
the chosen device, installs the AtPatch hooks when the version has a detector (CONTRACTS §1),
warms up, then reports ready; a watcher thread polls ``CURRENT`` (CONTRACTS §3) and hot-swaps:
a request holds the :class:`Served` it started with, so in-flight requests finish on their
version while new ones get the new one. Model calls are serialised by the batcher's single
thread (AtPatch instances are not re-entrant).
"""
from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

import torch

from repair.bundle import Bundle, BundleError, Version
from repair.cuda_graphs import GraphedForward, bucket
from repair.images import MAX_PIXELS, decode_image
from repair.models import resolve_device

log = logging.getLogger("repair.server")
MODES = ("on", "off", "shadow")


@dataclass
class BatchResult:
    """Model output for a batch, on the CPU; sliced per request by the batcher."""

    probabilities: torch.Tensor        # (B, K) float
    patched: torch.Tensor              # (B,) bool: the answer came from a patched pass
    flagged: torch.Tensor | None       # (B, L, N) bool, flagged columns of the patched pass
    added_seconds: float               # time the repair added to this batch
    shadow: "BatchResult | None" = None  # ?patch=shadow: the patched pass, not applied

    def __len__(self) -> int:
        return len(self.probabilities)

    def slice(self, a: int, b: int) -> "BatchResult":
        return BatchResult(self.probabilities[a:b], self.patched[a:b],
                           None if self.flagged is None else self.flagged[a:b],
                           self.added_seconds, None if self.shadow is None else self.shadow.slice(a, b))

    def columns(self, i: int) -> list[list[int]]:
        if self.flagged is None:
            return []
        return [[layer, token] for layer, token in self.flagged[i].nonzero().tolist()]


# The plain forward time per batch-size bucket, the reference of "added latency": the median of
# its last PLAIN_SAMPLES timings (the warm-up's, shadow requests' plain passes, and refreshes).
# Why refreshed: a server that answers with the patch on (the default) never runs a plain pass,
# so the warm-up's timings stood for its whole life. A warm-up on a busy machine (several
# replicas starting at once; here, beside a benchmark) reads far too long: one read 54 ms for a
# 0.6 ms forward, and a COMPAS server started then reported every added latency as 0 until it
# restarted (session 36). So once a bucket that patched requests use has no timing newer than
# PLAIN_REFRESH_SECONDS, the batcher, when idle, times one plain pass of it
# (``Served.refresh_plain``).
PLAIN_SAMPLES = 5
PLAIN_REFRESH_SECONDS = 30.0


class PlainTimes:
    """Plain forward seconds per bucket: recent timings, when the newest was taken, and which
    buckets patched passes use (only those are worth refreshing)."""

    def __init__(self):
        self._samples: dict[int, deque] = {}
        self._taken: dict[int, float] = {}
        self._used: set[int] = set()

    def observe(self, n: int, seconds: float, now: float | None = None) -> None:
        b = bucket(n)
        self._samples.setdefault(b, deque(maxlen=PLAIN_SAMPLES)).append(seconds)
        self._taken[b] = time.monotonic() if now is None else now

    def used(self, n: int) -> None:
        self._used.add(bucket(n))

    def estimate(self, n: int) -> float:
        """The bucket's median; an unmeasured bucket borrows the largest measured one's (0 when
        none is: a version loaded cold reports the whole patched pass as added)."""
        b = bucket(n)
        if b not in self._samples:
            if not self._samples:
                return 0.0
            b = max(self._samples)
        return statistics.median(self._samples[b])

    def stalest(self, now: float | None = None) -> int | None:
        """The used bucket whose newest timing is oldest, if older than PLAIN_REFRESH_SECONDS."""
        now = time.monotonic() if now is None else now
        age = {b: now - self._taken.get(b, float("-inf")) for b in self._used}
        b = max(age, key=age.get, default=None)
        return b if b is not None and age[b] > PLAIN_REFRESH_SECONDS else None


class Served:
    """One loaded version: its model on the device, its AtPatch hooks, its preprocessing."""

    def __init__(self, version: Version, device: torch.device, max_batch_size: int = 32,
                 warmup: bool = True, cuda_graphs: bool = True):
        self.version = version
        self.id = version.id
        self.device = device
        m = version.manifest
        self.kind = m.get("kind")
        if self.kind not in ("vision", "tabular"):
            raise BundleError(f"version {version.id}: manifest kind must be vision or tabular, got {self.kind!r}")
        self.labels = [str(label) for label in m.get("labels", [])]
        pre = m.get("preprocessing", {})
        self.schema = None
        if self.kind == "vision":
            self.shape = (int(pre["channels"]), int(pre["height"]), int(pre["width"]))
        else:
            from repair.tabular import TabularSchema

            self.schema = TabularSchema.from_json(pre)
            self.shape = (len(self.schema.features),)
        self.model = version.build_model(device)
        self.patcher = None
        if self._has_detector():
            from repair.atpatch.runtime import AtPatch

            self.patcher = AtPatch.from_version(version, self.model)
        self._graphed = self._graph_forwards(max_batch_size) if cuda_graphs else {}
        self.plain_times = PlainTimes()
        self.warm = warmup
        if warmup:
            self.warm_up(max_batch_size)

    def _has_detector(self) -> bool:
        if not self.version.has("detector"):
            return False
        try:
            from repair.atpatch.runtime import AtPatch
        except ImportError as err:
            raise BundleError(f"version {self.id} has a detector but AtPatch is not installed: {err}") from err
        return AtPatch.available(self.version)

    @property
    def has_patch(self) -> bool:
        return self.patcher is not None

    @property
    def cuda_graph_modes(self) -> list[str]:
        """The modes replayed from CUDA graphs (none on the CPU)."""
        return sorted(self._graphed)

    # -- preprocess ----------------------------------------------------------------------------

    def preprocess_images(self, images: list[bytes], max_pixels: int = MAX_PIXELS) -> torch.Tensor:
        if self.kind != "vision":
            raise ValueError("this model takes tabular 'records', not 'images'")
        c, h, w = self.shape
        out = []
        for i, data in enumerate(images):
            try:
                out.append(decode_image(data, channels=c, height=h, width=w, max_pixels=max_pixels))
            except ValueError as err:
                raise type(err)(f"image {i}: {err}") from None
        return torch.stack(out)

    def preprocess_records(self, records: list[dict]) -> torch.Tensor:
        if self.kind != "tabular":
            raise ValueError("this model takes 'images', not tabular 'records'")
        return self.schema.encode(records)

    def check_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """A raw input tensor (v2 protocol): shape and finiteness checked."""
        if x.dim() == len(self.shape):
            x = x.unsqueeze(0)
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"input shape {list(x.shape)} does not match the model's "
                             f"[batch, {', '.join(map(str, self.shape))}]")
        if not torch.isfinite(x).all():
            raise ValueError("input contains NaN or infinite values")
        if self.kind == "vision" and (x.min() < 0 or x.max() > 1):
            raise ValueError("image tensors must hold values in [0, 1]")
        if self.kind == "tabular":  # encoded rows: category ids must be valid vocabulary indices
            n_num = self.schema.n_numeric
            for j, card in enumerate(self.schema.cardinalities):
                col = x[:, n_num + j]
                if (col != col.round()).any() or (col < 0).any() or (col >= card).any():
                    name = self.schema.features[n_num + j].name
                    raise ValueError(f"column {n_num + j} ({name}) must hold category ids 0..{card - 1}")
        return x.float()

    # -- predict -------------------------------------------------------------------------------

    def run(self, x: torch.Tensor,
            mode: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The model call on the device, ``on`` or ``off``: logits, and with a detector the
        patched rows and flagged columns. Replayed from CUDA graphs where they were captured."""
        graphed = self._graphed.get(mode if self.patcher is not None else "off")
        if graphed is not None:
            out = graphed(x)  # (logits,) without a detector, else (logits, patched, flagged)
            return out if len(out) == 3 else (out[0], None, None)
        if self.patcher is None:
            return self.model(x), None, None
        r = self.patcher(x, mode)
        if r.nothing_flagged:  # ``_pass`` makes the one zeros tensor a batch result needs
            return r.logits, None, None
        return r.logits, r.patched, r.flagged

    def _graph_forwards(self, max_batch_size: int) -> dict:
        """On a GPU, both modes as CUDA graphs (``repair.cuda_graphs``), the AtPatch hook step
        compiled; not where a row gate reads a value per request (it cannot be captured)."""
        if self.device.type != "cuda" or (self.patcher is not None and self.patcher.gate is not None):
            return {}
        if self.patcher is None:
            return {"off": GraphedForward(lambda x: (self.model(x),), max_batch_size)}
        self.patcher.compile_hot_path(self.example(1).to(self.device))

        def forward(mode):
            def fn(x):
                r = self.patcher(x, mode)
                return r.logits, r.patched, r.flagged
            return GraphedForward(fn, max_batch_size)
        return {mode: forward(mode) for mode in ("on", "off")}

    @torch.inference_mode()
    def _pass(self, x: torch.Tensor, mode: str) -> tuple[BatchResult, float]:
        started = time.perf_counter()
        logits, patched, flagged = self.run(x, mode)
        probs = torch.softmax(logits.float(), dim=-1).cpu()  # the one host sync of the batch
        n = len(probs)
        patched = torch.zeros(n, dtype=torch.bool) if patched is None or mode == "off" else patched.cpu()
        flagged = None if flagged is None or mode == "off" else flagged.cpu()
        return BatchResult(probs, patched, flagged, 0.0), time.perf_counter() - started

    def forward(self, x: torch.Tensor, mode: str = "on") -> BatchResult:
        """Run one batch. ``on``: patched pass; ``off``: plain; ``shadow``: plain answer plus the
        patched pass reported beside it. Without a detector every mode is the plain model."""
        x = x.to(self.device, non_blocking=True)
        if self.patcher is None or mode == "off":
            result, seconds = self._pass(x, "off")
            self.plain_times.observe(len(x), seconds)
            return result
        patched, on_seconds = self._pass(x, "on")
        if mode == "on":
            self.plain_times.used(len(x))
            patched.added_seconds = max(0.0, on_seconds - self.plain_times.estimate(len(x)))
            return patched
        plain, off_seconds = self._pass(x, "off")
        self.plain_times.observe(len(x), off_seconds)
        plain.added_seconds = max(0.0, on_seconds - off_seconds)
        plain.shadow = patched
        return plain

    def refresh_plain(self, now: float | None = None) -> int | None:
        """Time one plain pass of the stalest bucket patched passes use (``PlainTimes``); the
        bucket refreshed, or None when every one is recent. On a synthetic batch: a plain
        forward's time does not depend on the values."""
        b = self.plain_times.stalest(now)
        if b is None:
            return None
        _, seconds = self._pass(self.example(b).to(self.device), "off")
        self.plain_times.observe(b, seconds, now)
        return b

    def example(self, n: int) -> torch.Tensor:
        if self.kind == "vision":
            return torch.rand((n, *self.shape), generator=torch.Generator().manual_seed(0))
        row = self.schema.encode([{f.name: (f.mean if f.kind == "numeric" else f.categories[0])
                                   for f in self.schema.features}])
        return row.expand(n, -1).clone()

    def warm_up(self, max_batch_size: int) -> None:
        """First calls allocate and pick kernels; also calibrate the plain time per bucket."""
        sizes = sorted({bucket(n) for n in (1, max_batch_size)} | {1, 2, 4, 8, 16, 32} - {0})
        sizes = [s for s in sizes if s <= max(1, bucket(max_batch_size))]
        for n in sizes:
            x = self.example(n).to(self.device)
            for mode in (("on", "off") if self.patcher else ("off",)):
                self._pass(x, mode)
            for _ in range(3):
                self.plain_times.observe(n, self._pass(x, "off")[1])

    def close(self) -> None:
        if self.patcher is not None:
            self.patcher.remove()


class ModelRuntime:
    """Loads, warms up, serves and hot-swaps the bundle's current version."""

    def __init__(self, bundle: str | Path, device: str = "auto", max_batch_size: int = 32,
                 poll_interval: float = 0.5, on_swap=None, cache_size: int = 2):
        self.bundle = Bundle(bundle)
        self.device = resolve_device(device)
        self.max_batch_size = max_batch_size
        self.poll_interval = poll_interval
        self.on_swap = on_swap
        self.cache_size = cache_size
        self._served: Served | None = None
        self._others: OrderedDict[str, Served] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self._failed: str | None = None

    @property
    def ready(self) -> bool:
        return self._served is not None

    @property
    def served(self) -> Served | None:
        return self._served

    def start(self) -> None:
        """Load in the background (the server answers 503 meanwhile), then watch CURRENT."""
        self._thread = threading.Thread(target=self._watch, name="version-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as err:  # keep serving the old version; report the error
                log.exception("loading the current version failed")
                self.error = f"loading the current version failed: {err}"
            self._stop.wait(self.poll_interval)

    def refresh(self) -> bool:
        """Swap to ``CURRENT`` if it changed; returns whether a swap happened."""
        with self._lock:
            current = self.bundle.current_id()
            old = self._served
            if old is not None and old.id == current:
                return False
            if self._failed == current:
                return False
            started = time.perf_counter()
            try:
                cached = self._others.pop(current, None)
                # one loaded on request only (cold, no CUDA graphs) is loaded afresh to be served
                new = cached if cached is not None and cached.warm else Served(
                    self.bundle.version(current), self.device, self.max_batch_size)
            except Exception:
                self._failed = current
                raise
            self._served, self.error, self._failed = new, None, None
            if old is not None:
                self._remember(old)
            log.info(json_line(event="version_served", version=new.id,
                               previous=old.id if old else None, device=str(self.device),
                               atpatch=new.has_patch, cuda_graphs=new.cuda_graph_modes,
                               load_seconds=round(time.perf_counter() - started, 2)))
        if self.on_swap is not None:
            self.on_swap(new.id, old.id if old else None)
        return True

    def _remember(self, served: Served) -> None:
        self._others[served.id] = served
        while len(self._others) > self.cache_size:
            self._others.popitem(last=False)  # dropped; requests still holding it finish on it

    def get(self, version_id: str | None = None) -> Served:
        """The served version, or another existing version (loaded on demand, cached)."""
        served = self._served
        if served is None:
            raise RuntimeError("not ready")
        if version_id is None or version_id == served.id:
            return served
        with self._lock:
            if version_id in self._others:
                self._others.move_to_end(version_id)
                return self._others[version_id]
            # served on request only: no warm-up, and no CUDA graphs (capturing them compiles for
            # seconds per batch size, which would stall the request that loads it)
            other = Served(self.bundle.version(version_id), self.device, self.max_batch_size,
                           warmup=False, cuda_graphs=False)
            self._remember(other)
            return other


def json_line(**fields) -> str:
    import json

    return json.dumps(fields, separators=(",", ":"), default=str)
