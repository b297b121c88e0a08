"""What a protected attribute is worth to accuracy: the zoo's FT-Transformer recipe trained with
the attribute and without it (held at one value in training and test rows, so the model is blind
to it and UF is 0), on the same seeds, whole test sets. A fairness repair that makes the answer
independent of the attribute (AtPatch's masked patch) can hardly keep more accuracy than a model
retrained blind to it; this is the yardstick for the issue's "≤ 0.2 pt" on each attribute.

    .venv/bin/python bench/fairness_blind_retrain.py [--seeds 0 1 2 3] [--threads 1]
Writes bench/results/fairness_blind_retrain.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offline.datasets import load_dataset  # noqa: E402
from offline.zoo import DEFAULT_EPOCHS, fit_tabular  # noqa: E402
from repair.metrics import accuracy  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
ATTRIBUTES = {"adult": ("race", "sex", "age"), "compas": ("race", "sex")}


def blinded(x: torch.Tensor, column: int, value: float) -> torch.Tensor:
    x = x.clone()
    x[:, column] = value
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, attributes in ATTRIBUTES.items():
        data = load_dataset(name)
        for seed in args.seeds:
            for attribute in ("none", *attributes):
                x_train, x_test = data.x_train, data.x_test
                if attribute != "none":
                    column = data.schema.index(attribute)
                    value = data.schema.protected_values(attribute)[0]
                    x_train, x_test = blinded(x_train, column, value), blinded(x_test, column, value)
                started = time.perf_counter()
                model, _ = fit_tabular(data, x_train, data.y_train, DEFAULT_EPOCHS[name], seed)
                rows.append({"dataset": name, "blind_to": attribute, "seed": seed,
                             "accuracy": round(accuracy(model, x_test, data.y_test), 4),
                             "test_rows": len(x_test), "seconds": round(time.perf_counter() - started, 1)})
                print(rows[-1], flush=True)

    command = "python bench/fairness_blind_retrain.py " + " ".join(sys.argv[1:])
    md = ["# Accuracy of FT-Transformers retrained blind to a protected attribute", "",
          f"Command: `{command}` ({args.threads} CPU thread(s)). The zoo's recipe (`offline.zoo.fit_tabular`, "
          "all training rows, the data set's default epochs), trained with the attribute and with it held at "
          "one value in training and test rows; accuracy on the whole test split. Drop: blind minus with, "
          "seed by seed.", "",
          "| data set | blind to | accuracy with it (per seed) | blind (per seed) | drop, mean (pt) "
          "| drop per seed (pt) |",
          "| --- | --- | --- | --- | --- | --- |"]
    summary = []
    for name, attributes in ATTRIBUTES.items():
        base = {r["seed"]: r["accuracy"] for r in rows if r["dataset"] == name and r["blind_to"] == "none"}
        for attribute in attributes:
            blind = {r["seed"]: r["accuracy"] for r in rows if r["dataset"] == name and r["blind_to"] == attribute}
            drops = [100 * (blind[s] - base[s]) for s in args.seeds]
            summary.append({"dataset": name, "blind_to": attribute, "mean_drop_pt": round(statistics.mean(drops), 2),
                            "drops_pt": [round(d, 2) for d in drops]})
            md.append(f"| {name} | {attribute} | {' / '.join(f'{base[s]:.4f}' for s in args.seeds)} | "
                      f"{' / '.join(f'{blind[s]:.4f}' for s in args.seeds)} | {statistics.mean(drops):+.2f} | "
                      f"{' / '.join(f'{d:+.2f}' for d in drops)} |")
    (OUT / "fairness_blind_retrain.json").write_text(json.dumps(
        {"command": command, "threads": args.threads, "runs": rows, "summary": summary}, indent=1))
    (OUT / "fairness_blind_retrain.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
