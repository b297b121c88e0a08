"""Spurious correlation (paper Table 4) and feature leakage (Table 5) on the digits ViT.

Spurious (zoo ``--defect spurious``: a white square on 50 % of class 0's training images, labels
kept): pairs are class-0 training images without / with the square (the n with the largest
prediction gap). Reported on the test split: overall accuracy, accuracy on class 0's clean set
and on the same images with the square (the spurious set), their gap (spurious − clean), and the
share of other classes' images that the square alone turns into class 0.

Leakage (zoo ``--defect leakage``, BlockDigits: the digit in one half, a fixed null block in the
other): pairs are a training image as served (corrupt) and the same with the null block blanked
(clean). Leakage measure: the share of Integrated-Gradients mass (|IG|, black baseline, 32
steps, true label) that falls on the null-block half, mean over 120 test images (the paper's
Table 5 quantity: attribution on the uninformative block).

    .venv/bin/python bench/rectify_defects.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from captum.attr import IntegratedGradients

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline.defects import Trigger, block_images, block_positions  # noqa: E402
from offline.finetune_baseline import finetune_last_layer  # noqa: E402
from offline.rectify import training_images  # noqa: E402
from offline.zoo import bundle_test_data, train_bundle  # noqa: E402
from rectify_common import write_results  # noqa: E402
from repair.bundle import Bundle  # noqa: E402
from repair.editing.dynamic import prediction_gap, rectify  # noqa: E402
from repair.editing.keystats import compute_keystats  # noqa: E402
from repair.editing.layers import editable_layers  # noqa: E402
from repair.metrics import accuracy, attack_success_rate  # noqa: E402

CACHE = Path("/tmp/rect-bench")


def _bundle(defect: str, **kw) -> Bundle:
    out = CACHE / f"digits-vit-{defect}"
    if not (out / "CURRENT").exists():
        train_bundle(out, dataset="digits", arch="vit", defect=defect, target_class=0, seed=0,
                     progress=False, **kw)
    return Bundle(out)


def _prepare(version):
    model = version.build_model()
    layers = editable_layers(model)
    x_train, y_train = training_images(version)
    stats = compute_keystats(model, list(layers.values()), x_train[:1024], progress=False)
    return model, layers, stats, x_train, y_train, {k: v.clone() for k, v in model.state_dict().items()}


def _methods(model, layers, stats, clean, corrupt, labels, val_x, val_y, weights):
    for method in ("base", "dynamic", "static", "finetune"):
        model.load_state_dict(weights)
        if method == "finetune":
            finetune_last_layer(model, clean, corrupt, labels, val_x, val_y, budget=0.005)
        elif method != "base":
            rectify(model, layers, stats, clean, corrupt, labels, val_x, val_y, budget=0.005,
                    static=method == "static", progress=False)
        yield method


def spurious(rows):
    version = _bundle("spurious", poison_rate=0.5).version()
    model, layers, stats, x_train, y_train, weights = _prepare(version)
    square = Trigger.from_tensors(version.tensors("defect"))
    x_test, y_test = bundle_test_data(version)
    pool = (y_train[:-500] == 0).nonzero().flatten()
    with torch.no_grad():
        p_clean = model(x_train[pool]).softmax(-1)
        p_corrupt = model(square.apply(x_train[pool])).softmax(-1)
    order = pool[(0.5 * (p_clean - p_corrupt).abs().sum(-1)).argsort(descending=True)]
    zero = y_test == 0
    for n in (1, 20):
        clean = x_train[order[:n]]
        corrupt, labels = square.apply(clean), y_train[order[:n]]
        for method in _methods(model, layers, stats, clean, corrupt, labels, x_train[-500:],
                               y_train[-500:], weights):
            acc_clean = accuracy(model, x_test[zero], y_test[zero])
            acc_spur = accuracy(model, square.apply(x_test[zero]), y_test[zero])
            rows.append({"defect": "spurious", "n": n, "method": method,
                         "oa": accuracy(model, x_test, y_test), "clean": acc_clean,
                         "spurious": acc_spur, "gap": acc_spur - acc_clean,
                         "pair_gap": prediction_gap(model, clean, corrupt),
                         "spurious_rate": attack_success_rate(model, square.apply(x_test), y_test, 0)})
            print(rows[-1], flush=True)


def leakage_measure(model, x, y, half: torch.Tensor) -> float:
    """Share of |IG| on the null-block half (``half[i]``: True when the block is the top)."""
    ig = IntegratedGradients(model)
    attr = ig.attribute(x, baselines=torch.zeros_like(x), target=y, n_steps=32).abs()
    h = x.shape[2] // 2
    top, bottom = attr[:, :, :h].sum((1, 2, 3)), attr[:, :, h:].sum((1, 2, 3))
    null = torch.where(half, top, bottom)
    return float((null / (top + bottom).clamp_min(1e-12)).mean())


def leakage(rows):
    version = _bundle("leakage").version()
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
    g = torch.Generator().manual_seed(1000)
    pool = torch.arange(len(x_train) - 500)
    for n in (1, 20):
        idx = pool[torch.randperm(len(pool), generator=g)[:n]]
        clean, corrupt, labels = blank[idx], x_train[idx], y_train[idx]
        for method in _methods(model, layers, stats, clean, corrupt, labels, x_train[-500:],
                               y_train[-500:], weights):
            rows.append({"defect": "leakage", "n": n, "method": method,
                         "oa": accuracy(model, x_test, y_test),
                         "leakage": leakage_measure(model, x_test[sub], y_test[sub], block_top[sub])})
            print(rows[-1], flush=True)


def main():
    torch.set_num_threads(1)
    rows = []
    spurious(rows)
    leakage(rows)
    command = "python bench/rectify_defects.py"
    md = ["# Spurious correlation and feature leakage, digits ViT", "", f"Command: `{command}` "
          "(1 CPU thread). Budget ε = 0.5 pt on the validation split for every method.", "",
          "## Spurious correlation (class 0, white square)", "",
          "| n | method | OA | clean | spurious | gap (spurious − clean) | pattern → class 0 |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['n']} | {r['method']} | {r['oa']:.4f} | {r['clean']:.4f} | {r['spurious']:.4f} | "
           f"{r['gap']:+.4f} | {r['spurious_rate']:.4f} |" for r in rows if r["defect"] == "spurious"]
    md += ["", "## Feature leakage (BlockDigits)", "", "| n | method | OA | leakage |",
           "| --- | --- | --- | --- |"]
    md += [f"| {r['n']} | {r['method']} | {r['oa']:.4f} | {r['leakage']:.4f} |"
           for r in rows if r["defect"] == "leakage"]
    write_results("rectify_defects", {"command": command, "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
