"""The HTTP API against a real uvicorn: predictions, v2 protocol, bad input, auth, versions."""
from __future__ import annotations

import base64
import io
import json
import math
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from offline.rectify import TRANSPLANT_SAMPLES
from repair.bundle import Bundle
from repair.editing.dynamic import MIN_GAIN
from repair.images import decode_image
from server_live import b64png, live_server

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(plain_bundle):
    with live_server(plain_bundle, token=TOKEN, max_body_bytes=256 * 1024, max_samples=64) as s:
        yield s


@pytest.fixture(scope="module")
def reference(plain_bundle, digits_data):
    """What the model itself says about the first 40 test images (after the PNG round trip)."""
    from repair.images import quantize

    model = Bundle(plain_bundle).version().build_model("cpu")
    x = quantize(digits_data.x_test[:40])
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)
    return x, probs


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG header announcing width x height with a tiny (invalid) body: never decodable."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_predict_answers_what_the_model_says(server, reference):
    x, probs = reference
    r = httpx.post(server.url + "/predict", json={"images": [b64png(img) for img in x]}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == Bundle(server.service.settings.bundle).current_id()
    got = torch.tensor([p["probabilities"] for p in body["predictions"]])
    assert [p["class_index"] for p in body["predictions"]] == probs.argmax(-1).tolist()
    assert [p["label"] for p in body["predictions"]] == [str(i) for i in probs.argmax(-1).tolist()]
    assert torch.allclose(got, probs, atol=1e-5)
    assert all(p["patched"] is False and p["patched_columns"] == [] for p in body["predictions"])


def test_concurrent_single_requests_equal_one_batch(server, reference):
    x, probs = reference
    def one(i):
        r = httpx.post(server.url + "/predict", json={"images": [b64png(x[i])]}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]
    with ThreadPoolExecutor(16) as pool:
        singles = list(pool.map(one, range(len(x))))
    assert [p["class_index"] for p in singles] == probs.argmax(-1).tolist()
    got = torch.tensor([p["probabilities"] for p in singles])
    assert torch.allclose(got, probs, atol=1e-5)


def test_multipart_upload(server, reference):
    from repair.images import encode_png

    x, probs = reference
    files = [("file", (f"{i}.png", encode_png(x[i]), "image/png")) for i in range(3)]
    r = httpx.post(server.url + "/predict", files=files, timeout=60)
    assert r.status_code == 200, r.text
    assert [p["class_index"] for p in r.json()["predictions"]] == probs[:3].argmax(-1).tolist()


def test_v2_protocol(server, reference):
    x, probs = reference
    name = server.service.settings.name
    version = Bundle(server.service.settings.bundle).current_id()
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(server.url + "/v2").json()["name"] == "repair-proxy"
    meta = httpx.get(server.url + f"/v2/models/{name}").json()
    assert meta["inputs"][0]["shape"] == [-1, 1, 16, 16] and version in meta["versions"]
    assert httpx.get(server.url + f"/v2/models/{name}/ready").json()["ready"] is True
    assert httpx.get(server.url + f"/v2/models/{name}/versions/{version}/ready").json()["ready"] is True
    tensor = {"name": "input", "shape": [4, 1, 16, 16], "datatype": "FP32", "data": x[:4].flatten().tolist()}
    for path in (f"/v2/models/{name}/infer", f"/v2/models/{name}/versions/{version}/infer"):
        r = httpx.post(server.url + path, json={"id": "req-1", "inputs": [tensor]}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == "req-1" and body["model_version"] == version
        out = {o["name"]: o for o in body["outputs"]}
        assert out["class_index"]["data"] == probs[:4].argmax(-1).tolist()
        assert torch.allclose(torch.tensor(out["probabilities"]["data"]).reshape(4, 10), probs[:4], atol=1e-5)
        assert body["parameters"]["patched"] == [False] * 4 and body["parameters"]["patch"] == "on"
    r = httpx.post(server.url + f"/v2/models/{name}/infer", timeout=60, json={
        "inputs": [{"name": "images", "shape": [2], "datatype": "BYTES", "data": [b64png(x[0]), b64png(x[1])]}],
        "outputs": [{"name": "label"}]})
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["label"]
    assert r.json()["outputs"][0]["data"] == [str(i) for i in probs[:2].argmax(-1).tolist()]
    r = httpx.post(server.url + f"/v2/models/{name}/infer", timeout=60, json={
        "inputs": [{"name": "images", "shape": [5], "datatype": "BYTES", "data": [b64png(x[0]), b64png(x[1])]}]})
    assert r.status_code == 422 and "does not describe its 2 images" in r.json()["error"], r.text
    r = httpx.get(server.url + "/v2/models/nope")
    assert r.status_code == 404 and "nope" in r.json()["error"]
    r = httpx.post(server.url + f"/v2/models/{name}/versions/v9999/infer", json={"inputs": [tensor]})
    assert r.status_code == 404 and "v9999" in r.json()["error"]


def _png(img_mode: str, size: tuple[int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(img_mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_inputs_get_clear_4xx(server, reference):
    x, _ = reference
    name = server.service.settings.name
    good = base64.b64decode(b64png(x[0]))
    post = lambda path, **kw: httpx.post(server.url + path, timeout=60, **kw)  # noqa: E731
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    cases = [
        ("truncated image", post("/predict", json={"images": [b64(good[: len(good) // 2])]}), 422, "truncated"),
        ("not an image", post("/predict", json={"images": [b64(b"hello world")]}), 422, "not a readable image"),
        ("wrong size", post("/predict", json={"images": [b64(_png("L", (28, 28)))]}), 422, "28x28"),
        ("20000x20000", post("/predict", json={"images": [b64(_bomb_png(20000, 20000))]}), 413, "pixels"),
        # under PIL's own bomb guard, over ours (repair.images.MAX_PIXELS)
        ("5000x5000", post("/predict", json={"images": [b64(_bomb_png(5000, 5000))]}), 413, "the limit is"),
        ("bad base64", post("/predict", json={"images": ["***"]}), 422, "base64"),
        ("wrong channels", post(f"/v2/models/{name}/infer", json={"inputs": [
            {"name": "input", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [0.5] * 768}]}), 422, "shape"),
        ("NaN pixel", post(f"/v2/models/{name}/infer", content=(
            '{"inputs":[{"name":"input","shape":[1,1,16,16],"datatype":"FP32","data":[NaN' + ",0.5" * 255 + "]}]}"),
            headers={"content-type": "application/json"}), 422, "NaN"),
        ("short tensor", post(f"/v2/models/{name}/infer", json={"inputs": [
            {"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32", "data": [0.5] * 10}]}), 422, "shape"),
        ("records to image model", post("/predict", json={"records": [{"a": 1}]}), 422, "images"),
        ("missing field", post("/predict", json={}), 422, "exactly one"),
        ("both fields", post("/predict", json={"images": [b64png(x[0])], "records": [{}]}), 422, "exactly one"),
        ("extra field", post("/predict", json={"images": [b64png(x[0])], "x": 1}), 422, "x"),
        ("not JSON", post("/predict", content=b"{nope", headers={"content-type": "application/json"}), 422, "JSON"),
        ("empty body", post("/predict", content=b"", headers={"content-type": "application/json"}), 422, "empty"),
        ("5000-digit number", post("/predict", content=b'{"images": [1' + b"0" * 5000 + b"]}",
                                   headers={"content-type": "application/json"}), 422, "not valid JSON"),
        ("nested too deeply", post("/predict", content=b'{"images":' + b"[" * 5000 + b"]" * 5000 + b"}",
                                   headers={"content-type": "application/json"}), 422, "nested"),
        ("text body", post("/predict", content=b"hi", headers={"content-type": "text/plain"}), 415, "text/plain"),
        ("oversized body", post("/predict", json={"images": ["A" * (300 * 1024)]}), 413, "limit"),
        ("oversized chunked", post("/predict", content=iter([b'{"images":["' + b"A" * 1024] * 300),
                                   headers={"content-type": "application/json"}), 413, "limit"),
        ("too many images", post("/predict", json={"images": [b64png(x[0])] * 65}), 413, "65 samples"),
        ("bad patch mode", post("/predict?patch=maybe", json={"images": [b64png(x[0])]}), 422, "patch"),
        ("bad v2 patch mode", post(f"/v2/models/{name}/infer", json={"parameters": {"patch": "maybe"}, "inputs": [
            {"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32", "data": [0.5] * 256}]}), 422, "'maybe'"),
        ("GET /predict", httpx.get(server.url + "/predict"), 405, "not allowed"),
        ("no token", post("/rectify", json={"clean": "a", "corrupt": "b"}), 401, "bearer"),
        ("wrong token", post("/rectify", json={"clean": "a", "corrupt": "b"},
                             headers={"Authorization": "Bearer wrong"}), 401, "wrong"),
        ("wrong token on activate", post("/versions/v0001/activate", headers={"Authorization": "Bearer x"}),
         401, "wrong"),
        ("unknown route", httpx.get(server.url + "/nothing"), 404, "/nothing"),
        ("5000-character version id", post("/versions/" + "v" * 5000 + "/activate",
                                           headers={"Authorization": f"Bearer {TOKEN}"}), 404, "invalid version id"),
    ]
    for what, r, status, needle in cases:
        assert r.status_code == status, (what, r.status_code, r.text)
        assert needle.lower() in r.json()["error"].lower(), (what, r.json())


def test_metrics_move_by_exact_counts(server, reference):
    x, _ = reference
    before = {
        "ok": server.metric("repair_requests_total", endpoint="predict", code="200"),
        "bad": server.metric("repair_requests_total", endpoint="predict", code="422"),
        "samples": server.metric("repair_samples_total", endpoint="predict"),
        "model": server.metric("repair_request_duration_seconds_count", endpoint="predict", stage="model"),
        "batches": server.metric("repair_batch_size_sum"),
    }
    for n in (1, 3, 5):
        assert httpx.post(server.url + "/predict", json={"images": [b64png(img) for img in x[:n]]}).status_code == 200
    assert httpx.post(server.url + "/predict", json={"images": ["???"]}).status_code == 422
    assert server.metric("repair_requests_total", endpoint="predict", code="200") - before["ok"] == 3
    assert server.metric("repair_requests_total", endpoint="predict", code="422") - before["bad"] == 1
    assert server.metric("repair_samples_total", endpoint="predict") - before["samples"] == 9
    assert server.metric("repair_request_duration_seconds_count", endpoint="predict", stage="model") - before["model"] == 3
    assert server.metric("repair_batch_size_sum") - before["batches"] == 9
    assert server.metric("repair_ready") == 1
    assert server.metric("repair_inflight_requests") == 1  # the /metrics scrape itself
    version = Bundle(server.service.settings.bundle).current_id()
    assert server.metric("repair_model_version_info", version=version) == 1


def test_versions_activate_rollback_and_hot_swap(server, reference):
    x, _ = reference
    bundle = Bundle(server.service.settings.bundle)
    first = bundle.current_id()
    parent = bundle.version()
    weights = {k: v.clone() for k, v in parent.tensors("model").items()}
    weights["head.bias"] = weights["head.bias"] + torch.eye(10)[3] * 100  # answers "3" always
    second = bundle.write_version(dict(parent.manifest, provenance={"created_by": "tests"}),
                                  {"model": weights}, parent=first, activate=False).id
    auth = {"Authorization": f"Bearer {TOKEN}"}
    listed = httpx.get(server.url + "/versions").json()
    assert listed["served"] == first and second in [v["id"] for v in listed["versions"]]
    r = httpx.post(server.url + f"/versions/{second}/activate", headers=auth)
    assert r.status_code == 200 and r.json()["served"] == second, r.text
    body = httpx.post(server.url + "/predict", json={"images": [b64png(x[0])]}).json()
    assert body["model_version"] == second and body["predictions"][0]["class_index"] == 3
    assert server.metric("repair_model_version_info", version=first) == 0
    r = httpx.post(server.url + "/versions/rollback", headers=auth)
    assert r.status_code == 200 and r.json()["served"] == first
    assert httpx.post(server.url + "/predict", json={"images": [b64png(x[0])]}).json()["model_version"] == first
    # A writer elsewhere moves CURRENT: the watcher hot-swaps without any request to us.
    bundle.activate(second)
    for _ in range(200):
        if httpx.get(server.url + "/versions").json()["served"] == second:
            break
        import time
        time.sleep(0.05)
    assert httpx.post(server.url + "/predict", json={"images": [b64png(x[0])]}).json()["model_version"] == second
    bundle.activate(first)
    r = httpx.post(server.url + "/versions/v9999/activate", headers=auth)
    assert r.status_code == 404 and "v9999" in r.json()["error"]


def test_rectify_submission_is_queued_not_run(server, reference):
    x, _ = reference
    auth = {"Authorization": f"Bearer {TOKEN}"}
    corrupt = x[0].clone()
    corrupt[:, -3:, -3:] = 1.0
    r = httpx.post(server.url + "/rectify", headers=auth,
                   json={"clean": b64png(x[0]), "corrupt": b64png(corrupt), "label": 3, "layer": "blocks.0.attn.qkv"})
    assert r.status_code == 202, r.text
    job = httpx.get(server.url + r.json()["status_url"], headers=auth).json()
    assert job["status"] == "queued" and job["params"]["label"] == [3]  # no worker in this server
    assert job["pairs"] == 1
    assert job["params"]["layer"] == "blocks.0.attn.qkv"
    assert job["params"]["stress"] == 2.0   # the defaults reach the worker
    assert job["params"]["candidates"] == 1 and job["params"]["min_gain"] == MIN_GAIN
    assert job["params"]["transplant"] == TRANSPLANT_SAMPLES and job["params"]["hold_anchors"] is False
    assert job["params"]["confirm"] is False
    bad = [({"clean": b64png(x[0]), "corrupt": b64png(x[0])}, "identical"),
           ({"clean": b64png(x[0]), "corrupt": b64png(corrupt), "label": 10}, "out of range"),
           ({"clean": b64png(x[0]), "corrupt": b64png(corrupt), "budget": 2}, "budget"),
           ({"clean": b64png(x[0]), "corrupt": b64png(corrupt), "validation": 0}, "validation"),
           ({"clean": b64png(x[0]), "corrupt": b64png(corrupt), "stress": 0.5}, "stress"),
           ({"clean": b64png(x[0]), "corrupt": b64png(corrupt), "candidates": 0}, "candidates"),
           ({"clean": b64png(x[0]), "corrupt": b64png(corrupt), "min_gain": 1}, "min_gain"),
           ({"clean": b64png(x[0]), "corrupt": b64png(corrupt), "transplant": -1}, "transplant"),
           ({"clean": b64png(x[0]), "corrupt": b64png(corrupt), "transplant": 1.5}, "transplant"),
           ({"clean": b64png(x[0]), "corrupt": b64png(corrupt), "layer": "blocks.9.fc"}, "not an editable layer"),
           ({"clean": b64png(x[0])}, "corrupt"),
           ({"clean": b64png(x[0]), "corrupt": b64png(corrupt), "label": True}, "label.0: Input should be a valid integer"),
           ({"clean": b64png(x[0]), "corrupt": b64png(corrupt), "static": 1}, "static: Input should be a valid boolean"),
           ({"clean": b64png(x[0]), "corrupt": b64png(corrupt), "confirm": "yes"}, "confirm: Input should be a valid boolean"),
           # n pairs: two lists in the same order
           ({"clean": [b64png(x[0]), b64png(x[1])], "corrupt": [b64png(corrupt)]}, "2 clean and 1 corrupt"),
           ({"clean": [b64png(x[0]), b64png(x[1])], "corrupt": [b64png(corrupt), b64png(x[1])]},
            "identical (pair 1)"),
           ({"clean": [b64png(x[0]), b64png(x[1])], "corrupt": [b64png(corrupt), "!!"]},
            "corrupt image 1 is not valid base64"),
           ({"clean": [b64png(x[0]), b64png(x[1])], "corrupt": [b64png(corrupt), b64png(corrupt[:, :8])]},
            "corrupt image 1: image is 16x8"),
           ({"clean": [b64png(x[0])] * 2, "corrupt": [b64png(corrupt)] * 2, "label": [1, 2, 3]}, "3 labels for 2 pairs"),
           ({"clean": [b64png(x[0])] * 2, "corrupt": [b64png(corrupt)] * 2, "label": [1, 10]}, "label 10 is out of range"),
           ({"clean": [b64png(x[0])] * 65, "corrupt": [b64png(corrupt)] * 65}, "at most 64 items"),
           ({"clean": [], "corrupt": []}, "at least 1 item")]
    for body, needle in bad:
        r = httpx.post(server.url + "/rectify", headers=auth, json=body)
        assert r.status_code == 422 and needle in r.json()["error"], r.text
    # two pairs, one label each: stored as what the model sees, in order
    corrupt2 = x[1].clone()
    corrupt2[:, -3:, -3:] = 1.0
    r = httpx.post(server.url + "/rectify", headers=auth, json={
        "clean": [b64png(x[0]), b64png(x[1])], "corrupt": [b64png(corrupt), b64png(corrupt2)], "label": [3, 4]})
    assert r.status_code == 202, r.text
    job = httpx.get(server.url + r.json()["status_url"], headers=auth).json()
    assert job["pairs"] == 2 and job["params"]["label"] == [3, 4]
    clean_pngs, corrupt_pngs = server.service.store.images(server.service.store.get(job["job_id"]))
    for png, sent in zip(clean_pngs + corrupt_pngs, [x[0], x[1], corrupt, corrupt2], strict=True):
        assert torch.equal(decode_image(png), sent)
    r = httpx.get(server.url + "/rectify/" + "0" * 32, headers=auth)
    assert r.status_code == 404


def test_admin_disabled_without_token(plain_bundle, reference):
    x, _ = reference
    with live_server(plain_bundle) as s:
        r = httpx.post(s.url + "/rectify", json={"clean": b64png(x[0]), "corrupt": b64png(x[1])})
        assert r.status_code == 403 and "--token" in r.json()["error"]
        assert httpx.post(s.url + "/predict", json={"images": [b64png(x[0])]}).status_code == 200


def test_serve_refuses_rectify_without_token_and_impossible_settings(plain_bundle, monkeypatch):
    from server.app import serve

    monkeypatch.delenv("REPAIR_TOKEN", raising=False)
    with pytest.raises(ValueError, match="--token"):
        serve(str(plain_bundle), port=1, token=None, insecure=False)
    for port in (0, 70000):  # uvicorn would log "running on :70000" and exit without serving
        with pytest.raises(ValueError, match=f"--port must be a TCP port .*got {port}"):
            serve(str(plain_bundle), port=port, insecure=True)
    with pytest.raises(ValueError, match="--workers must be"):
        serve(str(plain_bundle), workers=0, insecure=True)


def test_tabular_records(tabular_bundle):
    from repair.tabular import TabularSchema

    version = Bundle(tabular_bundle).version()
    schema = TabularSchema.from_json(version.manifest["preprocessing"])
    model = version.build_model("cpu")
    records = [{"age": 25 + 7 * i, "hours": 20 + 5 * i, "sex": ["Female", "Male"][i % 2],
                "work": ["private", "gov", "self"][i % 3]} for i in range(6)]
    with torch.no_grad():
        probs = torch.softmax(model(schema.encode(records)), -1)
    with live_server(tabular_bundle) as s:
        r = httpx.post(s.url + "/predict", json={"records": records})
        assert r.status_code == 200, r.text
        got = torch.tensor([p["probabilities"] for p in r.json()["predictions"]])
        assert torch.allclose(got, probs, atol=1e-5)
        inputs = [{"name": f, "shape": [6], "datatype": "BYTES" if f in ("sex", "work") else "FP32",
                   "data": [rec[f] for rec in records]} for f in schema.names]
        r = httpx.post(s.url + f"/v2/models/{s.service.settings.name}/infer", json={"inputs": inputs})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][1]["data"] == probs.argmax(-1).tolist()
        bad = [({"records": [dict(records[0], sex="Other")]}, "unknown category"),
               ({"records": [{k: v for k, v in records[0].items() if k != "age"}]}, "missing age"),
               ({"records": [dict(records[0], age=math.nan)]}, "finite"),
               ({"records": [dict(records[0], age="old")]}, "number"),
               ({"records": [dict(records[0], zip=1)]}, "unknown features"),
               ({"records": [dict(records[0], age=True)]}, "must be a number, got True"),
               # finite, but the model overflows: its answer would be NaN in a 200 (invalid JSON)
               ({"records": [records[0], dict(records[0], age=1e30)]}, "sample(s) [1] is not finite"),
               ({"images": [b64png(torch.zeros(1, 16, 16))]}, "records")]
        for body, needle in bad:  # json.dumps writes NaN as a bare NaN, as careless clients do
            r = httpx.post(s.url + "/predict", content=json.dumps(body),
                           headers={"content-type": "application/json"})
            assert r.status_code == 422 and needle in r.json()["error"], r.text
        v2 = f"/v2/models/{s.service.settings.name}/infer"
        bad_v2 = [(inputs[:1] + inputs, "given twice"),
                  ([dict(inputs[0], shape=[10**12])] + inputs[1:], "does not describe its 6 values"),
                  ([dict(inputs[0], datatype="STRING")] + inputs[1:], "datatype 'STRING'")]
        for body_inputs, needle in bad_v2:
            r = httpx.post(s.url + v2, json={"inputs": body_inputs})
            assert r.status_code == 422 and needle in r.json()["error"], r.text
        for extra, needle in (({"parameters": "off"}, "'parameters' must be an object"),
                              ({"outputs": "label"}, "'outputs' must be a list")):
            r = httpx.post(s.url + v2, json={"inputs": inputs, **extra})
            assert r.status_code == 422 and needle in r.json()["error"], r.text
