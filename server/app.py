"""The FastAPI app: routes of the service's own protocol, middleware, lifespan, ``serve``.

``create_app(bundle, ...)`` builds one app (tests run it under a real uvicorn); ``serve(...)``
is what ``repair-proxy serve`` calls: it checks the security settings, sets up multiprocess
metrics for ``--workers > 1``, embeds a rectification worker, and runs uvicorn, which drains
in-flight requests on SIGTERM before the lifespan shutdown stops the batcher (after its queue is
empty), the version watcher and the worker.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from starlette.responses import Response

from server import errors
from server.errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from server.service import Service, Settings, now, patch_mode, predictions

log = logging.getLogger("repair.server")
access_log = logging.getLogger("repair.access")

ENDPOINTS = {"predict": "predict", "rectify": "rectify", "versions": "versions",
             "metrics": "metrics"}


def endpoint_of(path: str) -> str:
    """The ``endpoint`` label: a small fixed set, never a raw path (label cardinality)."""
    parts = path.strip("/").split("/")
    if parts[0] == "v2":
        if parts[-1] == "infer":
            return "infer"
        return "health" if len(parts) > 1 and parts[1] == "health" else "v2"
    return ENDPOINTS.get(parts[0], "other")


def json_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")).encode(), status_code=status,
                    media_type="application/json", headers=headers)


class ServiceMiddleware:
    """Pure ASGI (cheap): body-size limit, in-flight gauge, request counter, total duration,
    and one JSON access-log line per request."""

    def __init__(self, app, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        svc = self.service
        limit = svc.settings.max_body_bytes
        endpoint = endpoint_of(scope["path"])
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        received = {"n": 0}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                received["n"] += len(message.get("body", b""))
                if received["n"] > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        svc.metrics.inflight.inc()
        try:
            declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            too_large = None
            if declared is not None:
                try:
                    too_large = int(declared) > limit
                except ValueError:
                    await errors.error_response(400, "Content-Length is not an integer")(scope, receive, send_wrapper)
                    return
            if too_large:
                await errors.error_response(
                    413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes"
                )(scope, receive, send_wrapper)
                return
            await self.app(scope, limited_receive, send_wrapper)
        finally:
            svc.metrics.inflight.dec()
            elapsed = time.perf_counter() - started
            svc.metrics.requests.labels(endpoint=endpoint, code=str(status["code"])).inc()
            svc.metrics.duration.labels(endpoint=endpoint, stage="total").observe(elapsed)
            if svc.settings.access_log:
                state = scope.get("state") or {}
                client = scope.get("client")
                access_log.info(json.dumps({
                    "ts": round(time.time(), 6), "method": scope["method"], "path": scope["path"],
                    "query": scope.get("query_string", b"").decode("latin-1") or None,
                    "status": status["code"], "endpoint": endpoint,
                    "duration_ms": round(elapsed * 1000, 3), "bytes_in": received["n"],
                    "client": f"{client[0]}:{client[1]}" if client else None,
                    "model_version": state.get("model_version"), "samples": state.get("samples"),
                    "patched": state.get("patched")}, separators=(",", ":")))


async def read_json(request: Request):
    raw = await request.body()
    if not raw:
        raise Unprocessable("request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except ValueError as err:  # malformed JSON, bad UTF-8, or a number of more than 4300 digits
        raise Unprocessable(f"request body is not valid JSON: {err}") from None
    except RecursionError:  # ``[[[[...]]]]`` nested past Python's recursion limit
        raise Unprocessable("request body is not valid JSON: nested too deeply") from None


def validate(model, data):
    """Pydantic validation with the messages flattened into one readable line."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        parts = []
        for e in err.errors():
            where = ".".join(str(p) for p in e.get("loc", ()))
            msg = e.get("msg", "invalid").removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
        raise Unprocessable("invalid request: " + "; ".join(parts)) from None


def require_json(request: Request) -> None:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("application/json"):
        raise UnsupportedMediaType(f"content type {ctype or '(none)'!r} is not supported here; "
                                   "send application/json")


def create_app(bundle: str, *, device: str = "auto", token: str | None = None,
               insecure: bool = False, **options) -> FastAPI:
    """One app serving ``bundle``; options are :class:`server.service.Settings` fields."""
    from server import jobs, v2
    from server.schemas import PredictRequest, RectifyRequest

    settings = Settings(bundle=str(bundle), device=device, token=token, insecure=insecure, **options)
    service = Service(settings)
    worker = jobs.EmbeddedWorker(settings.bundle) if settings.embed_worker and settings.admin_enabled else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.runtime.start()  # loads in the background; /ready says 503 meanwhile
        await service.batcher.start()
        if worker is not None:
            worker.start()
        try:
            yield
        finally:  # uvicorn has drained in-flight requests by now
            service.metrics.ready.set(0)
            await service.batcher.stop()
            service.runtime.stop()
            if worker is not None:
                worker.stop()

    app = FastAPI(title="Repair Proxy", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.worker = worker
    errors.install(app)
    app.add_middleware(ServiceMiddleware, service=service)

    # -- predict -------------------------------------------------------------------------------

    async def predict(request: Request):
        patch = patch_mode(request.query_params.get("patch"))
        served = service.served()
        t0 = now()
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            body = validate(PredictRequest, await read_json(request))
            if body.images is not None:
                service.check_count(len(body.images))
                x = served.preprocess_images([jobs.b64decode(b, f"image {i}") for i, b in enumerate(body.images)],
                                             settings.max_image_pixels)
            else:
                service.check_count(len(body.records))
                x = served.preprocess_records(body.records)
        elif ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=settings.max_samples + 1, max_fields=16)
            files = [f for f in form.getlist("file") if hasattr(f, "read")]
            if not files:
                raise Unprocessable("multipart body has no 'file' part with an image")
            service.check_count(len(files))
            x = served.preprocess_images([await f.read() for f in files], settings.max_image_pixels)
        else:
            raise UnsupportedMediaType(f"content type {ctype or '(none)'!r} is not supported; send "
                                       "application/json or multipart/form-data")
        result, _ = await service.infer(served, x, patch, "predict", now() - t0)
        request.state.model_version = served.id
        request.state.samples = len(result)
        request.state.patched = int(result.patched.sum())
        return json_response({"model_version": served.id, "predictions": predictions(served, result)})

    # A plain Starlette route: the hot path skips FastAPI's per-request dependency solving (it
    # needs none: the body is validated by `validate`, the query by `patch_mode`); the same
    # exception handlers answer its errors.
    app.add_route("/predict", predict, methods=["POST"])

    # -- rectification jobs --------------------------------------------------------------------

    @app.post("/rectify", status_code=202)
    async def rectify(request: Request):
        service.authorize(request.headers.get("authorization"))
        require_json(request)
        body = validate(RectifyRequest, await read_json(request))
        job = await run_in_threadpool(jobs.submit, service.store, service.served(), body,
                                      settings.max_image_pixels)
        url = f"/rectify/{job['id']}"
        return json_response({"job_id": job["id"], "status_url": url, "status": job["status"]},
                             status=202, headers={"Location": url})

    @app.get("/rectify/{job_id}")
    async def rectify_status(job_id: str, request: Request):
        service.authorize(request.headers.get("authorization"))
        return json_response(jobs.public(jobs.get(service.store, job_id), f"/rectify/{job_id}"))

    @app.get("/rectify")
    async def rectify_list(request: Request):
        service.authorize(request.headers.get("authorization"))
        return json_response({"jobs": [jobs.public(j, f"/rectify/{j['id']}") for j in service.store.all()]})

    # -- versions ------------------------------------------------------------------------------

    def versions_body() -> dict:
        b = service.runtime.bundle
        out = []
        for vid in b.version_ids():
            try:
                v = b.version(vid)
            except Exception as err:  # a broken version is listed, not fatal
                out.append({"id": vid, "error": str(err)})
                continue
            m = v.manifest
            out.append({"id": vid, "parent": v.parent, "created": m.get("created"),
                        "kind": m.get("kind"), "atpatch": v.has("detector"),
                        "edits": len(v.edits()), "metrics": m.get("metrics", {}),
                        "created_by": m.get("provenance", {}).get("created_by")})
        served = service.runtime.served
        return {"current": b.current_id(), "served": served.id if served else None,
                "error": service.runtime.error, "versions": out}

    @app.get("/versions")
    async def versions():
        return json_response(await run_in_threadpool(versions_body))

    async def swap_now() -> dict:
        await run_in_threadpool(service.runtime.refresh)
        return await run_in_threadpool(versions_body)

    @app.post("/versions/rollback")
    async def rollback(request: Request):
        service.authorize(request.headers.get("authorization"))
        await run_in_threadpool(service.runtime.bundle.rollback)
        return json_response(await swap_now())

    @app.post("/versions/{version_id}/activate")
    async def activate(version_id: str, request: Request):
        service.authorize(request.headers.get("authorization"))
        await run_in_threadpool(service.runtime.bundle.activate, version_id)
        return json_response(await swap_now())

    # -- metrics -------------------------------------------------------------------------------

    @app.get("/metrics")
    async def metrics():
        content, ctype = await run_in_threadpool(service.metrics.render)
        return Response(content, media_type=ctype)

    # After the service's own routes: a request is matched against the routes in order, and
    # /predict, the hot one, should not first be tried against every v2 route.
    app.include_router(v2.router)
    return app


def factory() -> FastAPI:
    """uvicorn ``--factory`` entry for ``--workers > 1``: settings come from the environment."""
    options = json.loads(os.environ["REPAIR_SERVER_OPTIONS"])
    _configure_logging()  # each worker is a fresh (spawned) process
    return create_app(**options)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a message that already is one (access log) is passed through."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if msg.startswith("{") and record.name == "repair.access":
            return msg
        line = {"ts": round(record.created, 6), "logger": record.name, "level": record.levelname, "msg": msg}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"))


def _configure_logging() -> None:
    """Structured logs on stderr for the service's loggers (uvicorn's access log is off)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("repair.access", "repair.server", "repair.worker"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


def serve(bundle: str, host: str = "127.0.0.1", port: int = 8080, device: str = "auto",
          workers: int = 1, token: str | None = None, insecure: bool = False, **options) -> None:
    """``repair-proxy serve``. Refuses to start with /rectify enabled and no token unless
    ``insecure``; the token may also come from ``REPAIR_TOKEN`` (not visible in ``ps``)."""
    import uvicorn

    from repair.bundle import Bundle
    from repair.models import resolve_device

    token = token or os.environ.get("REPAIR_TOKEN") or None
    # A separately run `repair-proxy worker` (e.g. its own container) replaces the embedded one.
    options.setdefault("embed_worker", os.environ.get("REPAIR_EXTERNAL_WORKER", "") in ("", "0"))
    if not token and not insecure:
        raise ValueError("refusing to start: /rectify and version changes need a bearer token; "
                         "pass --token (or set REPAIR_TOKEN), or --insecure on a trusted network")
    if workers < 1:
        raise ValueError(f"--workers must be ≥ 1, got {workers}")
    if not 1 <= port <= 65535:  # uvicorn logs "running on :70000", then exits 0 without serving
        raise ValueError(f"--port must be a TCP port (1-65535), got {port}")
    Bundle(bundle).version()  # fail now, clearly, on a bad bundle
    resolve_device(device)
    _configure_logging()
    base = dict(bundle=str(bundle), device=device, token=token, insecure=insecure, **options)
    common = dict(host=host, port=port, access_log=False, timeout_graceful_shutdown=30,
                  log_level="info")
    if workers == 1:
        uvicorn.run(create_app(**base), **common)
        return
    # Several processes: metrics go through PROMETHEUS_MULTIPROC_DIR (set before any worker
    # imports prometheus_client); one embedded rectification worker for all of them.
    from server.jobs import EmbeddedWorker

    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="repair-metrics-"))
    embedded = EmbeddedWorker(str(bundle)) if options["embed_worker"] else None
    os.environ["REPAIR_SERVER_OPTIONS"] = json.dumps({**base, "embed_worker": False})
    if embedded is not None:
        embedded.start()
    try:
        uvicorn.run("server.app:factory", factory=True, workers=workers, **common)
    finally:
        if embedded is not None:
            embedded.stop()
