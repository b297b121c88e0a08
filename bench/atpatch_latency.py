"""AtPatch added latency on one model in one run (issue 3): batch 1 and 64, CPU (and CUDA if present).

Variants, timed round-robin so load on a shared machine hits all alike:
  fused     the model as trained (timm fused scaled_dot_product_attention; no maps visible)
  eager     the same model with fused_attn=False (what AtPatch must hook), no hooks
  off       AtPatch installed, mode "off" (hooks inactive)
  on-clean  mode "on", inputs the Detector does not flag (detect only: the unpatched request)
  on-patch  mode "on", triggered inputs that are flagged (detect + Γ)
and the same with the ``TargetClassGate`` of ``atpatch build --target-gate``:
  gated-clean    unflagged clean inputs (one pass, as on-clean)
  gated-flagged  clean inputs the Detector flags but the bare model does not answer with the
                 target (one pass, Γ skipped)
  gated-patch    triggered inputs (a detecting pass, then the patched pass)
and on the CPU, AtPatch with the Detector and Γ as torch ops instead of the compiled kernels
(``repair.atpatch.cpu_kernel``; on a twin model sharing the weights):
  ops-clean, ops-patch   as on-clean and on-patch

    .venv/bin/python bench/atpatch_latency.py --bundle BUNDLE_WITH_DETECTOR [--reps 200] [--device cpu|cuda]
Writes bench/results/atpatch_latency.{json,md,png} (CPU) or atpatch_latency_cuda.* (``--device cuda``).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_name  # noqa: E402  (bench/, this script's directory)

from offline.datasets import load_dataset  # noqa: E402
from offline.defects import Trigger  # noqa: E402
from repair.atpatch.runtime import AtPatch, TargetClassGate  # noqa: E402
from repair.attention import AttentionAccess  # noqa: E402
from repair.bundle import Bundle  # noqa: E402
from repair.cuda_graphs import GraphedForward  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
BLOCKS = 5  # the rounds are also reported in this many consecutive blocks (the machine drifts)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(bundle: str, reps: int, device: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    device = torch.device(device)
    version = Bundle(bundle).version()
    model = version.build_model(device)
    atp = AtPatch.from_version(version, model)
    # Baselines as modules of their own without hooks (removing and reinstalling AtPatch's around
    # each call would be timed with them, ~30 µs at batch 1) that share the hooked model's weight
    # tensors: separate copies would be timed with a colder cache (measured: +10 to +17 % at batch 1).
    fused_model, eager_model = (_sharing_weights(version, model) for _ in range(2))
    atp_ops = (AtPatch.from_version(version, _sharing_weights(version, model), cpu_kernel=False)
               if device.type == "cpu" else None)
    for attn in AttentionAccess.for_model(eager_model).modules:
        attn.fused_attn = False   # what AtPatch hooks: the eager attention
    data = load_dataset(version.manifest["dataset"]["name"])
    trig = Trigger.from_tensors(version.tensors("defect"))
    target = version.manifest["defect"]["target_class"]
    x_clean = data.x_test.to(device)
    x_bad = trig.apply(data.x_test[data.y_test != target]).to(device)
    on = atp(x_clean, "on")
    clean_ok = x_clean[~on.patched]
    bad_ok = x_bad[atp(x_bad, "on").patched]
    gate = TargetClassGate(version.manifest["atpatch"]["inversion"]["target"])
    false_flags = x_clean[on.patched & (atp(x_clean, "off").logits.argmax(-1) != gate.target)]
    results, inputs = {}, {}
    for bs in (1, 64):
        xc, xb = clean_ok[:bs], bad_ok[:bs]
        if len(xc) < bs or len(xb) < bs or len(false_flags) == 0:
            continue
        xf = false_flags[torch.arange(bs) % len(false_flags)]  # few clean images are flagged: repeat them

        def fused(x=xc):
            return fused_model(x)

        def eager(x=xc):
            return eager_model(x)

        def gated(x):
            atp.gate = gate
            try:
                atp(x, "on")
            finally:
                atp.gate = None

        def without_margin(x):  # the build's top margin (``flag_columns``) left out: what it costs
            margin, atp.top_margin = atp.top_margin, None
            try:
                atp(x, "on")
            finally:
                atp.top_margin = margin

        runs = {"fused": fused, "eager": eager, "off": lambda: atp(xc, "off"),
                **({"ops-clean": lambda: atp_ops(xc, "on"), "ops-patch": lambda: atp_ops(xb, "on")}
                   if atp_ops is not None else {}),
                "on-clean": lambda: atp(xc, "on"), "on-patch": lambda: atp(xb, "on"),
                "gated-clean": lambda: gated(xc), "gated-flagged": lambda: gated(xf),
                "gated-patch": lambda: gated(xb),
                **({"on-patch-no-margin": lambda: without_margin(xb)} if atp.top_margin is not None else {})}
        with torch.inference_mode():  # every variant, as the server runs its passes (``Served._pass``)
            times = _timings(runs, reps, device)
        med = _medians_ms(times)
        results[f"batch{bs}"] = {
            "median_ms": {k: round(v, 4) for k, v in med.items()},
            "unpatched_overhead_vs_eager": round(med["on-clean"] / med["eager"] - 1, 4),
            "patched_overhead_vs_eager": round(med["on-patch"] / med["eager"] - 1, 4),
            "unpatched_overhead_by_block": _block_overheads(times, "on-clean"),
            "patched_overhead_by_block": _block_overheads(times, "on-patch"),
            "gated_overhead_vs_eager": {k: round(med[f"gated-{k}"] / med["eager"] - 1, 4)
                                        for k in ("clean", "flagged", "patch")},
            "eager_vs_fused": round(med["eager"] / med["fused"] - 1, 4),
        }
        if "on-patch-no-margin" in med:
            results[f"batch{bs}"]["top_margin_cost_patched"] = round(med["on-patch"] / med["on-patch-no-margin"] - 1, 4)
        if atp_ops is not None:
            results[f"batch{bs}"]["torch_ops_overhead_vs_eager"] = {
                k: round(med[f"ops-{k}"] / med["eager"] - 1, 4) for k in ("clean", "patch")}
        inputs[bs] = (xc, xb, fused, eager)
    if device.type == "cuda":
        graphed_runs(atp, inputs, results, reps, device)
    atp.remove()
    return {"device": str(device), "threads": threads, "reps": reps, "bundle": bundle,
            "version": version.id, "results": results}


def _sharing_weights(version, model: torch.nn.Module) -> torch.nn.Module:
    """A second instance of the version's architecture whose parameters are ``model``'s tensors."""
    twin = version.build_model("meta")
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.eval()


def _timings(runs: dict, reps: int, device) -> dict[str, list[float]]:
    """Seconds per call of each run, after 10 warm-up rounds, every run once per round in a new
    random order. Why not a fixed order: a call is timed with the caches and allocator that the
    call before it left, so in a fixed order each run has its own predecessor (the eager forward
    came after the fused one, the unpatched request after a patched one with torch ops). Measured
    on one build and machine within minutes (Intel Xeon, batch 1): the unpatched request +12.5 %
    over the eager forward in that fixed order, +8.6 % shuffled (``atpatch_latency_xeon_d7e8019.md``)."""
    times = {k: [] for k in runs}
    for _ in range(10):
        for f in runs.values():
            f()
    order, shuffle = list(runs), random.Random(0).shuffle
    for _ in range(reps):
        shuffle(order)
        for k in order:
            f = runs[k]
            _sync(device)
            t = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def _medians_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _block_overheads(times: dict[str, list[float]], variant: str, blocks: int = BLOCKS) -> list[float]:
    """``variant`` over the eager forward (ratio of medians − 1) in each of ``blocks`` consecutive
    slices of the rounds: how far the overhead swings with the machine within one run."""
    size = len(times["eager"]) // blocks
    cut = [slice(i * size, (i + 1) * size) for i in range(blocks)]
    return [round(statistics.median(times[variant][c]) / statistics.median(times["eager"][c]) - 1, 4)
            for c in cut]


def graphed_runs(atp: AtPatch, inputs: dict, results: dict, reps: int, device) -> None:
    """GPU: each forward replayed as one CUDA graph, the AtPatch hook step compiled, as the
    server runs them (``server.runtime.Served.run``). After the eager runs: compiling changes
    the hook for every later call."""
    if not atp.compile_hot_path(next(iter(inputs.values()))[0]):
        sys.exit("compiling the AtPatch hook step failed (see the warning above)")
    for bs, (xc, xb, fused, eager) in inputs.items():
        def patch_fields(x):
            r = atp(x, "on")
            return r.logits, r.patched, r.flagged
        g_fused = GraphedForward(lambda x: (fused(x),), bs)
        g_eager = GraphedForward(lambda x: (eager(x),), bs)
        g_off = GraphedForward(lambda x: (atp(x, "off").logits,), bs)
        g_on = GraphedForward(patch_fields, bs)
        same = all(torch.equal(a, b) for x in (xc, xb) for a, b in zip(g_on(x)[1:], patch_fields(x)[1:]))
        runs = {"fused": lambda: g_fused(xc), "eager": lambda: g_eager(xc), "off": lambda: g_off(xc),
                "on-clean": lambda: g_on(xc), "on-patch": lambda: g_on(xb)}
        margin = atp.top_margin
        if margin is not None:  # what the build's top margin (``flag_columns``) costs: a graph captured without it
            atp.top_margin = None
            g_plain = GraphedForward(patch_fields, bs)
            g_plain(xc)  # captured now, without the margin
            atp.top_margin = margin
            runs["on-clean-no-margin"] = lambda: g_plain(xc)
        med = _medians_ms(_timings(runs, reps, device))
        eager_ms = results[f"batch{bs}"]["median_ms"]["eager"]
        results[f"batch{bs}"]["cuda_graphs"] = {
            "median_ms": {k: round(v, 4) for k, v in med.items()},
            "flags_match_eager_hooks": same,
            "unpatched_overhead_vs_graphed_eager": round(med["on-clean"] / med["eager"] - 1, 4),
            "patched_overhead_vs_graphed_eager": round(med["on-patch"] / med["eager"] - 1, 4),
            "unpatched_vs_plain_eager": round(med["on-clean"] / eager_ms - 1, 4),
            "patched_vs_plain_eager": round(med["on-patch"] / eager_ms - 1, 4),
        }
        if margin is not None:
            results[f"batch{bs}"]["cuda_graphs"]["top_margin_cost"] = round(
                med["on-clean"] / med["on-clean-no-margin"] - 1, 4)


PLOT_ORDER = ("fused", "eager", "off", "on-clean", "on-patch", "gated-clean", "gated-flagged", "gated-patch",
              "ops-clean", "ops-patch")


def _color(variant: str) -> str:
    """Baselines their own colours; unpatched requests yellow, patched red, flagged-but-kept purple."""
    base = {"fused": "#888", "eager": "#48c", "off": "#4a8"}
    if variant in base:
        return base[variant]
    return "#c44" if variant.endswith("patch") else "#a8c" if variant.endswith("flagged") else "#ca4"


def plot(run: dict, path: Path) -> None:
    """Median ms per variant and batch size; on CUDA a second row: the same forwards graphed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("median_ms", "")] + ([("cuda_graphs", "CUDA graphs, ")]
                                  if any("cuda_graphs" in r for r in run["results"].values()) else [])
    fig, axes = plt.subplots(len(rows), len(run["results"]), figsize=(10, 4 * len(rows)), squeeze=False)
    for row, (key, label) in zip(axes, rows):
        for ax, (name, r) in zip(row, run["results"].items()):
            medians = r[key] if key == "median_ms" else r[key]["median_ms"]
            names = [v for v in PLOT_ORDER if v in medians]
            ax.bar(names, [medians[v] for v in names], color=[_color(v) for v in names],
                   hatch=["//" if v.startswith("ops-") else "" for v in names])
            ax.set_title(f"{run['device']} {name}, {label}median of {run['reps']}")
            ax.set_ylabel("ms / request")
            plt.setp(ax.get_xticklabels(), rotation=35, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", help="output path without suffix (default bench/results/atpatch_latency[_cuda])")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    default_name = "atpatch_latency" + ("_cuda" if args.device == "cuda" else "")
    out = Path(args.out) if args.out else OUT / default_name
    runs = [bench(args.bundle, args.reps, args.device, args.threads)]
    command = "python bench/atpatch_latency.py " + " ".join(sys.argv[1:])
    out.parent.mkdir(parents=True, exist_ok=True)
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else cpu_name())
    out.with_suffix(".json").write_text(json.dumps({"command": command, "device_name": device_name,
                                                    "runs": runs}, indent=1))
    lines = ["# AtPatch added latency", "", f"Command: `{command}`", "", f"Device: {device_name}", "",
             "| device | batch | fused ms | eager ms | off ms | on, unpatched ms | on, patched ms | "
             "unpatched vs eager | patched vs eager | eager vs fused |", "|" + "---|" * 10]
    gated = ["", "With the target-class gate (`atpatch build --target-gate`), over the eager forward:", "",
             "| device | batch | unflagged clean | flagged clean, not answered with the target (Γ skipped) | "
             "triggered (two passes) |", "|" + "---|" * 5]
    for run in runs:
        for name, r in run["results"].items():
            m, g = r["median_ms"], r["gated_overhead_vs_eager"]
            lines.append(f"| {run['device']} | {name[5:]} | {m['fused']} | {m['eager']} | {m['off']} | "
                         f"{m['on-clean']} | {m['on-patch']} | {r['unpatched_overhead_vs_eager']:+.1%} | "
                         f"{r['patched_overhead_vs_eager']:+.1%} | {r['eager_vs_fused']:+.1%} |")
            gated.append(f"| {run['device']} | {name[5:]} | {g['clean']:+.1%} | {g['flagged']:+.1%} | "
                         f"{g['patch']:+.1%} |")
    lines += ["", f"Overhead over the eager forward in each of {BLOCKS} consecutive blocks of the rounds "
              "(the spread is the machine's, within this one run):", "",
              "| device | batch | unpatched by block | patched by block |", "|---|---|---|---|"]
    for run in runs:
        for name, r in run["results"].items():
            lines.append(f"| {run['device']} | {name[5:]} | "
                         + " | ".join(" ".join(f"{v:+.1%}" for v in r[f"{kind}_overhead_by_block"])
                                      for kind in ("unpatched", "patched")) + " |")
    lines += gated
    costs = [(run["device"], name[5:], r["median_ms"]["on-patch-no-margin"], r["top_margin_cost_patched"])
             for run in runs for name, r in run["results"].items() if "top_margin_cost_patched" in r]
    if costs:
        lines += ["", "The build's top margin (`flag_columns`: a column flagged only within it of its map's highest) "
                  "on the patched request, against the same request without it:", "",
                  "| device | batch | patched without the margin ms | the margin's cost |", "|---|---|---|---|"]
        lines += [f"| {d} | {b} | {ms} | {c:+.1%} |" for d, b, ms, c in costs]
    ops = [(run["device"], name[5:], r["torch_ops_overhead_vs_eager"]) for run in runs
           for name, r in run["results"].items() if "torch_ops_overhead_vs_eager" in r]
    if ops:
        lines += ["", "The CPU Detector and Γ as torch ops (`AtPatch(cpu_kernel=False)`, before the compiled kernels) "
                  "against the compiled kernels (the table above), over the same eager forward:", "",
                  "| device | batch | unpatched, kernel | unpatched, torch ops | patched, kernel | patched, torch ops |",
                  "|---|---|---|---|---|---|"]
        for run in runs:
            for name, r in run["results"].items():
                o = r.get("torch_ops_overhead_vs_eager")
                if o is not None:
                    lines.append(f"| {run['device']} | {name[5:]} | {r['unpatched_overhead_vs_eager']:+.1%} | "
                                 f"{o['clean']:+.1%} | {r['patched_overhead_vs_eager']:+.1%} | {o['patch']:+.1%} |")
    graphed = [(run["device"], name[5:], r["cuda_graphs"]) for run in runs
               for name, r in run["results"].items() if "cuda_graphs" in r]
    if graphed:
        lines += ["", "Each forward replayed as one CUDA graph, the AtPatch hook step compiled (as the server "
                  "runs on a GPU):", "",
                  "| device | batch | fused ms | eager ms | off ms | on, unpatched ms | on, patched ms | "
                  "unpatched vs graphed eager | patched vs graphed eager | unpatched vs plain eager | "
                  "patched vs plain eager | flags as eager hooks |", "|" + "---|" * 12]
        for device, batch, g in graphed:
            m = g["median_ms"]
            lines.append(f"| {device} | {batch} | {m['fused']} | {m['eager']} | {m['off']} | {m['on-clean']} | "
                         f"{m['on-patch']} | {g['unpatched_overhead_vs_graphed_eager']:+.1%} | "
                         f"{g['patched_overhead_vs_graphed_eager']:+.1%} | {g['unpatched_vs_plain_eager']:+.1%} | "
                         f"{g['patched_vs_plain_eager']:+.1%} | {g['flags_match_eager_hooks']} |")
        costs = [(batch, g["top_margin_cost"], g["median_ms"]["on-clean-no-margin"])
                 for _, batch, g in graphed if "top_margin_cost" in g]
        if costs:
            lines += ["", "The build's top margin (`flag_columns`: a column flagged only within it of its map's "
                      "highest), against the same graphed unpatched request captured without it:", "",
                      "| batch | without the margin ms | the margin's cost |", "|---|---|---|"]
            lines += [f"| {batch} | {ms} | {cost:+.1%} |" for batch, cost, ms in costs]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(runs[0], out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
