"""Fixtures that run real processes on loopback: a Repair Proxy server (the CLI, as in the
image) and a Prometheus server (Debian package) scraping it. Every process is stopped by its
fixture's finaliser (SIGTERM, bounded wait, then SIGKILL), and every wait is bounded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # promql_names, deploy_procs

from deploy_procs import (BIN, PROMETHEUS, TOKEN, free_port, http_get,  # noqa: E402
                          stop, wait_until)


@pytest.fixture(scope="session")
def deploy_bundle(tmp_path_factory, digits_vit_badnets_atpatch) -> Path:
    """A writable copy of the shared BadNets digits bundle with its AtPatch detector (the
    server writes job files into the bundle it serves)."""
    dst = tmp_path_factory.mktemp("deploy") / "bundle"
    from repair.bundle import copy_bundle

    copy_bundle(digits_vit_badnets_atpatch, dst)
    return dst


@pytest.fixture(scope="session")
def proxy_server(deploy_bundle, tmp_path_factory):
    """``repair-proxy serve`` on a free loopback port, ready; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("proxy-log") / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", REPAIR_TOKEN=TOKEN)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "repair-proxy"), "serve", "--bundle", str(deploy_bundle),
                                 "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_get(url + "/v2/health/ready")[0] == 200, 120,
                   "repair-proxy serve never became ready", proc, log)
        yield url
    finally:
        stop(proc)


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        status, body = http_get(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}")
        data = json.loads(body or b"{}")
        assert status == 200 and data.get("status") == "success", (expr, status, body[:500])
        return data["data"]["result"]

    def scalar(self, expr: str, at: float | None = None) -> float | None:
        result = self.query(expr, at)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus(proxy_server, tmp_path):
    """A real Prometheus on loopback scraping the proxy every second, with the stack's rules."""
    port = free_port()
    target = urllib.parse.urlparse(proxy_server).netloc
    config = tmp_path / "prometheus.yml"
    rules = Path(__file__).resolve().parents[2] / "deploy/prometheus/alerts.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "repair-proxy", "static_configs": [{"targets": [target]}]}],
    }))
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: http_get(prom.url + "/-/ready")[0] == 200, 60,
                   "prometheus never became ready", proc, log)
        wait_until(lambda: prom.query('up{job="repair-proxy"} == 1'), 30,
                   "prometheus never scraped the proxy", proc, log)
        yield prom
    finally:
        stop(proc)
