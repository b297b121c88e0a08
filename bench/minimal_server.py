"""A reference for ``bench/server.py``: the least an HTTP server must do to answer ``/predict``.

A bare ASGI app under the same uvicorn as ``repair-proxy serve`` that parses the JSON body,
decodes the base64 PNG, runs the same ``Served.forward`` and writes the same prediction JSON,
and nothing else: no framework routing, no validation, no metrics, no logs, no batcher. Its
latency over the bare model call is the part of the server overhead that this machine's socket
round trip, thread wake-ups and cold caches set on their own; ``repair-proxy serve`` minus this
reference is what the service itself costs.

    .venv/bin/python bench/minimal_server.py --bundle BUNDLE --port PORT [--device cpu]
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_app(bundle: str, device: str = "cpu"):
    from repair.bundle import Bundle
    from repair.models import resolve_device
    from server.runtime import Served
    from server.service import predictions

    served = Served(Bundle(bundle).version(), resolve_device(device), max_batch_size=1)

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        images = json.loads(body)["images"]
        x = served.preprocess_images([base64.b64decode(i) for i in images])
        mode = "off" if b"patch=off" in scope.get("query_string", b"") else "on"
        out = json.dumps({"predictions": predictions(served, served.forward(x, mode))}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    uvicorn.run(make_app(a.bundle, a.device), host="127.0.0.1", port=a.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
