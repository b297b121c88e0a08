"""Server latency/throughput benchmark: a real load generator against a real ``repair-proxy serve``.

Closed loop: C connections (keep-alive, raw HTTP/1.1 over asyncio streams, so the client adds
as little as possible) each send ``POST /predict`` with one base64 PNG back to back for a fixed
time; latency is measured per request from the first byte sent to the last byte received.
Configurations: repair off (``?patch=off``) and on (``?patch=on``, clean and triggered input),
at concurrency 1 and 32, against the bare model call (in-process ``model(x)`` /
``AtPatch(x, "on")`` on the already-decoded tensor, same thread count), back to back and paced
(one call per server round trip, the core idle in between: on this VM that alone makes the
forward 0.6–1 ms slower than in a tight loop). Server overhead at concurrency 1 = server p50 −
bare p50, reported over both. At concurrency 1 the same requests also go to
``bench/minimal_server.py`` (decode, forward and JSON with no service around them): its overhead
is what this machine charges any Python HTTP server, the rest is the service's own.

    .venv/bin/python bench/server.py --bundle BUNDLE [--seconds 10] [--threads 1] [--device cpu]

The committed results used the BadNets digits ViT with the detector that
``python bench/atpatch_vision.py`` builds for seed 0 (paper defaults: 50 epochs, τ = 0.1), in
``/tmp/atpatch-digits/patched-seed0``.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "bundle: a digits ViT BadNets model with an AtPatch detector (`python bench/atpatch_vision.py`, 50 epochs)"
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402  (bench/, this script's directory)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summarize(lat: list[float], wall: float, errors: int = 0) -> dict:
    return {"n": len(lat), "errors": errors, "p50_ms": round(percentile(lat, 50) * 1e3, 3),
            "p99_ms": round(percentile(lat, 99) * 1e3, 3), "mean_ms": round(statistics.fmean(lat) * 1e3, 3),
            "throughput_rps": round(len(lat) / wall, 1)}


# -- bare model call ------------------------------------------------------------------------------

class Bare:
    """In-process model calls on the decoded tensor, as the server's model thread makes them."""

    def __init__(self, bundle: str, device: str):
        from repair.bundle import Bundle
        from repair.models import resolve_device
        from server.runtime import Served

        self.served = Served(Bundle(bundle).version(), resolve_device(device), max_batch_size=1)

    def call(self, mode: str):
        served = self.served

        def fn(x):
            with torch.inference_mode():
                logits = served.run(x, mode)[0]  # as the server calls it (CUDA graphs on a GPU)
                return torch.softmax(logits, -1).cpu()  # the server's one host sync
        return fn

    def round(self, mode: str, x: torch.Tensor, seconds: float, period: float = 0.0) -> list[float]:
        """Latencies of back-to-back calls, or with ``period``: one call every ``period`` seconds,
        the core idle in between, as a server at concurrency 1 calls the model."""
        fn, x = self.call(mode), x.to(self.served.device)
        for _ in range(20):
            fn(x)
        lat, end = [], time.perf_counter() + seconds
        cpu0 = time.process_time()
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            fn(x)
            lat.append(time.perf_counter() - t0)
            if period:
                time.sleep(max(0.0, t0 + period - time.perf_counter()))
        self.cpu = time.process_time() - cpu0
        return lat


# -- load generator -------------------------------------------------------------------------------

async def _client(host, port, request: bytes, stop_at: float, lat: list, errs: list):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(request)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if status != 200:
                errs.append(status)
    finally:
        writer.close()


def load(host: str, port: int, path: str, body: bytes, concurrency: int, seconds: float,
         warmup: float = 0.5) -> tuple[list[float], int, float]:
    """Latencies, error count and wall time of one closed-loop run."""
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def run(duration):
        lat, errs = [], []
        stop_at = time.perf_counter() + duration
        started = time.perf_counter()
        await asyncio.gather(*(_client(host, port, request, stop_at, lat, errs) for _ in range(concurrency)))
        return lat, len(errs), time.perf_counter() - started

    asyncio.run(run(warmup))
    return asyncio.run(run(seconds))


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stages(port: int) -> dict:
    """Mean time per /predict request by stage, as the server itself measured it
    (``repair_request_duration_seconds``): what happens outside ``total`` is HTTP and the kernel."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    sums, counts = {}, {}
    for fam in text_string_to_metric_families(httpx.get(f"http://127.0.0.1:{port}/metrics").text):
        for smp in fam.samples:
            if smp.labels.get("endpoint") != "predict":
                continue
            if smp.name == "repair_request_duration_seconds_sum":
                sums[smp.labels["stage"]] = smp.value
            elif smp.name == "repair_request_duration_seconds_count":
                counts[smp.labels["stage"]] = smp.value
    return {k: round(sums[k] / counts[k] * 1e3, 3) for k in sums if counts.get(k)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="a vision bundle with an AtPatch detector")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (server and bare)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5, help="interleaved bare/server rounds at concurrency 1")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "server"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from offline.datasets import load_dataset
    from offline.defects import Trigger
    from repair.bundle import Bundle
    from repair.images import encode_png, quantize

    version = Bundle(a.bundle).version()
    data = load_dataset(version.manifest["dataset"]["name"])
    x = quantize(data.x_test[:1])
    trig = quantize(Trigger.from_tensors(version.tensors("defect")).apply(x)) if version.has("defect") else x
    xs = {"clean": x, "triggered": trig}
    bodies = {name: json.dumps({"images": [base64.b64encode(encode_png(t[0])).decode()]}).encode()
              for name, t in (("clean", x), ("triggered", trig))}

    results = {"command": " ".join([".venv/bin/python", "bench/server.py", *sys.argv[1:]]),
               "bundle_version": version.id, "device": a.device, "threads": a.threads,
               "atpatch": {k: version.manifest.get("atpatch", {}).get(k) for k in ("row_gate", "layers", "layer_thresholds")},
               "build_seed": version.manifest.get("provenance", {}).get("seed"),
               "seconds_per_point": a.seconds, "rounds_c1": a.rounds,
               "cpu": cpu_name(), "cores": os.cpu_count(),
               "load_average_before": os.getloadavg(), "bare": {}, "paced": {}, "server": {}, "minimal": {}}
    bare = Bare(a.bundle, a.device)
    modes = ["off"] + (["on"] if bare.served.patcher is not None else [])
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "REPAIR_TOKEN": "bench"}
    # Each server's stderr goes to a temporary file: shown if it dies before answering.
    logs = [tempfile.TemporaryFile() for _ in range(2)]
    server = subprocess.Popen([sys.executable, "-c", "from repair_proxy_cli import main; main()", "serve",
                               "--bundle", a.bundle, "--port", str(port), "--device", a.device],
                              env=env, cwd=ROOT, stderr=logs[0])
    # The reference: the same decode, forward and JSON without the service around them.
    minimal_port = free_port()
    minimal = subprocess.Popen([sys.executable, str(ROOT / "bench" / "minimal_server.py"), "--bundle", a.bundle,
                                "--port", str(minimal_port), "--device", a.device],
                               env=env, cwd=ROOT, stderr=logs[1])
    try:
        for proc, log, url, body in ((server, logs[0], f"http://127.0.0.1:{port}/v2/health/ready", None),
                                     (minimal, logs[1], f"http://127.0.0.1:{minimal_port}/predict", bodies["clean"])):
            wait_until_answering(proc, log, url, body)
        # Concurrency 1: bare, reference and server rounds interleaved, so load drift on a shared
        # machine hits all alike; latencies are pooled over the rounds.
        points = [(m, p) for m in modes for p in (("clean", "triggered") if m == "on" else ("clean",))]
        # CPU time per request too (bare: this process; server: its process, all threads; the
        # 0.2 s warm-up of each round included), a measure the other jobs on the machine hardly move.
        acc = {k: {"bare": [], "paced": [], "server": [], "minimal": [], "server_errors": 0, "minimal_errors": 0,
                   "server_wall": 0.0, "minimal_wall": 0.0, "bare_cpu": 0.0, "server_cpu": 0.0, "server_n": 0.0}
               for k in points}
        for _ in range(a.rounds):
            for mode, payload in points:
                point, path, seconds = acc[(mode, payload)], f"/predict?patch={mode}", a.seconds / a.rounds
                lat, e, w = load("127.0.0.1", minimal_port, path, bodies[payload], 1, seconds, warmup=0.2)
                point["minimal"] += lat
                point["minimal_errors"] += e
                point["minimal_wall"] += w
                point["bare"] += bare.round(mode, xs[payload], seconds)
                point["bare_cpu"] += bare.cpu
                c0 = proc_cpu_seconds(server.pid)
                t_warm = time.perf_counter()
                lat, e, w = load("127.0.0.1", port, path, bodies[payload], 1, seconds, warmup=0.2)
                point["server_cpu"] += proc_cpu_seconds(server.pid) - c0
                point["server_n"] += len(lat) * (time.perf_counter() - t_warm) / w  # requests incl. warm-up (approx.)
                point["server"] += lat
                point["server_errors"] += e
                point["server_wall"] += w
                # The same call at the rate the server was just called (one per round trip): a
                # core that idles between calls runs the forward slower than a tight loop does.
                point["paced"] += bare.round(mode, xs[payload], seconds, period=statistics.median(lat))
        results["server_side_c1_mean_ms"] = stages(port)
        for (mode, payload), point in acc.items():
            key = f"{mode}_{payload}"
            results["bare"][key] = dict(summarize(point["bare"], a.seconds),
                                        cpu_ms_per_call=round(point["bare_cpu"] / len(point["bare"]) * 1e3, 3))
            results["paced"][key] = summarize(point["paced"], a.seconds)
            results["server"][f"{key}_c1"] = dict(summarize(point["server"], point["server_wall"], point["server_errors"]),
                                                  cpu_ms_per_request=round(point["server_cpu"] / point["server_n"] * 1e3, 3))
            results["minimal"][f"{key}_c1"] = summarize(point["minimal"], point["minimal_wall"], point["minimal_errors"])
            print(mode, payload, results["bare"][key], results["paced"][key], results["server"][f"{key}_c1"], flush=True)
        for mode, payload in points:
            lat, errs, wall = load("127.0.0.1", port, f"/predict?patch={mode}", bodies[payload], 32, a.seconds)
            results["server"][f"{mode}_{payload}_c32"] = summarize(lat, wall, errs)
            print(mode, payload, "c32", results["server"][f"{mode}_{payload}_c32"], flush=True)
    finally:
        for proc in (server, minimal):
            proc.terminate()
            proc.wait(30)
        for log in logs:
            log.close()
    results["load_average_after"] = os.getloadavg()

    s, b = results["server"], results["bare"]
    results["overhead_c1_p50_ms"] = {k: round(s[f"{k}_c1"]["p50_ms"] - v["p50_ms"], 3) for k, v in b.items()}
    results["minimal_overhead_c1_p50_ms"] = {k: round(results["minimal"][f"{k}_c1"]["p50_ms"] - v["p50_ms"], 3)
                                             for k, v in b.items()}
    results["overhead_over_paced_c1_p50_ms"] = {k: round(s[f"{k}_c1"]["p50_ms"] - v["p50_ms"], 3)
                                                for k, v in results["paced"].items()}
    results["minimal_overhead_over_paced_c1_p50_ms"] = {
        k: round(results["minimal"][f"{k}_c1"]["p50_ms"] - v["p50_ms"], 3) for k, v in results["paced"].items()}
    results["overhead_c1_cpu_ms"] = {k: round(s[f"{k}_c1"]["cpu_ms_per_request"] - v["cpu_ms_per_call"], 3)
                                     for k, v in b.items()}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    write_markdown(results, out.with_suffix(".md"))
    plot(results, out.with_suffix(".png"))
    print(json.dumps(results["overhead_c1_p50_ms"]), json.dumps(results["overhead_c1_cpu_ms"]))


def wait_until_answering(proc: subprocess.Popen, log, url: str, body: bytes | None, timeout: float = 300) -> None:
    """Poll ``url`` until it answers 200; a server that exits or never answers ends the benchmark
    with the tail of its stderr (a missing package on a fresh machine, say), not a silent wait."""
    import httpx

    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            r = httpx.get(url) if body is None else httpx.post(url, content=body)
            if r.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    log.seek(0)
    tail = log.read().decode(errors="replace")[-3000:]
    state = f"exited with {proc.returncode}" if proc.poll() is not None else f"did not answer in {timeout:.0f} s"
    raise SystemExit(f"{url}: the server {state}; its stderr ends:\n{tail}")


def write_markdown(r: dict, path: Path) -> None:
    lines = [f"# Server benchmark ({r['device']}, {r['threads']} torch thread(s), {r['cores']} cores shared, {r['cpu']})", "",
             f"Command: `{r['command']}`; {RECIPE}, build seed {r.get('build_seed')}: "
             f"row gate {r['atpatch']['row_gate']}, layers "
             f"{r['atpatch']['layers']}, τ per layer {r['atpatch']['layer_thresholds']}.", "",
             f"Load average before/after (other jobs on the machine): {r['load_average_before']} / {r['load_average_after']}", "",
             "| configuration | p50 ms | p99 ms | throughput req/s | errors |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, v in r["bare"].items():
        lines.append(f"| bare model call, repair {name} (in-process, batch 1) | {v['p50_ms']} | {v['p99_ms']} | {v['throughput_rps']} | 0 |")
    for name, v in r["paced"].items():
        lines.append(f"| bare model call, paced at the server's c1 rate, repair {name} | {v['p50_ms']} | {v['p99_ms']} | {v['throughput_rps']} | 0 |")
    for name, v in r["minimal"].items():
        lines.append(f"| minimal ASGI reference {name} | {v['p50_ms']} | {v['p99_ms']} | {v['throughput_rps']} | {v['errors']} |")
    for name, v in r["server"].items():
        lines.append(f"| server {name} | {v['p50_ms']} | {v['p99_ms']} | {v['throughput_rps']} | {v['errors']} |")
    lines += ["", "Server overhead at concurrency 1 (server p50 − bare p50, ms): "
              + ", ".join(f"{k} {v}" for k, v in r["overhead_c1_p50_ms"].items()) + " (target ≤ 2 ms).", "",
              "The same for the minimal ASGI reference (`bench/minimal_server.py`: JSON, base64, PNG decode, "
              "the same forward and response JSON under the same uvicorn, nothing else: what the socket "
              "round trip, wake-ups and cold caches cost on this machine): "
              + ", ".join(f"{k} {v}" for k, v in r["minimal_overhead_c1_p50_ms"].items())
              + "; the service's own share is the difference.", "",
              "Over the paced bare call (the same call made once per server round trip, the core idle in "
              "between, as the server's model thread sees it; a tight loop keeps caches warm that a "
              "request-by-request server cannot): server "
              + ", ".join(f"{k} {v}" for k, v in r["overhead_over_paced_c1_p50_ms"].items())
              + "; minimal reference "
              + ", ".join(f"{k} {v}" for k, v in r["minimal_overhead_over_paced_c1_p50_ms"].items()) + ".", "",
              "Server CPU per request − bare CPU per call at concurrency 1 (ms): "
              + ", ".join(f"{k} {v}" for k, v in r["overhead_c1_cpu_ms"].items()) + ".", "",
              "Mean time per request inside the server at concurrency 1, by stage (its own histogram, ms): "
              + ", ".join(f"{k} {v}" for k, v in r["server_side_c1_mean_ms"].items())
              + " (total − model = the server's own work per request; the rest of the round trip is "
              "the HTTP client, the socket and the kernel scheduler).", ""]
    path.write_text("\n".join(lines))


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ([f"bare {k}" for k in r["bare"]] + [f"paced bare {k}" for k in r["paced"]]
             + [f"minimal {k}" for k in r["minimal"]] + [f"server {k}" for k in r["server"]])
    rows = [*r["bare"].values(), *r["paced"].values(), *r["minimal"].values(), *r["server"].values()]
    fig, ax = plt.subplots(figsize=(10, 4))
    xs = range(len(names))
    ax.bar([i - 0.2 for i in xs], [v["p50_ms"] for v in rows], 0.4, label="p50")
    ax.bar([i + 0.2 for i in xs], [v["p99_ms"] for v in rows], 0.4, label="p99")
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"/predict latency, {r['device']}, {r['threads']} thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
