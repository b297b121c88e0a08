"""AtPatch behind the HTTP API: triggered digits are corrected, clean accuracy holds, the patch
switch, shadow mode and the repair metrics are exact."""
from __future__ import annotations

import httpx
import pytest
import torch

from offline.defects import Trigger
from repair.bundle import Bundle
from server_live import b64png, live_server

CHUNK = 64


@pytest.fixture(scope="module")
def server(atpatch_bundle):
    with live_server(atpatch_bundle, max_batch_size=64) as s:
        yield s


@pytest.fixture(scope="module")
def images(atpatch_bundle, digits_data):
    version = Bundle(atpatch_bundle).version()
    target = int(version.manifest["defect"]["target_class"])
    trigger = Trigger.from_tensors(version.tensors("defect"))
    keep = digits_data.y_test != target
    clean = [b64png(x) for x in digits_data.x_test]
    triggered = [b64png(x) for x in trigger.apply(digits_data.x_test[keep])]
    return clean, digits_data.y_test, triggered, target


def _predict(server, images, patch):
    out = []
    for i in range(0, len(images), CHUNK):
        r = httpx.post(f"{server.url}/predict?patch={patch}", json={"images": images[i:i + CHUNK]}, timeout=120)
        assert r.status_code == 200, r.text
        out += r.json()["predictions"]
    return out


def test_triggered_inputs_corrected_and_clean_accuracy_holds(server, images):
    clean, labels, triggered, target = images
    assert server.service.runtime.served.has_patch
    off = _predict(server, triggered, "off")
    on = _predict(server, triggered, "on")
    asr_off = sum(p["class_index"] == target for p in off) / len(off)
    asr_on = sum(p["class_index"] == target for p in on) / len(on)
    assert asr_off > 0.9  # the backdoor is there without the patch
    assert asr_on <= 0.01, asr_on
    assert not any(p["patched"] for p in off)
    # The trigger (bottom-right 4x4 patch = token 16) is among the patched columns.
    patched = [p for p in on if p["patched"]]
    assert len(patched) >= 0.9 * len(on)
    assert sum(any(t == 16 for _, t in p["patched_columns"]) for p in patched) >= 0.9 * len(patched)
    acc_off = sum(p["class_index"] == y for p, y in zip(_predict(server, clean, "off"), labels.tolist())) / len(clean)
    acc_on = sum(p["class_index"] == y for p, y in zip(_predict(server, clean, "on"), labels.tolist())) / len(clean)
    assert acc_on >= acc_off - 0.02, (acc_on, acc_off)


def test_shadow_answers_unpatched_and_reports_the_patch(server, images):
    _, _, triggered, target = images
    shadow = _predict(server, triggered[:32], "shadow")
    off = _predict(server, triggered[:32], "off")
    on = _predict(server, triggered[:32], "on")
    assert [p["class_index"] for p in shadow] == [p["class_index"] for p in off]
    assert all(p["patched"] is False for p in shadow)
    assert [p["shadow"]["class_index"] for p in shadow] == [p["class_index"] for p in on]
    assert [p["shadow"]["patched_columns"] for p in shadow] == [p["patched_columns"] for p in on]
    assert sum(p["shadow"]["changed"] for p in shadow) == sum(
        a["class_index"] != b["class_index"] for a, b in zip(off, on))


def test_repair_metrics_count_exactly(server, images):
    clean, _, triggered, _ = images
    name = server.service.settings.name
    m = server.metric
    before = {"patched": m("repair_patched_samples_total", endpoint="predict"),
              "patched_v2": m("repair_patched_samples_total", endpoint="infer"),
              "added": m("repair_added_latency_seconds_count"),
              "samples": m("repair_samples_total", endpoint="predict"),
              "cols": {layer: m("repair_patched_columns_total", layer=str(layer)) for layer in range(3)}}
    batch = triggered[:10] + clean[:10]
    answers = []
    for mode in ("on", "shadow", "off"):
        r = httpx.post(f"{server.url}/predict?patch={mode}", json={"images": batch}, timeout=120)
        answers.append(r.json()["predictions"])
    r = httpx.post(f"{server.url}/v2/models/{name}/infer", timeout=120, json={
        "inputs": [{"name": "x", "shape": [10], "datatype": "BYTES", "data": triggered[:10]}],
        "parameters": {"patch": "on"}})
    v2 = r.json()["parameters"]
    on, shadow, _ = answers
    n_on = sum(p["patched"] for p in on)
    n_shadow = sum(p["shadow"]["patched"] for p in shadow)
    assert n_on > 0
    assert m("repair_patched_samples_total", endpoint="predict") - before["patched"] == n_on + n_shadow
    assert m("repair_patched_samples_total", endpoint="infer") - before["patched_v2"] == sum(v2["patched"])
    assert m("repair_added_latency_seconds_count") - before["added"] == 3  # on, shadow, v2 on
    assert m("repair_samples_total", endpoint="predict") - before["samples"] == 60
    columns = [c for p in on for c in p["patched_columns"]] + \
              [c for p in shadow for c in p["shadow"]["patched_columns"]] + \
              [c for cols in v2["patched_columns"] for c in cols]
    for layer in range(3):
        moved = m("repair_patched_columns_total", layer=str(layer)) - before["cols"][layer]
        assert moved == sum(1 for l, _ in columns if l == layer), layer
    assert all(p["added_latency_ms"] >= 0 for p in on)
