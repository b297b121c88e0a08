"""The patched path of the server, with AtPatch driven by a fixed selector instead of a trained
Detector (the AtPatch runtime's own hook for this): patched flags and columns, ``?patch=shadow``
and the repair metrics are exactly what the patch did, independent of detector quality."""
from __future__ import annotations

import httpx
import pytest
import torch

from offline.defects import Trigger
from repair.atpatch.runtime import AtPatch
from repair.bundle import Bundle
from server_live import b64png, live_server

TRIGGER_TOKEN = 16  # BadNets sits in the bottom-right 4x4 patch of the 16x16 digit


def _selector(layer: int, attn: torch.Tensor) -> torch.Tensor:
    """Flag the trigger column in layers 0 and 1 when it draws > 1.5x its fair share of
    attention (a stand-in for the Detector, Eq. 6/9)."""
    flags = torch.zeros(attn.shape[0], attn.shape[-1], dtype=torch.bool, device=attn.device)
    if layer in (0, 1):
        share = attn.mean(dim=(1, 2))[:, TRIGGER_TOKEN] * attn.shape[-1]
        flags[:, TRIGGER_TOKEN] = share > 1.5
    return flags


@pytest.fixture(scope="module")
def server(plain_bundle):
    with live_server(plain_bundle, max_batch_size=64) as s:
        served = s.service.runtime.served
        n = served.model.patch_embed.num_patches + 1
        benign = [torch.full((n, n), 1.0 / n) for _ in served.model.blocks]
        served.patcher = AtPatch(served.model, None, benign, selector=_selector)
        yield s


@pytest.fixture(scope="module")
def batch(plain_bundle, digits_data):
    trigger = Trigger.from_tensors(Bundle(plain_bundle).version().tensors("defect"))
    x = digits_data.x_test[:12]
    return [b64png(img) for img in trigger.apply(x)] + [b64png(img) for img in x]


def test_patched_answers_shadow_and_metrics_are_exact(server, batch):
    m = server.metric
    name = server.service.settings.name
    before = {"patched": m("repair_patched_samples_total", endpoint="predict"),
              "patched_v2": m("repair_patched_samples_total", endpoint="infer"),
              "added": m("repair_added_latency_seconds_count"),
              "samples": m("repair_samples_total", endpoint="predict"),
              "cols": {layer: m("repair_patched_columns_total", layer=str(layer)) for layer in range(3)}}
    answers = {}
    for mode in ("on", "shadow", "off"):
        r = httpx.post(f"{server.url}/predict?patch={mode}", json={"images": batch}, timeout=120)
        assert r.status_code == 200, r.text
        answers[mode] = r.json()["predictions"]
    r = httpx.post(f"{server.url}/v2/models/{name}/infer", timeout=120, json={
        "inputs": [{"name": "x", "shape": [len(batch)], "datatype": "BYTES", "data": batch}],
        "parameters": {"patch": "on"}})
    assert r.status_code == 200, r.text
    v2 = r.json()["parameters"]
    on, shadow, off = answers["on"], answers["shadow"], answers["off"]

    n_on = sum(p["patched"] for p in on)
    assert 0 < n_on < len(batch)  # the selector flags some inputs, not all
    for p in on:  # columns are exactly the selector's: trigger token, layers 0 and/or 1
        assert p["patched"] == bool(p["patched_columns"])
        assert all(t == TRIGGER_TOKEN and layer in (0, 1) for layer, t in p["patched_columns"])
    assert not any(p["patched"] for p in off)
    # shadow: the unpatched answer, with the patched one beside it
    assert [p["class_index"] for p in shadow] == [p["class_index"] for p in off]
    assert torch.allclose(torch.tensor([p["probabilities"] for p in shadow]),
                          torch.tensor([p["probabilities"] for p in off]), atol=1e-6)
    assert not any(p["patched"] for p in shadow)
    assert [p["shadow"]["class_index"] for p in shadow] == [p["class_index"] for p in on]
    assert [p["shadow"]["patched_columns"] for p in shadow] == [p["patched_columns"] for p in on]
    assert [p["shadow"]["changed"] for p in shadow] == [a["class_index"] != b["class_index"] for a, b in zip(off, on)]
    # An unflagged sample is the unpatched answer.
    for a, b in zip(on, off):
        if not a["patched"]:
            assert a["class_index"] == b["class_index"]
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)
    assert v2["patched"] == [p["patched"] for p in on]
    assert v2["patched_columns"] == [p["patched_columns"] for p in on]

    n_shadow = sum(p["shadow"]["patched"] for p in shadow)
    assert m("repair_patched_samples_total", endpoint="predict") - before["patched"] == n_on + n_shadow
    assert m("repair_patched_samples_total", endpoint="infer") - before["patched_v2"] == sum(v2["patched"])
    assert m("repair_added_latency_seconds_count") - before["added"] == 3  # on, shadow, v2 on
    assert m("repair_samples_total", endpoint="predict") - before["samples"] == 3 * len(batch)
    columns = [c for p in on for c in p["patched_columns"]] * 2 + \
              [c for p in shadow for c in p["shadow"]["patched_columns"]]
    for layer in range(3):
        moved = m("repair_patched_columns_total", layer=str(layer)) - before["cols"][layer]
        assert moved == sum(1 for l, _ in columns if l == layer), layer
    assert all(p["added_latency_ms"] >= 0 for p in on)
