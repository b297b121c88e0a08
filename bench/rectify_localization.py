"""Localization recall (issue 4, paper Table 10): Ĝ ranking vs editing every layer in turn.

For each (model, pair): rank the editable layers by ``Ĝ_l`` (§5.1; per-layer Captum passes, the
default, and the one-pass joint list), then edit every layer in turn with one rank-one edit
(n = 1, Eq. 1, 300 Adam steps) and rank the layers by ASR + OA drop on the test split. Recall@k: share of
cases whose best layer by editing is among the k layers ranked highest by ``Ĝ``.

    .venv/bin/python bench/rectify_localization.py --arch vit --trials 3   # rectify_localization.md
    .venv/bin/python bench/rectify_localization.py --arch resnet18 --trials 3 --threads 1
                                                  # → rectify_localization_resnet18.md
    .venv/bin/python bench/rectify_localization.py --arch vit|resnet18 --dataset fashion-mnist \
        --max-train 8000 --zoo-epochs 15 --trials 3 --threads 2
        # → rectify_localization_fashion-mnist.md, rectify_localization_fashion-mnist_resnet18.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rectify_common import CACHE, Setup, cached_zoo_bundle, write_results  # noqa: E402
from repair.editing.localization import locate  # noqa: E402
from repair.editing.rank_one import rank_one_edit  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", action="append", default=None)
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--max-train", type=int, help="the zoo model's training subset (as bench/rectify.py)")
    ap.add_argument("--zoo-epochs", type=int, help="epochs of the zoo model (default: the zoo's)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    archs = a.arch or ["vit"]
    cases = []
    for arch in archs:
        setup = Setup(cached_zoo_bundle(Path(a.cache), a.dataset, arch, visibility=0.5,
                                        max_train=a.max_train, epochs=a.zoo_epochs))
        layer_list = list(setup.layers.values())
        for trial in range(a.trials):
            clean, corrupt, labels = setup.pairs(1, trial)
            setup.reset()
            rankings = {joint: locate(setup.model, layer_list, setup.stats, clean, corrupt, labels,
                                      joint=joint) for joint in (False, True)}
            edited = {}
            for layer in layer_list:
                setup.reset()
                rank_one_edit(setup.model, layer, setup.stats[layer.name], clean, corrupt, steps=300,
                              optimizer="adam")  # as the committed results were measured
                ev = setup.evaluate()
                edited[layer.name] = {"asr": ev["asr"], "oa_drop": setup.base["oa"] - ev["oa"]}
            truth = sorted(edited, key=lambda n: edited[n]["asr"] + max(0.0, edited[n]["oa_drop"]))
            case = {"arch": arch, "trial": trial, "best_by_editing": truth[0], "editing": edited,
                    "truth_ranking": truth,
                    "per_layer": rankings[False].ranking,
                    "per_layer_completeness_error": rankings[False].completeness_error,
                    "joint": rankings[True].ranking,
                    "joint_completeness_error": rankings[True].completeness_error}
            cases.append(case)
            print(arch, trial, truth[:3], rankings[False].ranking[:3], rankings[True].ranking[:3],
                  flush=True)
    setup.reset()
    recall = {}
    for mode in ("per_layer", "joint"):
        for k in (1, 3, 5):
            hits = [c["best_by_editing"] in c[mode][:k] for c in cases]
            recall[f"{mode} top-{k}"] = sum(hits) / len(hits)
    command = " ".join(["python", "bench/rectify_localization.py", *sys.argv[1:]])
    md = ["# Layer localization recall (Ĝ_l vs editing each layer)", "",
          f"Command: `{command}` ({a.threads} CPU thread(s)). {len(cases)} cases ({a.dataset} "
          "Blend φ=0.5, one "
          "pair each). Ground truth: the layer whose single rank-one edit gives the lowest "
          "ASR + OA drop on the test split.", "",
          "| ranking | top-1 | top-3 | top-5 |", "| --- | --- | --- | --- |"]
    for mode in ("per_layer", "joint"):
        md.append(f"| {mode} | " + " | ".join(f"{100 * recall[f'{mode} top-{k}']:.0f} %"
                                              for k in (1, 3, 5)) + " |")
    md += ["", "Per case (best layer by editing, its ASR / OA drop and its place in the per-layer "
           "Ĝ ranking, 1 = top; Ĝ top-3 per-layer; Ĝ top-3 joint; completeness error per-layer / "
           "joint, relative to |f(x) − f(x̃)|):", ""]
    for c in cases:
        best = c["best_by_editing"]
        md.append(f"- {c['arch']} trial {c['trial']}: {best} (ASR {c['editing'][best]['asr']:.3f}, "
                  f"OA drop {100 * c['editing'][best]['oa_drop']:.2f} pt, Ĝ place "
                  f"{c['per_layer'].index(best) + 1}); {c['per_layer'][:3]}; {c['joint'][:3]}; "
                  f"{c['per_layer_completeness_error']:.3f} / {c['joint_completeness_error']:.3f}")
    name = "rectify_localization" + ("" if a.dataset == "digits" else f"_{a.dataset}") \
        + ("" if archs == ["vit"] else "_" + "_".join(archs))
    write_results(name, {"command": command, "recall": recall, "cases": cases},
                  "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
