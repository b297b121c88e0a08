"""Open Inference Protocol v2 (KServe/Triton REST) over the same service.

Health, server and model metadata, readiness and ``infer``, each also under
``/versions/{version}``; errors are ``{"error": ...}``. Repair details (patch mode, patched
flags and columns, added latency, shadow results) ride in the response ``parameters``.

Inputs: images as one tensor (``FP32``/``FP64``/``FP16`` in [0, 1] or ``UINT8`` 0..255, shape
``[B, C, H, W]``) or one ``BYTES`` tensor of base64 PNG/JPEG; tabular records as one tensor per
feature (named by the feature, shape ``[B]``), or one ``FP32`` tensor of encoded rows ``[B, F]``.
"""
from __future__ import annotations

import math

import torch
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from server.errors import NotFound, Unprocessable
from server.service import now, patch_mode, predictions

router = APIRouter(prefix="/v2")

DTYPES = {"FP32": torch.float32, "FP64": torch.float64, "FP16": torch.float16,
          "UINT8": torch.uint8, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32,
          "INT64": torch.int64, "BOOL": torch.bool}
DATATYPES = (*DTYPES, "BYTES")  # what an input may declare (BYTES: base64 images, category names)


def _service(request: Request):
    return request.app.state.service


def _json(body: dict, status: int = 200):
    from server.app import json_response

    return json_response(body, status)


def _check_model(svc, name: str, version: str | None = None):
    if name != svc.settings.name:
        raise NotFound(f"model {name!r} not found; this server serves {svc.settings.name!r}")
    if version is not None and version not in svc.runtime.bundle.version_ids():
        raise NotFound(f"model {name!r} has no version {version!r}")


@router.get("/health/live")
async def live():
    return _json({"live": True})


@router.get("/health/ready")
async def ready(request: Request):
    svc = _service(request)
    svc.served()  # 503 while loading
    return _json({"ready": True})


@router.get("")
async def server_metadata():
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("repair-proxy")
    except PackageNotFoundError:
        v = "0"
    return _json({"name": "repair-proxy", "version": v, "extensions": ["repair"]})


def _metadata(svc, name: str, version: str | None) -> dict:
    _check_model(svc, name, version)
    served = svc.served(version)
    if served.kind == "vision":
        inputs = [{"name": "input", "datatype": "FP32", "shape": [-1, *served.shape]}]
    else:
        inputs = [{"name": f.name, "datatype": "FP32" if f.kind == "numeric" else "BYTES",
                   "shape": [-1]} for f in served.schema.features]
    return {"name": name, "versions": svc.runtime.bundle.version_ids(), "platform": "pytorch",
            "served_version": served.id, "labels": served.labels, "atpatch": served.has_patch,
            "inputs": inputs,
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(served.labels)]},
                        {"name": "class_index", "datatype": "INT64", "shape": [-1]},
                        {"name": "label", "datatype": "BYTES", "shape": [-1]}]}


@router.get("/models/{name}")
async def model_metadata(name: str, request: Request):
    return _json(_metadata(_service(request), name, None))


@router.get("/models/{name}/versions/{version}")
async def model_version_metadata(name: str, version: str, request: Request):
    return _json(await run_in_threadpool(_metadata, _service(request), name, version))


def _ready(svc, name: str, version: str | None) -> dict:
    _check_model(svc, name, version)
    svc.served()  # 503 while loading
    return {"name": name, "ready": True, **({"version": version} if version else {})}


@router.get("/models/{name}/ready")
async def model_ready(name: str, request: Request):
    return _json(_ready(_service(request), name, None))


@router.get("/models/{name}/versions/{version}/ready")
async def model_version_ready(name: str, version: str, request: Request):
    return _json(_ready(_service(request), name, version))


# -- infer ---------------------------------------------------------------------------------------

def _bad_datatype(inp: dict) -> Unprocessable:
    return Unprocessable(f"input {inp.get('name', '?')!r}: datatype {inp.get('datatype')!r} is not one of "
                         f"{', '.join(DATATYPES)}")


def _tensor(inp: dict) -> torch.Tensor:
    name = inp.get("name", "?")
    dtype = DTYPES.get(inp.get("datatype"))
    if dtype is None:
        raise _bad_datatype(inp)
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise Unprocessable(f"input {name!r}: shape must be a list of non-negative integers")
    data = inp.get("data")
    if not isinstance(data, list):
        raise Unprocessable(f"input {name!r}: data must be a list")
    try:
        t = torch.tensor(data, dtype=torch.float64 if dtype.is_floating_point else None)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise Unprocessable(f"input {name!r}: data is not numeric: {err}") from None
    if t.numel() != math.prod(shape):
        raise Unprocessable(f"input {name!r}: {t.numel()} values do not fill shape {shape}")
    t = t.reshape(shape)
    return t.float() / 255.0 if dtype == torch.uint8 else t.float()


def _parse(svc, served, body: dict) -> torch.Tensor:
    from server.jobs import b64decode

    if not isinstance(body, dict):
        raise Unprocessable("request body must be a JSON object with 'inputs'")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, dict) for i in inputs):
        raise Unprocessable("'inputs' must be a non-empty list of tensors "
                            "({name, shape, datatype, data})")
    limit = svc.settings.max_image_pixels
    if served.kind == "vision":
        if len(inputs) != 1:
            raise Unprocessable(f"an image model takes one input tensor, got {len(inputs)}")
        inp = inputs[0]
        if inp.get("datatype") == "BYTES":
            data = inp.get("data")
            if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
                raise Unprocessable("BYTES input: data must be a list of base64 strings")
            if inp.get("shape") != [len(data)]:
                raise Unprocessable(f"BYTES input: shape {inp.get('shape')!r} does not describe its {len(data)} "
                                    f"images (shape [{len(data)}])")
            svc.check_count(len(data))
            return served.preprocess_images([b64decode(d, f"image {i}") for i, d in enumerate(data)], limit)
        x = served.check_tensor(_tensor(inp))
        svc.check_count(len(x))
        return x
    names = [i.get("name") for i in inputs]
    if len(inputs) == 1 and names[0] not in served.schema.names:  # encoded rows [B, F]
        x = served.check_tensor(_tensor(inputs[0]))
        svc.check_count(len(x))
        return x
    columns = {}
    for inp in inputs:  # one input per feature: {name, datatype, shape [n], data (n values)}
        name, data, shape = inp.get("name"), inp.get("data"), inp.get("shape")
        if not isinstance(data, list):
            raise Unprocessable(f"input {name!r}: data must be a list")
        if name in columns:
            raise Unprocessable(f"input {name!r} is given twice")
        if inp.get("datatype") not in DATATYPES:
            raise _bad_datatype(inp)
        if shape != [len(data)]:
            raise Unprocessable(f"input {name!r}: shape {shape!r} does not describe its {len(data)} values "
                                f"(a feature input has shape [{len(data)}])")
        columns[name] = data
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1:
        raise Unprocessable(f"feature inputs have different lengths {sorted(lengths)}")
    n = lengths.pop()
    svc.check_count(n)
    records = [{k: v[i] for k, v in columns.items()} for i in range(n)]
    return served.preprocess_records(records)


async def _infer(request: Request, name: str, version: str | None):
    from server.app import read_json, require_json

    svc = _service(request)
    _check_model(svc, name, version)
    # Another version than the served one is loaded on demand: not on the event loop.
    served = svc.served() if version is None else await run_in_threadpool(svc.served, version)
    require_json(request)
    t0 = now()
    body = await read_json(request)
    x = _parse(svc, served, body)
    params, wanted = body.get("parameters") or {}, body.get("outputs")
    if not isinstance(params, dict):
        raise Unprocessable("'parameters' must be an object, e.g. {\"patch\": \"off\"}")
    if wanted is not None and not isinstance(wanted, list):
        raise Unprocessable("'outputs' must be a list of {\"name\": ...}")
    mode = patch_mode(request.query_params.get("patch") or params.get("patch"))
    result, _ = await svc.infer(served, x, mode, "infer", now() - t0)
    preds = predictions(served, result)
    probs = result.probabilities
    outputs = [
        {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
         "data": probs.flatten().tolist()},
        {"name": "class_index", "datatype": "INT64", "shape": [len(preds)],
         "data": [p["class_index"] for p in preds]},
        {"name": "label", "datatype": "BYTES", "shape": [len(preds)], "data": [p["label"] for p in preds]},
    ]
    if wanted:
        names = [o.get("name") if isinstance(o, dict) else None for o in wanted]
        unknown = [n for n in names if n not in ("probabilities", "class_index", "label")]
        if unknown:
            raise Unprocessable(f"unknown outputs {unknown}; available: probabilities, class_index, label")
        outputs = [o for o in outputs if o["name"] in names]
    parameters = {"patch": mode, "patched": [p["patched"] for p in preds],
                  "patched_columns": [p["patched_columns"] for p in preds],
                  "added_latency_ms": preds[0]["added_latency_ms"] if preds else 0.0}
    if result.shadow is not None:
        parameters["shadow"] = [p["shadow"] for p in preds]
    request.state.model_version = served.id
    request.state.samples = len(preds)
    out = {"model_name": name, "model_version": served.id, "outputs": outputs, "parameters": parameters}
    if "id" in body:
        out["id"] = body["id"]
    return _json(out)


@router.post("/models/{name}/infer")
async def infer(name: str, request: Request):
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer")
async def infer_version(name: str, version: str, request: Request):
    return await _infer(request, name, version)
