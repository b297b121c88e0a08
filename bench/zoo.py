"""Zoo benchmark: Fashion-MNIST ViT backdoors (BadNets, Trojan, Hidden) and the tabular
FT-Transformers (Adult, COMPAS): clean accuracy, ASR / UF and training time on this machine.

    .venv/bin/python bench/zoo.py --part fashion --out-dir /work/zoo-runs
    .venv/bin/python bench/zoo.py --part tabular --out-dir /work/zoo-runs
    .venv/bin/python bench/zoo.py --part fashion --target-class 1 --threads 2   # *-target1

Each part merges its rows into ``bench/results/zoo.json`` and rewrites ``zoo.md``; the trained
bundles stay in ``--out-dir`` (outside the repository) for reuse by the repair benchmarks.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402  (bench/, this script's directory)
from offline.zoo import train_bundle  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# The smallest ViT found to reach the floors in the time we had: 16 tokens of 7x7 pixels.
FASHION_ARCH = dict(patch_size=7, embed_dim=96, depth=4, num_heads=4, mlp_ratio=2.0)
FASHION = dict(max_train=30000, epochs=8, batch_size=128, lr=2e-3, poison_rate=0.1, target_class=0)
RUNS = {
    "fashion": [("fashion-vit-badnets", dict(dataset="fashion-mnist", arch="vit", defect="badnets")),
                ("fashion-vit-hidden", dict(dataset="fashion-mnist", arch="vit", defect="hidden")),
                ("fashion-vit-trojan", dict(dataset="fashion-mnist", arch="vit", defect="trojan"))],
    "tabular": [("adult-ft", dict(dataset="adult", arch="ft-transformer")),
                ("compas-ft", dict(dataset="compas", arch="ft-transformer"))],
}
FLOORS = {"fashion": {"accuracy": 0.85, "asr": 0.95}, "adult": {"accuracy": 0.84},
          "compas": {"accuracy": 0.66}}


def run(part: str, out_dir: Path, threads: int, defects: list[str] | None = None,
        target_class: int | None = None) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for name, options in RUNS[part]:
        if defects and options.get("defect") not in defects:
            continue
        if part == "fashion":
            options = {**options, **FASHION, "arch_options": FASHION_ARCH}
            if target_class is not None and target_class != FASHION["target_class"]:
                # T-shirt (0) is the class the others are most often mistaken for (shirts
                # answered "T-shirt"), a floor under ASR that no repair removes; a second
                # target measures the repair without it.
                options["target_class"] = target_class
                name = f"{name}-target{target_class}"
        out = out_dir / name
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        version = train_bundle(out, seed=0, progress=False, **options)
        m = version.manifest
        floors = FLOORS["fashion" if part == "fashion" else options["dataset"]]
        row = {"name": name, "bundle": str(out), "dataset": options["dataset"],
               "defect": m["defect"]["type"], "architecture": m["architecture"],
               "train_rows": m["dataset"]["train_rows"], "epochs": m["provenance"]["epochs"],
               "threads": threads, "cpu": cpu_name(),
               "metrics": m["metrics"], "train_seconds": m["provenance"]["train_seconds"],
               "total_seconds": round(time.perf_counter() - started, 1),
               "meets_floors": all(m["metrics"][k] >= v for k, v in floors.items()),
               "floors": floors}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def write(rows: list[dict], command: str) -> None:
    path = RESULTS / "zoo.json"
    old = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    names = {r["name"] for r in rows}
    runs = [r for r in old["runs"] if r["name"] not in names] + rows
    commands = {**old.get("commands", {}), **{r["name"]: command for r in rows}}
    result = {"machine": f"{os.cpu_count()} cores",
              "torch": torch.__version__, "commands": commands, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Zoo benchmark", "", f"Machine: {result['machine']}; torch {result['torch']}.", "",
             "Times are wall-clock seconds of training on the given torch threads. The rows without a "
             "`-target` suffix were trained while four other jobs shared the 2 cores (load average "
             "~10); the `-target1` rows, the same recipe, on an idle machine with a faster CPU "
             "(AMD EPYC, AVX-512). Accuracy and ASR are on the full test sets "
             "(10000 / 16281 / 1235 rows).", "",
             "| model | train rows | epochs | accuracy | ASR | UF | CPU | threads | train s | floors met |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        m = r["metrics"]
        uf = ", ".join(f"{k} {v:.3f}" for k, v in m.get("uf", {}).items()) or "-"
        asr = f"{m['asr']:.3f}" if "asr" in m else "-"
        lines.append(f"| {r['name']} | {r['train_rows']} | {r['epochs']} | {m['accuracy']:.4f} | {asr} "
                     f"| {uf} | {r.get('cpu', 'not recorded')} | {r.get('threads', 1)} | {r['train_seconds']} | {'yes' if r['meets_floors'] else 'NO'} |")
    lines += ["", "Commands:", ""] + [f"- `{n}`: `{c}`" for n, c in commands.items()]
    lines += ["", "Bundles (outside the repository, for reuse): " +
              ", ".join(f"`{r['bundle']}`" for r in runs)]
    (RESULTS / "zoo.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=sorted(RUNS), required=True)
    p.add_argument("--out-dir", default="/work/zoo-runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--defects", help="comma-separated subset of the part's defects (fashion: badnets,hidden,trojan)")
    p.add_argument("--target-class", type=int, help="fashion: the backdoor's target class (default 0)")
    a = p.parse_args()
    known = sorted(o["defect"] for _, o in RUNS[a.part] if "defect" in o)
    unknown = sorted(set(a.defects.split(",")) - set(known)) if a.defects else []
    if unknown:
        p.error(f"--defects {','.join(unknown)}: not among --part {a.part}'s ({', '.join(known) or 'none'})")
    if a.target_class is not None and a.part != "fashion":
        p.error("--target-class is for --part fashion (the tabular models have no backdoor)")
    rows = run(a.part, Path(a.out_dir), a.threads, a.defects.split(",") if a.defects else None,
               a.target_class)
    write(rows, "python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
