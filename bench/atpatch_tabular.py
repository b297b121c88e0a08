"""AtPatch on the tabular zoo models (fairness): build, then accuracy and UF off/on per attribute.

    .venv/bin/python bench/atpatch_tabular.py --bundle /work/zoo-runs/adult-ft --protected race,sex,age \
        [--epochs 50] [--rows N]   (N test rows; default 0: all of them)
Appends to bench/results/atpatch_tabular.json (one entry per bundle and protected set) and
rewrites atpatch_tabular.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offline.atpatch_build import build_detector, fit_fairness_prior  # noqa: E402
from offline.datasets import load_dataset  # noqa: E402
from repair.atpatch import benign as benign_io  # noqa: E402
from repair.atpatch.protected_prior import ProtectedPrior, combination_index  # noqa: E402
from repair.atpatch.redistribution import VARIANTS  # noqa: E402
from repair.atpatch.runtime import AtPatch, CounterfactualGate, PatchedModel  # noqa: E402
from repair.bundle import copy_bundle  # noqa: E402
from repair.metrics import accuracy, unfairness  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def shares_prior(gate: CounterfactualGate, like: ProtectedPrior, x_train: torch.Tensor) -> ProtectedPrior:
    """A prior that ignores the row: every combination weighted by its share of the training rows
    (the average by shares, for comparison with ``P(a | x_o)``; not served)."""
    share = torch.bincount(combination_index(x_train, gate.columns, gate.combos), minlength=len(gate.combos))
    return ProtectedPrior(torch.zeros_like(like.weight), share.float().clamp(min=0.5).log(), like.numeric,
                          like.categorical, like.cardinalities, gate.columns, gate.combos)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--protected", required=True)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--rows", type=int, default=0, help="test rows for accuracy / UF (0: all)")
    ap.add_argument("--work", default="/tmp/atpatch-tabular")
    args = ap.parse_args()
    torch.set_num_threads(1)
    src = Path(args.bundle)
    bundle = Path(args.work) / src.name
    shutil.rmtree(bundle, ignore_errors=True)
    copy_bundle(src, bundle)
    t = time.perf_counter()
    v = build_detector(bundle, protected=args.protected.split(","), epochs=args.epochs, progress=False)
    build_s = time.perf_counter() - t
    meta = v.manifest["atpatch"]
    model = v.build_model()
    data = load_dataset(v.manifest["dataset"]["name"])
    x, y = (data.x_test[: args.rows], data.y_test[: args.rows]) if args.rows else (data.x_test, data.y_test)
    probe = AtPatch.from_version(v, model)
    det = probe.detector
    probe.remove()
    benign = benign_io.from_tensors(v.tensors("benign"), det.n_layers)
    rows = {"off": {"accuracy": round(accuracy(model, x, y), 4),
                    "uf": {n: round(unfairness(model, x, p["column"], p["values"]), 4)
                           for n, p in meta["protected"].items()}}}
    # Both variants on every layer and every row (the comparison the issue asks for), then what
    # is served: the build's variant on its layers, on the rows the protected values decide.
    patches = {f"{variant}, all layers, every row": lambda variant=variant: AtPatch(
                   model, det, benign, threshold=meta["threshold"], variant=variant) for variant in VARIANTS}
    answer = meta["fairness_answer"]["chosen"]
    patches[f"served: {answer}, layers {meta['layers']}, gated rows"] = lambda: AtPatch.from_version(v, model)
    # Both answers for the gated rows (``fairness_answer``), the prior refitted as the build fits it,
    # and the average by the combinations' training shares instead of P(a | x_o).
    gate = CounterfactualGate.from_protected(meta["protected"])
    prior, _ = fit_fairness_prior(model, gate, data.x_train, v.manifest["provenance"]["seed"])
    answers = {"masked patch, gated rows, its logit shift": meta["logit_shift"].get("shift"),
               "masked patch, gated rows, no logit shift": None,
               "counterfactual average by P(a given x_o), gated rows": prior,
               "not served: average by the combinations' training shares, gated rows":
                   shares_prior(gate, prior, data.x_train)}
    for name, how in answers.items():
        def make(how=how):
            a = AtPatch.from_version(v, model)
            a.gate = CounterfactualGate.from_protected(
                meta["protected"], **({"prior": how} if isinstance(how, ProtectedPrior) else {"logit_shift": how}))
            return a
        patches[name] = make
    for name, make in patches.items():
        a = make()
        net = PatchedModel(a)
        rows[name] = {"accuracy": round(accuracy(net, x, y), 4),
                      "uf": {n: round(unfairness(net, x, p["column"], p["values"]), 4)
                             for n, p in meta["protected"].items()},
                      "patch_rate": round(a(x).patched.float().mean().item(), 4)}
        a.remove()
    command = "python bench/atpatch_tabular.py " + " ".join(sys.argv[1:])
    entry = {"command": command, "bundle": src.name, "protected": args.protected, "build_seconds": round(build_s, 1), "test_rows": len(x),
             "chosen_variant": meta["variants"], "variant_selection": meta["variant_selection"],
             "layer_selection": meta["layer_selection"],
             "detector_metrics": meta["detector_metrics"],
             "detector_metrics_ungated": meta.get("detector_metrics_ungated"), "held_out": meta["held_out"],
             "logit_shift": meta.get("logit_shift"), "fairness_answer": meta.get("fairness_answer"),
             "debugging_set": meta["debugging_set"],
             "results": rows}
    path = OUT / "atpatch_tabular.json"
    all_runs = json.loads(path.read_text()) if path.exists() else []
    # one entry per (model, protected set): a Detector for all attributes at once and one per attribute
    all_runs = [r for r in all_runs if (r["bundle"], r["protected"]) != (src.name, args.protected)] + [entry]
    path.write_text(json.dumps(all_runs, indent=1))
    lines = ["# AtPatch on tabular zoo models (fairness)", ""]
    for r in all_runs:
        lines += [f"## {r['bundle']}, protected: {r['protected']}", "", f"Command: `{r['command']}`; build {r['build_seconds']} s; "
                  f"chosen variant {r['chosen_variant']}; {r.get('test_rows', 2000)} test rows", "", "| | accuracy | UF | patch rate |", "|---|---|---|---|"]
        for k, res in r["results"].items():
            lines.append(f"| {k} | {res['accuracy']} | {res['uf']} | {res.get('patch_rate', '')} |")
        lines += ["", f"Detector (held-out debugging maps, strict), on the rows the gate lets through (served): "
                      f"{r['detector_metrics']}", "",
                  f"The same on every row (the Detector alone): {r.get('detector_metrics_ungated')}", ""]
        if r.get("logit_shift"):
            lines += [f"Logit shift fitted for the masked patch's rows (`fit_logit_shift`): {r['logit_shift']}", ""]
        if r.get("fairness_answer"):
            lines += [f"The gated rows' answer (`fairness_answer`): {r['fairness_answer']}", ""]
    (OUT / "atpatch_tabular.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
