"""The HTTP service (DESIGN.md "server/"): protocol fronts apart from the model lifecycle.

- ``app``: FastAPI app factory ``create_app``, middleware (size limit, metrics, access log),
  ``serve`` (``repair-proxy serve``); ``v2``: Open Inference Protocol v2 routes;
- ``service``: what the fronts share (settings, guards, the one inference path, postprocess);
- ``runtime``: load → preprocess → predict (AtPatch hooks) → hot swap of versions;
- ``batching``: micro-batching; ``jobs``: rectification job submission and the embedded worker;
- ``schemas``: request bodies; ``errors``: exceptions → HTTP codes; ``metrics``: Prometheus.
"""
