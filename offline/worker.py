"""The offline worker: runs rectification jobs queued in a bundle, never in a request path.

Jobs live in the bundle (``BUNDLE/jobs/<id>.json`` plus ``<id>.clean.<i>.png`` /
``<id>.corrupt.<i>.png`` for pair ``i``; jobs queued before n pairs were accepted have one pair,
``<id>.clean.png`` / ``<id>.corrupt.png``), every file written to a temp name and renamed, the
JSON last, so a reader sees a whole job or none. The server only submits and reads jobs
(:class:`JobStore`); one worker per bundle runs them (an exclusive ``flock`` on
``jobs/.worker.lock``, released by the kernel if the worker dies).

A job's new version is written and activated by :func:`offline.rectify.rectify_images` in one
atomic step at its end, so a worker killed mid-job leaves the served version untouched; the next
worker to take the lock finds the job still ``running`` and requeues it (once), then fails it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import time
import traceback
import uuid
from pathlib import Path

log = logging.getLogger("repair.worker")

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_ATTEMPTS = 2
FINISHED = ("succeeded", "failed")


class JobNotFound(KeyError):
    pass


class WorkerStopped(BaseException):
    """SIGTERM while a job runs: the job goes back to the queue."""


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JobStore:
    """The job files of one bundle (shared by the server, which submits, and the worker)."""

    def __init__(self, bundle: str | os.PathLike):
        self.bundle = Path(bundle)
        self.dir = self.bundle / "jobs"

    def _path(self, job_id: str, suffix: str = ".json") -> Path:
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            raise JobNotFound(job_id)
        return self.dir / f"{job_id}{suffix}"

    def submit(self, clean_pngs: list[bytes], corrupt_pngs: list[bytes], params: dict,
               parent: str | None) -> dict:
        """Queue a job of ``len(clean_pngs)`` pairs (PNG bytes, one clean and one corrupt per pair)."""
        if len(clean_pngs) != len(corrupt_pngs) or not clean_pngs:
            raise ValueError(f"{len(clean_pngs)} clean and {len(corrupt_pngs)} corrupt images: one of each per pair")
        self.dir.mkdir(parents=True, exist_ok=True)
        job_id = uuid.uuid4().hex
        images = [(self._path(job_id, f".{side}.{i}.png"), png)
                  for i, pair in enumerate(zip(clean_pngs, corrupt_pngs))
                  for side, png in zip(("clean", "corrupt"), pair)]
        job = {"id": job_id, "status": "queued", "created": time.time(), "attempts": 0,
               "pairs": len(clean_pngs), "params": params, "parent": parent, "version": None}
        try:
            for path, png in images:
                _write_atomic(path, png)
            self.save(job)  # last: the worker never sees a job without its images
        except BaseException:  # e.g. a full disk: leave no images without a job
            for path, _ in images:
                path.unlink(missing_ok=True)
            raise
        return job

    def save(self, job: dict) -> None:
        _write_atomic(self._path(job["id"]), json.dumps(job, indent=1).encode())

    def update(self, job: dict, **fields) -> dict:
        job = {**job, **fields}
        self.save(job)
        return job

    def get(self, job_id: str) -> dict:
        try:
            return json.loads(self._path(job_id).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            raise JobNotFound(job_id) from None

    def images(self, job: dict) -> tuple[list[bytes], list[bytes]]:
        """The job's clean and corrupt PNGs, one of each per pair."""
        # no "pairs": queued before n pairs were accepted, one pair without an index
        suffixes = [f".{i}" for i in range(job["pairs"])] if "pairs" in job else [""]
        return ([self._path(job["id"], f".clean{s}.png").read_bytes() for s in suffixes],
                [self._path(job["id"], f".corrupt{s}.png").read_bytes() for s in suffixes])

    def all(self) -> list[dict]:
        if not self.dir.is_dir():
            return []
        jobs = []
        for p in self.dir.glob("*.json"):
            if JOB_ID.match(p.stem):
                try:
                    jobs.append(json.loads(p.read_text()))
                except (OSError, json.JSONDecodeError):
                    continue
        return sorted(jobs, key=lambda j: j.get("created", 0))

    def finished(self) -> list[dict]:
        return [j for j in self.all() if j.get("status") in FINISHED]

    def next_queued(self) -> dict | None:
        return next((j for j in self.all() if j.get("status") == "queued"), None)

    def recover(self) -> list[dict]:
        """Jobs left ``running`` by a dead worker (call only while holding the worker lock)."""
        recovered = []
        for job in self.all():
            if job.get("status") != "running":
                continue
            if job.get("attempts", 0) < MAX_ATTEMPTS:
                job = self.update(job, status="queued", note="requeued: the worker stopped mid-job")
            else:
                job = self.update(job, status="failed", finished=time.time(),
                                  duration_seconds=time.time() - job.get("started", time.time()),
                                  error=f"the worker stopped mid-job {MAX_ATTEMPTS} times; not retried")
            recovered.append(job)
        return recovered


def _lock(store: JobStore, stop) -> int | None:
    """Take the bundle's worker lock (one worker per bundle); None if stopped while waiting."""
    import fcntl

    store.dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(store.dir / ".worker.lock", os.O_RDWR | os.O_CREAT, 0o644)
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if not waiting:
                log.info("another worker holds %s; waiting", store.dir / ".worker.lock")
                waiting = True
            if stop():
                os.close(fd)
                return None
            time.sleep(0.5)


def run_job(store: JobStore, job: dict) -> dict:
    """Run one rectification job (CONTRACTS §2) and record its outcome in the job file."""
    import torch

    from offline.rectify import MIN_GAIN, STRESS, TRANSPLANT_SAMPLES, VALIDATION_SAMPLES, rectify_images
    from repair.bundle import Bundle
    from repair.images import decode_image

    started = time.time()
    job = store.update(job, status="running", started=started, attempts=job.get("attempts", 0) + 1,
                       worker_pid=os.getpid(), error=None)
    params = job.get("params", {})
    try:
        pre = Bundle(store.bundle).version().manifest.get("preprocessing", {})
        size = dict(channels=pre.get("channels"), height=pre.get("height"), width=pre.get("width"))
        clean_pngs, corrupt_pngs = store.images(job)
        clean = torch.stack([decode_image(png, **size) for png in clean_pngs])
        corrupt = torch.stack([decode_image(png, **size) for png in corrupt_pngs])
        result = rectify_images(store.bundle, clean, corrupt, label=params.get("label"),
                                budget=params.get("budget", 0.01), gap=params.get("gap", 0.001),
                                static=params.get("static", False), layer=params.get("layer"),
                                validation=params.get("validation", VALIDATION_SAMPLES),
                                stress=params.get("stress", STRESS),
                                candidates=params.get("candidates", 1),
                                min_gain=params.get("min_gain", MIN_GAIN),
                                transplant=params.get("transplant", TRANSPLANT_SAMPLES),
                                hold_anchors=params.get("hold_anchors", False),
                                confirm=params.get("confirm", False),
                                progress=False, activate=True)
    except WorkerStopped:
        store.update(job, status="queued", note="requeued: the worker was stopped mid-job")
        raise
    except Exception as err:  # noqa: BLE001 -- every failure is recorded on the job
        from repair.bundle import BundleError

        client_error = isinstance(err, (ValueError, BundleError))
        message = str(err) if client_error else f"internal error: {type(err).__name__}: {err}"
        if not client_error:
            log.error("job %s failed:\n%s", job["id"], traceback.format_exc())
        finished = time.time()
        return store.update(job, status="failed", error=message, finished=finished,
                            duration_seconds=finished - started)
    finished = time.time()
    return store.update(job, status="succeeded", version=result.get("version"),
                        layers=result.get("layers"), rounds=result.get("rounds"),
                        before=result.get("before"), after=result.get("after"),
                        warnings=result.get("warnings", []), result=result, finished=finished, duration_seconds=finished - started)


def run_worker(bundle: str | os.PathLike, poll_interval: float = 0.5, once: bool = False,
               parent_pid: int | None = None) -> None:
    """Run queued jobs until stopped (SIGTERM/SIGINT); ``once``: until the queue is empty."""
    from repair.bundle import Bundle

    Bundle(bundle).current_id()  # a clear error now if this is not a bundle
    _configure_logging()
    store = JobStore(bundle)
    stopping = {"now": False}

    def orphaned() -> bool:  # embedded in a server that is gone
        return parent_pid is not None and os.getppid() != parent_pid

    def on_term(signum, frame):
        stopping["now"] = True
        if stopping.get("busy"):
            raise WorkerStopped()

    previous = {s: signal.signal(s, on_term) for s in (signal.SIGTERM, signal.SIGINT)}
    fd = _lock(store, lambda: stopping["now"] or orphaned())
    try:
        if fd is None:
            return
        for job in store.recover():
            log.warning("job %s was left running by a dead worker: now %s", job["id"], job["status"])
        while not stopping["now"] and not orphaned():
            job = store.next_queued()
            if job is None:
                if once:
                    return
                time.sleep(poll_interval)
                continue
            log.info("job %s: running", job["id"])
            stopping["busy"] = True
            try:
                job = run_job(store, job)
            except WorkerStopped:
                log.info("job %s requeued: worker stopped", job["id"])
                return
            finally:
                stopping["busy"] = False
            log.info("job %s: %s %s", job["id"], job["status"], job.get("error") or job.get("version"))
    finally:
        if fd is not None:
            os.close(fd)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _configure_logging() -> None:
    """JSON lines on stderr, like the server's logs."""
    if log.handlers:
        return

    class _Json(logging.Formatter):
        def format(self, r):
            return json.dumps({"ts": round(r.created, 6), "logger": r.name, "level": r.levelname,
                               "msg": r.getMessage()})

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Json())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> None:
    """``python -m offline.worker --bundle B [--parent-pid P]`` (how the server embeds one)."""
    p = argparse.ArgumentParser(prog="offline.worker")
    p.add_argument("--bundle", required=True)
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--poll", type=float, default=0.5)
    a = p.parse_args(argv)
    run_worker(a.bundle, poll_interval=a.poll, parent_pid=a.parent_pid)


if __name__ == "__main__":
    main()
