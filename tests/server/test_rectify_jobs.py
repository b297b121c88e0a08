"""Rectification jobs end to end: /rectify → worker → hot swap under load; failures and a
killed worker leave the served version untouched."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from offline.worker import MAX_ATTEMPTS, JobStore
from repair.bundle import Bundle, copy_bundle
from server_live import b64png, live_server

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def bundle(plain_bundle, tmp_path):
    return copy_bundle(plain_bundle, tmp_path / "b")


@pytest.fixture(scope="module")
def pair(plain_bundle, digits_data):
    """A test digit (not the target class) clean and with the bundle's BadNets trigger."""
    from offline.defects import Trigger

    trigger = Trigger.from_tensors(Bundle(plain_bundle).version().tensors("defect"))
    i = int((digits_data.y_test != 0).nonzero()[0])
    clean = digits_data.x_test[i]
    return clean, trigger.apply(clean), int(digits_data.y_test[i])


async def _burst(url: str, image: str, n: int) -> list[tuple[int, str | None]]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def one():
            r = await client.post("/predict", json={"images": [image]})
            return r.status_code, r.json().get("model_version")
        return await asyncio.gather(*(one() for _ in range(n)))


def _wait_job(url: str, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/rectify/{job_id}", headers=AUTH).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_rectify_jobs_fail_cleanly_then_swap_version_under_load(bundle, pair):
    clean, corrupt, label = pair
    first = Bundle(bundle).current_id()
    with live_server(bundle, token=TOKEN, embed_worker=True) as s:
        assert s.app.state.worker.alive
        # A job the worker rejects (only the model can tell: the pair differs by one grey level
        # in one pixel, which the model answers alike): failed, version untouched.
        nudged = clean.clone()
        nudged[0, 0, 0] = 1 / 255 if nudged[0, 0, 0] == 0 else nudged[0, 0, 0] - 1 / 255
        r = httpx.post(s.url + "/rectify", headers=AUTH, json={
            "clean": b64png(clean), "corrupt": b64png(nudged), "label": label})
        assert r.status_code == 202, r.text
        job = _wait_job(s.url, r.json()["job_id"])
        assert job["status"] == "failed" and "already treats the clean and corrupt inputs the same" in job["error"]
        assert Bundle(bundle).current_id() == first and Bundle(bundle).version_ids() == [first]
        assert s.metric("repair_rectify_jobs_total", outcome="failed") == 1
        assert s.metric("repair_rectify_jobs_total", outcome="succeeded") == 0

        # A good job while 200 concurrent /predict requests run, round after round.
        r = httpx.post(s.url + "/rectify", headers=AUTH, json={
            "clean": b64png(clean), "corrupt": b64png(corrupt), "label": label, "validation": 300})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        answers, swapped = [], False
        while httpx.get(f"{s.url}/rectify/{job_id}", headers=AUTH).json()["status"] == "queued":
            time.sleep(0.2)
        while True:  # bursts while the job runs, until one full round after the swap
            answers += asyncio.run(_burst(s.url, b64png(corrupt), 200))
            if swapped:
                break
            time.sleep(1.0)  # leave the worker some CPU between bursts
            job = httpx.get(f"{s.url}/rectify/{job_id}", headers=AUTH).json()
            swapped = job["status"] == "failed" or (
                job["status"] == "succeeded" and s.service.runtime.served.id == job["version"])
        job = _wait_job(s.url, job_id)
        assert job["status"] == "succeeded", job
        assert all(code == 200 for code, _ in answers), {c for c, _ in answers}
        new = job["version"]
        assert new != first and job["parent"] == first
        assert Bundle(bundle).current_id() == new and Bundle(bundle).version(new).parent == first
        assert Bundle(bundle).version(new).manifest["rectification"]["validation"] == 300
        assert {v for _, v in answers} <= {first, new} and answers[-1][1] == new
        # The served answer to the corrupt input is the new version's (as the job measured it).
        p = httpx.post(s.url + "/predict", json={"images": [b64png(corrupt)]}).json()
        assert p["model_version"] == new
        assert p["predictions"][0]["class_index"] == job["after"]["corrupt_pred"][0]
        # the moved-backdoor check reaches the client as the new version records it
        record = Bundle(bundle).version(new).manifest["rectification"]
        assert job["warnings"] == record["warnings"] and job["after"]["carried"]["images"] > 0
        assert s.metric("repair_rectify_jobs_total", outcome="succeeded") == 1
        assert s.metric("repair_rectify_jobs_total", outcome="failed") == 1
        assert s.metric("repair_rectify_job_duration_seconds_count") == 2
        assert s.metric("repair_model_version_info", version=new) == 1
        assert s.metric("repair_model_version_info", version=first) == 0


def test_killed_worker_leaves_version_untouched_and_job_is_requeued(bundle, pair):
    from repair.images import encode_png

    clean, corrupt, label = pair
    store = JobStore(bundle)
    first = Bundle(bundle).current_id()
    job = store.submit([encode_png(clean)], [encode_png(corrupt)], {"label": label}, parent=first)
    worker = subprocess.Popen([sys.executable, "-m", "offline.worker", "--bundle", str(bundle)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while store.get(job["id"])["status"] == "queued" and time.monotonic() < deadline:
            time.sleep(0.005)
        assert store.get(job["id"])["status"] == "running"
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    finally:
        worker.kill()
    assert Bundle(bundle).current_id() == first
    assert Bundle(bundle).version_ids() == [first]
    assert store.get(job["id"])["status"] == "running"  # as the dead worker left it
    # What the next worker does first, once it holds the lock: requeue, then give up.
    [requeued] = store.recover()
    assert requeued["status"] == "queued" and requeued["attempts"] == 1
    store.update(requeued, status="running", attempts=MAX_ATTEMPTS)
    [failed] = store.recover()
    assert failed["status"] == "failed" and "mid-job" in failed["error"]
    assert Bundle(bundle).current_id() == first
