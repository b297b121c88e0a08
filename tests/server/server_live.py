"""Helpers for the server tests: a real uvicorn on loopback (in a thread), PNG payloads."""
from __future__ import annotations

import base64
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch


def b64png(x: torch.Tensor) -> str:
    from repair.images import encode_png

    return base64.b64encode(encode_png(x)).decode()


def predict_in_chunks(url: str, field: str, samples: list, patch: str, per_request: int = 64) -> list[dict]:
    """``POST /predict?patch=...`` with ``{field: samples}`` in requests of ``per_request`` (under
    the server's sample limit); the predictions in order."""
    out = []
    for i in range(0, len(samples), per_request):
        r = httpx.post(f"{url}/predict?patch={patch}", json={field: samples[i:i + per_request]}, timeout=120)
        assert r.status_code == 200, r.text
        out += r.json()["predictions"]
    return out


class LiveServer:
    """``create_app`` under a real ``uvicorn.Server`` on 127.0.0.1:<free port>."""

    def __init__(self, bundle, **options):
        import uvicorn

        from server.app import create_app

        options.setdefault("embed_worker", False)
        options.setdefault("device", "cpu")
        options.setdefault("access_log", False)
        options.setdefault("poll_interval", 0.2)
        self.app = create_app(str(bundle), **options)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def service(self):
        return self.app.state.service

    def start(self, ready_timeout: float = 120.0) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.service.runtime.error:  # loading failed: no point waiting
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become ready: {self.service.runtime.error}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def metric(self, name: str, **labels) -> float:
        """One sample's value from /metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0


@contextmanager
def live_server(bundle, **options):
    server = LiveServer(bundle, **options).start()
    try:
        yield server
    finally:
        server.stop()
