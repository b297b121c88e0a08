"""Rectification benchmark (issue 4, paper Table 1/2): dynamic vs static vs fine-tuning.

On Blend φ=0.5 zoo models: for n = 1 (several trials, one pair each) and n = 20 pairs, overall
accuracy (OA, test split) and attack success rate (ASR, test split with the trigger) after
dynamic rectification (Algorithm 1 with the stressed and the transplanted pairs, the default,
and ``dynamic-paper`` without them: :mod:`repair.editing.dynamic`), static rectification (last
layer) and fine-tuning the last layer (§11), all with budget ε = 1 pt on a validation split of
the training data. The dynamic runs also report ASR at other trigger visibilities (Table 2
generalisation).

    .venv/bin/python bench/rectify.py --arch vit --cache /tmp/rect-bench
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline.finetune_baseline import finetune_last_layer  # noqa: E402
from offline.rectify import TRANSPLANT_SAMPLES, VALIDATION_SAMPLES  # noqa: E402
from rectify_common import CACHE, METHODS, PAPER_LOOP, Setup, cached_zoo_bundle, write_results  # noqa: E402
from repair.editing.dynamic import MIN_GAIN, STRESS, rectify  # noqa: E402

VISIBILITIES = (0.3, 0.7, 1.0)
# the training subset of the Fashion-MNIST runs (time on 1-2 CPU threads); other sizes name their files
FASHION_SUBSET = 8000


def run(setup: Setup, method: str, n: int, trial: int, budget: float, **dynamic) -> dict:
    """One method on one trial's pairs; ``dynamic``: options of the stressed loop only
    (``candidates``, ``min_gain``, ``hold_anchors``)."""
    setup.reset()
    clean, corrupt, labels = setup.pairs(n, trial)
    started = time.perf_counter()
    info = {}
    if method == "finetune":
        info = finetune_last_layer(setup.model, clean, corrupt, labels, setup.val_x, setup.val_y,
                                   budget=budget)
    else:
        out = rectify(setup.model, setup.layers, setup.stats, clean, corrupt, labels, setup.val_x,
                      setup.val_y, budget=budget, static=(method == "static"), progress=False,
                      anchors=setup.anchors, stress=None if method in PAPER_LOOP else STRESS,
                      transplant=None if method in PAPER_LOOP else setup.transplant,
                      **(dict(dynamic, confirm_x=setup.confirm_x, confirm_y=setup.confirm_y)
                         if method == "dynamic" else {}))
        info = {"layers": [e.layer for e in out.edits], "rounds": len(out.rounds),
                "round_preserve": [r.preserve for r in out.rounds],
                "completeness_error": [r.completeness_error for r in out.rounds],
                "round_gaps": [r.gap for r in out.rounds], "round_drops": [r.accuracy_drop for r in out.rounds],
                "round_confirm_drops": [r.confirm_drop for r in out.rounds]}
    seconds = time.perf_counter() - started
    res = setup.evaluate(VISIBILITIES if method.startswith("dynamic") else ())
    return {"method": method, "n": n, "trial": trial, "seconds": round(seconds, 2), **res,
            "oa_drop": setup.base["oa"] - res["oa"], **info}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, action="append", help="pair counts (default 1 and 20)")
    ap.add_argument("--max-train", type=int, help="train the zoo model on a random subset")
    ap.add_argument("--zoo-epochs", type=int, help="epochs of the zoo model (default: the zoo's)")
    ap.add_argument("--max-test", type=int, help="evaluate on the first test rows only")
    ap.add_argument("--validation", type=int, default=VALIDATION_SAMPLES,
                    help="training images (the last ones) on which the budget ε is checked")
    ap.add_argument("--large-trials", type=int, default=1, help="trials (pair sets) for n > 1")
    ap.add_argument("--candidates", type=int, default=1,
                    help="layers of Ĝ's top a dynamic round tries (rectify(candidates=...))")
    ap.add_argument("--min-gain", type=float, default=MIN_GAIN,
                    help="relative lowering of δ* a dynamic round must bring")
    ap.add_argument("--hold-anchors", action="store_true",
                    help="the dynamic loop holds the anchors in every round (rectify(hold_anchors=True))")
    ap.add_argument("--confirm", action="store_true",
                    help="the dynamic loop confirms each kept round on the --validation training "
                         "images before the validation split (rectify(confirm_x=...))")
    a = ap.parse_args()
    dynamic = {"candidates": a.candidates, "min_gain": a.min_gain, "hold_anchors": a.hold_anchors}
    torch.set_num_threads(a.threads)
    bundle = cached_zoo_bundle(Path(a.cache), a.dataset, a.arch, visibility=0.5, max_train=a.max_train,
                               epochs=a.zoo_epochs)
    setup = Setup(bundle, max_test=a.max_test, validation=a.validation, confirm=a.confirm)
    rows = []
    counts = a.n or [1, 20]
    for n, trials in ((n, a.trials if n == 1 else a.large_trials) for n in counts):
        for method in METHODS:
            for trial in range(trials):
                rows.append(run(setup, method, n, trial, a.budget, **dynamic))
                print(rows[-1], flush=True)
    summary = {}
    for n in counts:
        for method in METHODS:
            sel = [r for r in rows if r["n"] == n and r["method"] == method]
            summary[f"{method} n={n}"] = {k: sum(r[k] for r in sel) / len(sel)
                                          for k in sel[0] if k.startswith(("oa", "asr"))}
    command = " ".join(["python", "bench/rectify.py", *sys.argv[1:]])
    name = f"rectify_{a.dataset}_{a.arch}"
    if a.max_train not in (None, FASHION_SUBSET):  # the usual subset's files carry no suffix
        name += f"_train{a.max_train}"
    if a.validation != VALIDATION_SAMPLES:  # beside the default run's file, not over it
        name += f"_val{a.validation}"
    if a.candidates != 1:
        name += f"_candidates{a.candidates}"
    if a.hold_anchors:
        name += "_hold"
    if a.confirm:
        name += "_confirm"
    if a.n:  # a pair-count sweep, beside the default (1, 20) run
        name += "_n" + "-".join(map(str, counts))
    confirmed = (f" (the dynamic loop confirms each kept round on the {a.validation} before them)"
                 if a.confirm else "")
    md = [f"# Rectification, {a.dataset} {a.arch}, Blend φ=0.5 (target 0)", "",
          f"Command: `{command}` ({a.threads} CPU thread(s)). Zoo model trained on "
          f"{setup.version.manifest['dataset'].get('train_rows', 'all')} training images "
          f"for {setup.version.manifest['provenance'].get('epochs')} epochs"
          f"{f', evaluated on the first {a.max_test} test images' if a.max_test else ''}. "
          f"Base model: OA {setup.base['oa']:.4f}, "
          f"ASR {setup.base['asr']:.4f}; it answers "
          f"{setup.base['clean_to_target']:.4f} "
          "of the other classes' *clean* test images with the target, which plain ASR counts too "
          "(\"ASR, clean ≠ target\": only images whose clean answer is not the target). "
          "A repair also restores the triggered images' labels (\"OA, triggered\"); \"ASR, worst "
          "class\" is the ASR of whichever class the triggered images of other classes go to most, "
          "which stays high when an edit only moves the backdoor to another class. "
          f"Budget ε = {a.budget} on the last {a.validation} training images{confirmed}; "
          f"n=1 averaged over {a.trials} pair(s) (one per trial), each larger n over "
          f"{a.large_trials} set(s) of pairs. The dynamic loop (stressed pairs, "
          f"{TRANSPLANT_SAMPLES} transplanted pairs) tries "
          f"{a.candidates} of Ĝ's top layers per round, min_gain {a.min_gain}"
          f"{', the anchors held in every round' if a.hold_anchors else ''}; dynamic-paper is "
          "Algorithm 1 as published. OA drop in points of accuracy × 100.", "",
          "| method | OA | OA drop (pt) | ASR | ASR, clean ≠ target | OA, triggered | ASR, worst class "
          "| ASR φ=0.3 | ASR φ=0.7 | ASR φ=1.0 |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, s in summary.items():
        vis = [f"{s[f'asr@{p}']:.4f}" if f"asr@{p}" in s else "" for p in VISIBILITIES]
        md.append(f"| {key} | {s['oa']:.4f} | {100 * s['oa_drop']:.2f} | {s['asr']:.4f} | "
                  f"{s['asr_flip']:.4f} | {s['oa_triggered']:.4f} | {s['asr_worst']:.4f} | "
                  + " | ".join(vis) + " |")
    md += ["", "Per run (layers edited by the dynamic loop, seconds):", ""]
    md += [f"- {r['method']} n={r['n']} trial {r['trial']}: OA {r['oa']:.4f}, ASR {r['asr']:.4f}, "
           f"OA triggered {r['oa_triggered']:.4f}, worst class {r['worst_class']} "
           f"({r['asr_worst']:.4f}), {r.get('layers', r.get('layer'))}, {r['seconds']} s"
           for r in rows]
    if len(counts) >= 3:
        plot_pairs(summary, counts, Path(__file__).parent / "results" / f"{name}.png",
                   f"{a.dataset} {a.arch}, Blend φ=0.5: {a.trials} pair set(s) at n = 1, "
                   f"{a.large_trials} at larger n")
        md += ["", f"Plot: `{name}.png` (mean ASR and OA drop against n, per method)."]
    write_results(name, {"command": command, "base": setup.base, "summary": summary, "runs": rows},
                  "\n".join(md) + "\n")


def plot_pairs(summary: dict, counts: list[int], path: Path, title: str) -> None:
    """Mean ASR (the planted target and the worst class) and OA drop against the number of
    pairs, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("asr", 100, "ASR, target (%)"), ("asr_worst", 100, "ASR, worst class (%)"),
              ("oa_drop", 100, "OA drop (pt)"))
    for ax, (key, scale, label) in zip(axes, panels):
        for method in METHODS:
            ax.plot(counts, [scale * summary[f"{method} n={n}"][key] for n in counts], marker="o",
                    label=method)
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.set_xlabel("clean/corrupt pairs n")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(bottom=0)
        ax.axhline(1, color="grey", ls="--", lw=0.8)   # the n = 20 target
        ax.axhline(5, color="grey", ls=":", lw=0.8)    # the n = 1 target
    axes[-1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
