"""AtPatch answers a request the same on a GPU as on the CPU (issue 3: "per request, on GPU or CPU").

For each bundle, the same requests go through AtPatch three ways: on the CPU (as served there:
the compiled C++ kernels), on CUDA with the hook step as tensor ops (eager), and on CUDA with the
hook step torch.compiled (as the server runs it on a GPU). Requests: the test set, plus for a
vision model every test image with the recorded trigger, for a tabular model every test row with
each other value of each protected attribute (what UF is measured on). Reported per path against
the CPU: the share of requests with the same flags (every layer and column) and the same answer,
the largest logit difference, and the accuracy and defect metric (ASR or UF) each path gives.

    python3 bench/atpatch_devices.py --bundle B [--bundle B ...] [--out bench/results/atpatch_devices]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offline.datasets import ImageData, load_dataset  # noqa: E402
from offline.defects import Trigger  # noqa: E402
from repair.atpatch.runtime import AtPatch  # noqa: E402
from repair.bundle import Bundle  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "atpatch_devices"
CHUNK = 256  # requests per forward: one compiled step per batch size, so chunks keep it to two


def requests(version, data) -> tuple[dict[str, torch.Tensor], dict]:
    """Named input sets, and how to read the defect metric off their answers."""
    sets = {"test": data.x_test}
    if isinstance(data, ImageData):
        if version.has("defect"):
            sets["triggered"] = Trigger.from_tensors(version.tensors("defect")).apply(data.x_test)
        target = version.manifest["defect"]["target_class"] if version.has("defect") else None
        return sets, {"kind": "asr", "target": target}
    protected = version.manifest.get("atpatch", {}).get("protected") or {}
    for name, p in protected.items():
        for value in p["values"]:
            swapped = data.x_test.clone()
            swapped[:, p["column"]] = value
            sets[f"{name}={value:g}"] = swapped
    return sets, {"kind": "uf", "protected": protected}


def answer(atp: AtPatch, x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and flags (B, L, N) of ``x`` with AtPatch on, in chunks, back on the CPU."""
    logits, flags = [], []
    for i in range(0, len(x), CHUNK):
        r = atp(x[i:i + CHUNK].to(device), "on")
        logits.append(r.logits.float().cpu())
        flags.append(r.flagged.cpu())
    return torch.cat(logits), torch.cat(flags)


def defect_metric(answers: dict, y: torch.Tensor, x_test: torch.Tensor, how: dict) -> dict:
    pred = {k: logits.argmax(-1) for k, (logits, _) in answers.items()}
    if how["kind"] == "asr":
        if "triggered" not in pred:
            return {}
        others = y != how["target"]
        return {"asr": round((pred["triggered"][others] == how["target"]).float().mean().item(), 4)}
    uf = {}
    for name, p in how["protected"].items():
        changed = torch.zeros(len(y), dtype=torch.bool)
        for value in p["values"]:  # as repair.metrics.unfairness: another value changes the answer
            changed |= (x_test[:, p["column"]] != value) & (pred[f"{name}={value:g}"] != pred["test"])
        uf[f"uf_{name}"] = round(changed.float().mean().item(), 4)
    return uf


def compare(bundle: str) -> dict:
    version = Bundle(bundle).version()
    data = load_dataset(version.manifest["dataset"]["name"])
    sets, how = requests(version, data)
    paths = {}
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for path in ("cpu", "cuda eager", "cuda compiled"):
        device = cpu if path == "cpu" else cuda
        atp = AtPatch.from_version(version, version.build_model(device))
        try:
            if path == "cuda compiled" and not atp.compile_hot_path(sets["test"][:CHUNK].to(device)):
                raise SystemExit("the GPU hook step did not compile")
            paths[path] = {name: answer(atp, x, device) for name, x in sets.items()}
        finally:
            atp.remove()
    rows = []
    reference = paths["cpu"]
    for path, answers in paths.items():
        same_flags = torch.cat([(a[1] == reference[k][1]).flatten(1).all(1) for k, a in answers.items()])
        same_answer = torch.cat([a[0].argmax(-1) == reference[k][0].argmax(-1) for k, a in answers.items()])
        patched = torch.cat([a[1].flatten(1).any(1) for a in answers.values()])
        logit_diff = max((a[0] - reference[k][0]).abs().max() for k, a in answers.items())
        rows.append({"path": path, "requests": len(same_flags),
                     "same_flags": round(same_flags.float().mean().item(), 6),
                     "same_answer": round(same_answer.float().mean().item(), 6),
                     "max_logit_diff": float(logit_diff),
                     "patched": round(patched.float().mean().item(), 4),
                     "accuracy": round((answers["test"][0].argmax(-1) == data.y_test).float().mean().item(), 4),
                     **defect_metric(answers, data.y_test, data.x_test, how)})
    return {"bundle": bundle, "version": version.id, "arch": version.manifest["architecture"]["arch"],
            "dataset": version.manifest["dataset"]["name"], "paths": rows}


def write(results: list[dict], command: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "device": torch.cuda.get_device_name(),
                                                    "torch": torch.__version__, "bundles": results}, indent=1))
    lines = ["# AtPatch on the CPU and on a GPU: the same requests, the same answers?", "",
             f"Command: `{command}`", "", f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
             "Each path against the CPU path (its compiled kernels): share of requests with the same flags "
             "(every layer and column) and the same answer, the largest logit difference; the share of "
             "requests patched, test accuracy and the defect metric each path gives.", "",
             "| model | path | requests | same flags | same answer | max logit diff | patched | accuracy | defect |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        for p in r["paths"]:
            defect = ", ".join(f"{k} {v}" for k, v in p.items() if k.startswith(("asr", "uf_")))
            lines.append(f"| {r['dataset']} {r['arch']} | {p['path']} | {p['requests']} | {p['same_flags']} | "
                         f"{p['same_answer']} | {p['max_logit_diff']:.2e} | {p['patched']} | {p['accuracy']} | "
                         f"{defect} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", action="append", required=True, help="a bundle with an AtPatch detector")
    ap.add_argument("--out", default=str(OUT), help="output path without suffix")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark compares the CPU path with the GPU one")
    results = [compare(b) for b in a.bundle]
    write(results, "python3 bench/atpatch_devices.py " + " ".join(sys.argv[1:]), Path(a.out))
    print(Path(a.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
