"""Spurious correlation (paper Table 4) and feature leakage (Table 5) on the digits ViT (or, with
``--arch resnet18``, ResNet-18; results in ``rectify_defects_resnet18.*``).

Spurious (zoo ``--defect spurious``: a white square on ``--spurious-rate`` of class
``--spurious-class``'s training images, labels kept). The zoo's default (50 % of class 0) is not
learned on digits: class 0 is recognised perfectly without the square (clean = spurious = 100 %
on the test split, nothing to shrink), so the benchmark uses class 8 (often confused) with the
square on 70 % of its images (clean 77 %, spurious 100 %). Pairs are class-8 training images
without / with the square: among those the model classifies correctly without the square (the
clean input must show the correct pathway), the n with the largest prediction gap. Reported on the test split:
overall accuracy, accuracy on the class's clean set and on the same images with the square (the
spurious set), their gap (spurious − clean), its shrink relative to the unrectified model, and
the share of other classes' images that the square alone turns into the class.

Leakage (zoo ``--defect leakage``, BlockDigits: the digit in one half, a fixed null block in the
other): pairs are a training image as served (corrupt) and the same with the null block blanked
(clean), among the images still classified right when blanked, largest prediction gap first.
Leakage measure: the share of Integrated-Gradients mass (|IG|, black baseline, 32 steps, true
label) that falls on the null-block half, mean over 120 test images (the paper's Table 5
quantity: attribution on the uninformative block). ``dynamic`` carries the pair's
corruption onto training images as `repair-proxy rectify` does by default, but every BlockDigits
training image already holds a null block, so what it fits is a second block or a digit on a
block, and leakage rises; ``dynamic-paper`` (the pairs alone, `--transplant 0 --stress 0`) is
the setting for this defect.

Fashion-MNIST (``--dataset fashion-mnist``, spurious only): the square on 70 % of the Shirt
class (6, the most confused one), trained on ``--max-train`` images; its 1000 test shirts measure
the gap in steps of 0.1 % (digits: 35 images, steps of 3 %). The budget is then checked on
``--validation`` 2000 images (a 500-image estimate of a drop has a standard deviation of about
1 pt there, twice the 0.5 pt budget).

    .venv/bin/python bench/rectify_defects.py [--arch resnet18] [--skip spurious]
    .venv/bin/python bench/rectify_defects.py --dataset fashion-mnist --skip leakage \
        --spurious-class 6 --max-train 8000 --zoo-epochs 15 --validation 2000 --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from captum.attr import IntegratedGradients

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline.defects import Trigger, block_images, block_positions  # noqa: E402
from offline.finetune_baseline import finetune_last_layer  # noqa: E402
from offline.rectify import ANCHOR_SAMPLES, VALIDATION_SAMPLES, training_images, transplant_images  # noqa: E402
from offline.zoo import bundle_test_data  # noqa: E402
from rectify_common import ARCH_NAMES, CACHE, cached_zoo_bundle, write_results  # noqa: E402
from repair.bundle import Bundle  # noqa: E402
from repair.editing.dynamic import STRESS, prediction_gap, rectify  # noqa: E402
from repair.editing.keystats import compute_keystats  # noqa: E402
from repair.editing.layers import editable_layers  # noqa: E402
from repair.metrics import accuracy, attack_success_rate  # noqa: E402

def _prepare(version):
    model = version.build_model()
    layers = editable_layers(model)
    x_train, y_train = training_images(version)
    stats = compute_keystats(model, list(layers.values()), x_train[:1024], progress=False)
    return model, layers, stats, x_train, y_train, {k: v.clone() for k, v in model.state_dict().items()}


def _methods(model, layers, stats, clean, corrupt, labels, val_x, val_y, weights, anchors, transplant):
    """Yield (method, info) with the model in that method's state; info says what was kept.
    ``anchors``: the clean inputs a retried round holds in place, ``transplant``: those the
    dynamic loop carries the pairs' corruption onto, as `repair-proxy rectify` does;
    ``dynamic-paper`` is Algorithm 1 on the pairs alone (no stressed or transplanted pairs)."""
    for method in ("base", "dynamic", "dynamic-paper", "static", "finetune"):
        model.load_state_dict(weights)
        info, started = {}, time.perf_counter()
        if method == "finetune":
            info = finetune_last_layer(model, clean, corrupt, labels, val_x, val_y, budget=0.005)
        elif method != "base":
            out = rectify(model, layers, stats, clean, corrupt, labels, val_x, val_y,
                          budget=0.005, static=method == "static", progress=False, anchors=anchors,
                          transplant=transplant if method == "dynamic" else None,
                          stress=None if method == "dynamic-paper" else STRESS)
            info = {"rounds": [{"layer": r.layer, "kept": r.kept, "gap": r.gap, "anchored": r.anchored,
                                "accuracy_drop": r.accuracy_drop} for r in out.rounds],
                    "seconds": round(time.perf_counter() - started, 1)}
        yield method, info


def spurious(rows, dataset: str, arch: str, cls: int, rate: float, validation: int, **zoo):
    version = Bundle(cached_zoo_bundle(CACHE, dataset, arch, "spurious", f"spurious-{cls}-{rate}",
                                       target_class=cls, poison_rate=rate, **zoo)).version()
    model, layers, stats, x_train, y_train, weights = _prepare(version)
    square = Trigger.from_tensors(version.tensors("defect"))
    x_test, y_test = bundle_test_data(version)
    pool = (y_train[:-validation] == cls).nonzero().flatten()
    with torch.no_grad():
        p_clean = model(x_train[pool]).softmax(-1)
        p_corrupt = model(square.apply(x_train[pool])).softmax(-1)
    # the clean counterpart must show the correct pathway (§4.1): keep images the model gets
    # right without the square, most square-dependent first (largest prediction gap)
    right = p_clean.argmax(-1) == cls
    gaps = 0.5 * (p_clean - p_corrupt).abs().sum(-1)
    order = pool[right][gaps[right].argsort(descending=True)]
    zero = y_test == cls
    for n in (1, 20):
        clean = x_train[order[:n]]
        corrupt, labels = square.apply(clean), y_train[order[:n]]
        for method, info in _methods(model, layers, stats, clean, corrupt, labels,
                                     x_train[-validation:], y_train[-validation:], weights,
                                     x_train[:ANCHOR_SAMPLES], transplant_images(x_train, validation)):
            acc_clean = accuracy(model, x_test[zero], y_test[zero])
            acc_spur = accuracy(model, square.apply(x_test[zero]), y_test[zero])
            rows.append({"defect": "spurious", "n": n, "method": method,
                         "oa": accuracy(model, x_test, y_test), "clean": acc_clean,
                         "spurious": acc_spur, "gap": acc_spur - acc_clean,
                         "pair_gap": prediction_gap(model, clean, corrupt),
                         "spurious_rate": attack_success_rate(model, square.apply(x_test), y_test, cls),
                         **info})
            print(rows[-1], flush=True)


def leakage_measure(model, x, y, half: torch.Tensor) -> float:
    """Share of |IG| on the null-block half (``half[i]``: True when the block is the top)."""
    ig = IntegratedGradients(model)
    attr = ig.attribute(x, baselines=torch.zeros_like(x), target=y, n_steps=32).abs()
    h = x.shape[2] // 2
    top, bottom = attr[:, :, :h].sum((1, 2, 3)), attr[:, :, h:].sum((1, 2, 3))
    null = torch.where(half, top, bottom)
    return float((null / (top + bottom).clamp_min(1e-12)).mean())


def leakage(rows, dataset: str, arch: str, validation: int, **zoo):
    version = Bundle(cached_zoo_bundle(CACHE, dataset, arch, "leakage", **zoo)).version()
    model, layers, stats, x_train, y_train, weights = _prepare(version)
    x_test, y_test = bundle_test_data(version)
    block_top = ~version.tensors("defect")["test_object_top"][: len(x_test)].bool()
    sub = slice(0, 120)
    d = version.manifest["defect"]
    obj_top = block_positions(len(y_train), d["position_seed"])
    h = x_train.shape[2] // 2
    blank = x_train.clone()
    blank[obj_top, :, h:] = 0   # object on top: blank the bottom (null block)
    blank[~obj_top, :, :h] = 0
    # as for the spurious pairs, the clean input must show the correct pathway: blanking the
    # null block is far from the training data (the ViT uses the block as a position cue:
    # 34 % of blanked training images are classified right), so keep the images still classified
    # right when blanked, the largest prediction gap first
    pool = torch.arange(len(x_train) - validation)
    with torch.no_grad():
        p_clean = model(blank[pool]).softmax(-1)
        p_corrupt = model(x_train[pool]).softmax(-1)
    right = p_clean.argmax(-1) == y_train[pool]
    gaps = 0.5 * (p_clean - p_corrupt).abs().sum(-1)
    order = pool[right][gaps[right].argsort(descending=True)]
    for n in (1, 20):
        idx = order[:n]
        clean, corrupt, labels = blank[idx], x_train[idx], y_train[idx]
        for method, info in _methods(model, layers, stats, clean, corrupt, labels,
                                     x_train[-validation:], y_train[-validation:], weights,
                                     x_train[:ANCHOR_SAMPLES], transplant_images(x_train, validation)):
            rows.append({"defect": "leakage", "n": n, "method": method,
                         "oa": accuracy(model, x_test, y_test),
                         "leakage": leakage_measure(model, x_test[sub], y_test[sub], block_top[sub]),
                         **info})
            print(rows[-1], flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spurious-class", type=int, default=8)
    ap.add_argument("--spurious-rate", type=float, default=0.7)
    ap.add_argument("--arch", choices=("vit", "resnet18"), default="vit")
    ap.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="digits")
    ap.add_argument("--max-train", type=int, help="train the zoo models on a random subset")
    ap.add_argument("--zoo-epochs", type=int, help="epochs of the zoo models (default: the zoo's)")
    ap.add_argument("--validation", type=int, default=VALIDATION_SAMPLES,
                    help="training images (the last ones) on which the budget is checked")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", choices=("spurious", "leakage"), action="append", default=[])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows, zoo = [], {"max_train": a.max_train, "epochs": a.zoo_epochs}
    if "spurious" not in a.skip:
        spurious(rows, a.dataset, a.arch, a.spurious_class, a.spurious_rate, a.validation, **zoo)
    if "leakage" not in a.skip:
        leakage(rows, a.dataset, a.arch, a.validation, **zoo)
    command = " ".join(["python", "bench/rectify_defects.py", *sys.argv[1:]])
    arch_name = ARCH_NAMES[a.arch]
    md = [f"# Spurious correlation and feature leakage, {a.dataset} {arch_name}", "", f"Command: `{command}` "
          f"({a.threads} CPU thread(s)). Budget ε = 0.5 pt on the validation split (the last "
          f"{a.validation} training images) for every method."]
    spur = [r for r in rows if r["defect"] == "spurious"]
    if spur:
        md += ["", f"## Spurious correlation (class {a.spurious_class}, white square on "
               f"{a.spurious_rate:.0%} of its training images)", "",
               "Gap shrink = 1 − |gap| / |gap of the unrectified model| (target ≥ 70 %; an "
               "overshoot below the clean accuracy counts against it).", "",
               f"| n | method | OA | clean | spurious | gap (spurious − clean) | gap shrink | "
               f"pattern → class {a.spurious_class} |",
               "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        base_gap = next((r["gap"] for r in spur if r["method"] == "base"), None)
        for r in spur:
            r["gap_shrink"] = 1 - abs(r["gap"]) / abs(base_gap) if base_gap else None
        md += [f"| {r['n']} | {r['method']} | {r['oa']:.4f} | {r['clean']:.4f} | {r['spurious']:.4f} | "
               f"{r['gap']:+.4f} | {r['gap_shrink']:.0%} | {r['spurious_rate']:.4f} |" for r in spur]
    leak = [r for r in rows if r["defect"] == "leakage"]
    if leak:
        md += ["", "## Feature leakage (BlockDigits)", "", "| n | method | OA | leakage |",
               "| --- | --- | --- | --- |"]
        md += [f"| {r['n']} | {r['method']} | {r['oa']:.4f} | {r['leakage']:.4f} |" for r in leak]
    md += ["", "Rounds of the rectifying runs (layer, kept, validation accuracy drop):", ""]
    md += [f"- {r['defect']} n={r['n']} {r['method']}: "
           + ", ".join(f"{x['layer']} {'kept' if x['kept'] else 'rolled back'} "
                       f"{100 * x['accuracy_drop']:.1f} pt" for x in r["rounds"])
           for r in rows if r.get("rounds")]
    name = "rectify_defects" + ("" if a.arch == "vit" else f"_{a.arch}") + (
        "" if a.dataset == "digits" else f"_{a.dataset}")
    write_results(name, {"command": command, "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
