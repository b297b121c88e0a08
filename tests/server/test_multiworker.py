"""``repair-proxy serve --workers 2`` in a subprocess: multiprocess metrics add up across
workers, JSON access logs, and SIGTERM drains in-flight requests (none answered with an error)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from repair.bundle import copy_bundle
from server_live import b64png


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _counter(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_two_workers_metrics_logs_and_drain(plain_bundle, digits_data, tmp_path):
    bundle = copy_bundle(plain_bundle, tmp_path / "b")
    port = _port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REPAIR_TOKEN": "tok"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "repair_proxy_cli", "serve", "--bundle", str(bundle),
                             "--port", str(port), "--device", "cpu", "--workers", "2"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        ready = 0
        while time.monotonic() < deadline and ready < 6:  # both workers answer ready
            try:
                ready += httpx.get(url + "/v2/health/ready", timeout=5).status_code == 200
            except httpx.TransportError:
                time.sleep(0.2)
        assert ready >= 6, (tmp_path / "server.log").read_text()[-3000:]
        # A ready answer may come from one worker while the other still loads; the shared gauge
        # (minimum over live workers) is 1 only once both are ready.
        while time.monotonic() < deadline and _counter(httpx.get(url + "/metrics").text, "repair_ready") != 1:
            time.sleep(0.2)
        assert _counter(httpx.get(url + "/metrics").text, "repair_ready") == 1
        image = b64png(digits_data.x_test[0])
        n = 40
        for _ in range(n):  # new connection each time: spread over both workers
            assert httpx.post(url + "/predict", json={"images": [image, image]}, timeout=60).status_code == 200
        text = httpx.get(url + "/metrics").text
        assert _counter(text, "repair_requests_total", endpoint="predict", code="200") == n
        assert _counter(text, "repair_samples_total", endpoint="predict") == 2 * n
        assert _counter(text, "repair_batch_size_sum") == 2 * n

        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                async def one():
                    try:
                        return (await client.post("/predict", json={"images": [image]})).status_code
                    except httpx.TransportError:
                        return None  # not accepted: the server was already closing
                tasks = [asyncio.ensure_future(one()) for _ in range(40)]
                # Stop once answers flow, i.e. with the rest of the burst in flight.
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        codes = asyncio.run(burst())
        assert proc.wait(60) == 0
        answered = [c for c in codes if c is not None]
        assert answered and all(c == 200 for c in answered), codes
    finally:
        if proc.poll() is None:  # a failed test: SIGTERM lets uvicorn stop its workers too
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
    lines = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines()
             if line.startswith("{") and '"endpoint"' in line]
    predicts = [line for line in lines if line["endpoint"] == "predict" and line["status"] == 200]
    assert len(predicts) >= n and all(line["samples"] in (1, 2) and line["model_version"] for line in predicts)
