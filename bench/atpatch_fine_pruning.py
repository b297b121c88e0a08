"""Fine-Pruning (Liu et al. 2018), the baseline AtPatch's Table 2 compares with, on a vision zoo
model: prune the last block's dormant MLP neurons on clean data, fine-tune on the same clean data,
then accuracy and ASR on the test split. The clean set is as large as the one an AtPatch build uses
(inversion + debugging pairs: 2 x 600 training images).

    .venv/bin/python bench/atpatch_fine_pruning.py --bundle /tmp/atpatch-digits/zoo --name digits
Appends to bench/results/atpatch_fine_pruning.json and rewrites atpatch_fine_pruning.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offline.datasets import load_dataset  # noqa: E402
from offline.defects import Trigger  # noqa: E402
from offline.fine_pruning import fine_prune  # noqa: E402
from repair.bundle import Bundle  # noqa: E402
from repair.metrics import accuracy, attack_success_rate  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True, help="a backdoored vision zoo bundle")
    ap.add_argument("--name", required=True)
    ap.add_argument("--clean", type=int, default=1200, help="clean training images the defender has")
    ap.add_argument("--ratios", default="0.5,0.7,0.9", help="shares of the last MLP's neurons pruned")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    v = Bundle(args.bundle).version()
    model = v.build_model()
    data = load_dataset(v.manifest["dataset"]["name"])
    trig = Trigger.from_tensors(v.tensors("defect"))
    target = v.manifest["defect"]["target_class"]
    perm = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))[: args.clean]
    x, y = data.x_train[perm], data.y_train[perm]
    x_bad = trig.apply(data.x_test)

    def measure(net):
        return {"accuracy": round(accuracy(net, data.x_test, data.y_test), 4),
                "asr": round(attack_success_rate(net, x_bad, data.y_test, target), 4)}

    rows = {"unpatched": measure(model)}
    for ratio in (float(r) for r in args.ratios.split(",")):
        t = time.perf_counter()
        pruned = fine_prune(model, x, y, ratio=ratio, epochs=args.epochs)
        rows[f"fine-pruning {ratio:.0%}"] = {**measure(pruned), "seconds": round(time.perf_counter() - t, 1)}
    command = "python bench/atpatch_fine_pruning.py " + " ".join(sys.argv[1:])
    entry = {"name": args.name, "command": command, "clean_images": args.clean, "epochs": args.epochs,
             "results": rows}
    path = OUT / "atpatch_fine_pruning.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs = [r for r in runs if r["name"] != args.name] + [entry]
    path.write_text(json.dumps(runs, indent=1))
    lines = ["# Fine-Pruning baseline (AtPatch Table 2's comparison)", "",
             "Prune the lowest-activation share of the last block's MLP neurons (on the clean images), "
             "then fine-tune on them with the pruned neurons held at zero; test-split accuracy and ASR. "
             "Compare with `atpatch_<name>.md` for AtPatch on the same zoo model.", ""]
    for r in runs:
        lines += [f"## {r['name']}", "", f"Command: `{r['command']}` ({r['clean_images']} clean training "
                  f"images, {r['epochs']} fine-tuning epochs)", "", "| | accuracy | ASR | seconds |", "|---|---|---|---|"]
        lines += [f"| {k} | {res['accuracy']} | {res['asr']} | {res.get('seconds', '')} |" for k, res in r["results"].items()]
        lines.append("")
    (OUT / "atpatch_fine_pruning.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
