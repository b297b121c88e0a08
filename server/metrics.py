"""Prometheus metrics (CONTRACTS §4: names, labels and buckets are fixed there).

One :class:`Metrics` per app, in its own registry, so several apps in one process (tests) do not
clash. With ``PROMETHEUS_MULTIPROC_DIR`` set (``--workers > 1``) values live in per-process
files and ``/metrics`` merges them with ``MultiProcessCollector``; the env var must be set before
``prometheus_client`` is first imported, which :func:`server.app.serve` guarantees.
Rectification-job metrics are read from the job files in the bundle at scrape time, so they are
exact whichever process (embedded or external worker) ran the job, and survive restarts.
"""
from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

ADDED_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                         0.25, 0.5, 1.0)
DURATION_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
JOB_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
disable_created_metrics()  # the *_created series only add noise to every scrape


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class JobsCollector:
    """``repair_rectify_jobs_total{outcome}`` and ``repair_rectify_job_duration_seconds`` from
    the finished job files (``JobStore.finished()``), cached by the jobs directory's mtime."""

    def __init__(self, store):
        self.store = store
        self._cache: tuple[float, list[dict]] | None = None

    def _finished(self) -> list[dict]:
        try:
            stamp = Path(self.store.dir).stat().st_mtime
        except FileNotFoundError:
            return []
        if self._cache is None or self._cache[0] != stamp:
            self._cache = (stamp, self.store.finished())
        return self._cache[1]

    def collect(self):
        jobs = self._finished()
        total = CounterMetricFamily("repair_rectify_jobs", "Rectification jobs by outcome",
                                    labels=["outcome"])
        for outcome in ("succeeded", "failed"):
            total.add_metric([outcome], sum(j["status"] == outcome for j in jobs))
        yield total
        durations = [float(j["duration_seconds"]) for j in jobs
                     if j.get("duration_seconds") is not None]
        buckets = [(repr(float(bound)), sum(d <= bound for d in durations)) for bound in JOB_BUCKETS]
        buckets.append(("+Inf", len(durations)))
        hist = HistogramMetricFamily("repair_rectify_job_duration_seconds",
                                     "Wall time of finished rectification jobs")
        hist.add_metric([], buckets, sum(durations))
        yield hist


class Metrics:
    def __init__(self, job_store=None):
        self.multiprocess = multiprocess_dir() is not None
        # In multiprocess mode values go to files; the registry is built per scrape.
        registry = None if self.multiprocess else CollectorRegistry()
        self.registry = registry
        self.job_store = job_store
        kw = {"registry": registry}
        self.requests = Counter("repair_requests_total", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], **kw)
        self.samples = Counter("repair_samples_total", "Samples (images/records) answered",
                               ["endpoint"], **kw)
        self.patched_samples = Counter("repair_patched_samples_total",
                                       "Samples whose attention AtPatch changed", ["endpoint"], **kw)
        self.patched_columns = Counter("repair_patched_columns_total",
                                       "Flagged (layer, token) attention columns, by layer",
                                       ["layer"], **kw)
        self.added_latency = Histogram("repair_added_latency_seconds",
                                       "Time AtPatch added to a request",
                                       buckets=ADDED_LATENCY_BUCKETS, **kw)
        self.duration = Histogram("repair_request_duration_seconds",
                                  "Request time by stage (decode, queue, model, total)",
                                  ["endpoint", "stage"], buckets=DURATION_BUCKETS, **kw)
        self.inflight = Gauge("repair_inflight_requests", "Requests being served",
                              multiprocess_mode="livesum", **kw)
        self.batch_size = Histogram("repair_batch_size", "Samples per model call",
                                    buckets=BATCH_BUCKETS, **kw)
        self.version_info = Gauge("repair_model_version_info",
                                  "1 for the served model version, 0 for versions served before",
                                  ["version"], multiprocess_mode="livemax", **kw)
        self.ready = Gauge("repair_ready", "1 when the model is loaded and warmed up",
                           multiprocess_mode="livemin", **kw)
        self.ready.set(0)
        if registry is not None and job_store is not None:
            registry.register(JobsCollector(job_store))

    def served(self, version: str, previous: str | None) -> None:
        if previous and previous != version:
            self.version_info.labels(version=previous).set(0)
        self.version_info.labels(version=version).set(1)

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            if self.job_store is not None:
                registry.register(JobsCollector(self.job_store))
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
