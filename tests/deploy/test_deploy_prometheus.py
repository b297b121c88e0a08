"""A real Prometheus scrapes a real server: after a known mix of clean and triggered requests,
the dashboard's patch-rate expression, evaluated by Prometheus, gives that mix's ratio (the
fraction of the mix's samples the server answered as patched)."""
from __future__ import annotations

import base64
import json
import math
import random
import re
import time

import torch
from deploy_procs import http_get, http_post_json, wait_until
from promql_names import ROOT, alert_queries, grafana_to_promql

N_CLEAN, N_TRIGGERED = 24, 12       # the mix: a third of the samples carry the trigger
WARMUP = 4                           # per kind, before the measured window


def dashboard_patch_rate() -> str:
    dash = json.loads((ROOT / "deploy/grafana/dashboards/repair-proxy.json").read_text())
    panel = next(p for p in dash["panels"] if p["title"] == "Patch rate")
    return next(t["expr"] for t in panel["targets"] if t["refId"] == "A")


def images(bundle, n_clean: int, n_triggered: int, offset: int) -> list[tuple[str, bool]]:
    """Test digits as base64 PNGs: clean ones, and non-target ones with the bundle's trigger."""
    from offline.datasets import load_dataset
    from offline.defects import Trigger
    from repair.bundle import Bundle
    from repair.images import encode_png

    version = Bundle(bundle).version()
    trigger = Trigger.from_tensors(version.tensors("defect"))
    data = load_dataset("digits")
    x, y = data.x_test, data.y_test
    clean = x[offset: offset + n_clean]
    others = x[y != version.manifest["defect"]["target_class"]]
    triggered = trigger.apply(others[offset: offset + n_triggered])
    enc = lambda t: base64.b64encode(encode_png(t)).decode()  # noqa: E731
    return [(enc(t), False) for t in clean] + [(enc(t), True) for t in triggered]


def send(url: str, batch: list[tuple[str, bool]]) -> list[bool]:
    out = http_post_json(url + "/predict", {"images": [b for b, _ in batch]})
    assert len(out["predictions"]) == len(batch)
    return [p["patched"] for p in out["predictions"]]


def served_samples(url: str) -> float:
    """``sum(repair_samples_total)`` as the server itself reports it right now."""
    _, body = http_get(url + "/metrics")
    return sum(float(v) for v in re.findall(r"^repair_samples_total\{[^}]*\} (\S+)$",
                                            body.decode(), re.M))


def test_dashboard_patch_rate_equals_the_request_mix(proxy_server, prometheus, deploy_bundle):
    from repair.bundle import Bundle

    warm = images(deploy_bundle, WARMUP, 3 * WARMUP, offset=0)
    mix = images(deploy_bundle, N_CLEAN, N_TRIGGERED, offset=3 * WARMUP)
    random.Random(0).shuffle(mix)

    # Warm-up: both counters' series exist (non-zero) before the measured window opens, so
    # rate() over the window sees every request of the mix (a series born inside the window
    # loses its first increment).
    warm_clean, warm_triggered = warm[:WARMUP], warm[WARMUP:]
    for item in warm_clean:
        send(proxy_server, [item])
    warm_patched = 0
    for item in warm_triggered:
        warm_patched += sum(send(proxy_server, [item]))
        if warm_patched >= WARMUP:
            break
    assert warm_patched >= 1, f"AtPatch patched none of {len(warm_triggered)} triggered inputs"
    before = served_samples(proxy_server)
    wait_until(lambda: prometheus.scalar("sum(repair_samples_total)") == before, 30,
               "prometheus never scraped the warm-up")
    time.sleep(3)   # the warm-up's values are scraped; below, the window opens 2-3 s before t0
    t0 = time.time()

    patched, sizes = [], [1, 2, 3]
    i = 0
    while i < len(mix):
        batch = mix[i: i + sizes[i % 3]]
        patched += send(proxy_server, batch)
        i += len(batch)
    total = served_samples(proxy_server)
    assert total == before + len(mix)
    wait_until(lambda: prometheus.scalar("sum(repair_samples_total)") == total, 30,
               "prometheus never scraped the mix")
    time.sleep(3)
    t1 = time.time()

    # What the server answered: the ratio the dashboard must show for this window.
    expected = sum(patched) / len(mix)
    # Window (t1 - range, t1] starts 2-3 s before the mix: inside it are scrapes with the
    # warm-up values (the base of the increase) and, at its end, scrapes with the final values.
    # The warm-up makes both counters start non-zero, so rate()'s extrapolation is the same for
    # numerator and denominator (no zero-clamp) and cancels in the ratio.
    window = f"{math.ceil(t1 - t0) + 2}s"
    value = prometheus.scalar(grafana_to_promql(dashboard_patch_rate(), rate_interval=window), at=t1)
    assert value is not None and abs(value - expected) <= 0.02, (value, expected, window)

    # Patched samples came from the bundle's AtPatch detector, not from a stub.
    assert Bundle(deploy_bundle).version().has("detector") and 0 < sum(patched)

    # The stack's alert rules are loaded by this real Prometheus and evaluate without error, and
    # the patch-rate alert is active exactly when its own expression says so.
    rules = json.loads(http_get(prometheus.url + "/api/v1/rules")[1])["data"]["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"]}
    assert set(loaded) == set(alert_queries())
    wait_until(lambda: all(r.get("lastEvaluation", "").startswith("2") and r["health"] == "ok"
                           for r in json.loads(http_get(prometheus.url + "/api/v1/rules")[1])
                           ["data"]["groups"][0]["rules"]), 10, "alert rules never evaluated")
    spike = bool(prometheus.query(alert_queries()["RepairPatchRateSpike"]))
    alerts = json.loads(http_get(prometheus.url + "/api/v1/alerts")[1])["data"]["alerts"]
    states = {a["labels"]["alertname"]: a["state"] for a in alerts}
    assert (states.get("RepairPatchRateSpike") in ("pending", "firing")) == spike, (spike, states)
