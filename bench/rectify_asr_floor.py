"""The ASR a rectification cannot go below: a model trained the same way *without* the backdoor,
on the Blend-triggered test images of the other classes. Blending half the image with noise hides
much of the garment, and a clean model answers some of those images with the target class
anyway; a repair that behaves like a clean model measures that much ASR.

    .venv/bin/python bench/rectify_asr_floor.py [--dataset fashion-mnist] [--max-train 8000] [--zoo-epochs 15]
Writes bench/results/rectify_asr_floor_DATASET.{json,md}. The clean models are cached beside the
backdoored ones of bench/rectify.py (same recipe and seed, ``defect="none"``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline.defects import blend_trigger  # noqa: E402
from offline.zoo import bundle_test_data  # noqa: E402
from rectify_common import ARCH_NAMES, CACHE, cached_zoo_bundle  # noqa: E402
from repair.bundle import Bundle  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def answers(model, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(x[i:i + 1000]).argmax(-1) for i in range(0, len(x), 1000)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--max-train", type=int, default=8000)
    ap.add_argument("--zoo-epochs", type=int, default=15)
    ap.add_argument("--target", type=int, default=0, help="the backdoor's target class (bench/rectify.py: 0)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for arch in ("vit", "resnet18"):
        bundle = cached_zoo_bundle(CACHE, args.dataset, arch, defect="none", max_train=args.max_train,
                                   epochs=args.zoo_epochs)
        version = Bundle(bundle).version()
        model = version.build_model().eval()
        x, y = bundle_test_data(version)
        other = y != args.target
        x, y = x[other], y[other]
        # the trigger bench/rectify.py's zoo plants: Blend, φ = 0.5, the training seed's pattern
        triggered = blend_trigger(tuple(x.shape[1:]), visibility=0.5, seed=0).apply(x)
        on_blend, on_clean = answers(model, triggered), answers(model, x)
        counts = torch.bincount(on_blend, minlength=int(y.max()) + 1)
        rows.append({"arch": arch, "bundle": str(bundle),
                     "accuracy_other_classes": round((on_clean == y).float().mean().item(), 4),
                     "asr_floor": round((on_blend == args.target).float().mean().item(), 4),
                     "clean_to_target": round((on_clean == args.target).float().mean().item(), 4),
                     "triggered_right": round((on_blend == y).float().mean().item(), 4),
                     "most_answered_on_triggered": [int(counts.argmax()), round(float(counts.max()) / len(y), 4)]})
        print(rows[-1], flush=True)
    command = "python bench/rectify_asr_floor.py " + " ".join(sys.argv[1:])
    md = [f"# The ASR floor of a rectification: {args.dataset} models trained without the backdoor", "",
          f"Command: `{command}`. The recipe of `bench/rectify.py`'s zoo models ({args.max_train} training images, "
          f"{args.zoo_epochs} epochs, seed 0), without the backdoor. Test images of the classes other than the "
          f"target ({args.target}), Blend-triggered (φ = 0.5) and clean: the share answered with the target is "
          "what ASR reads for a repaired model that answers like this one.", "",
          "| model | accuracy (other classes, clean) | Blend-triggered → target (ASR floor) | clean → target "
          "| triggered answered right | most answered on triggered (class, share) |",
          "| --- | --- | --- | --- | --- | --- |"]
    md += [f"| {ARCH_NAMES.get(r['arch'], r['arch'])} | {r['accuracy_other_classes']:.4f} | {r['asr_floor']:.2%} | "
           f"{r['clean_to_target']:.2%} | {r['triggered_right']:.2%} | {r['most_answered_on_triggered'][0]}, "
           f"{r['most_answered_on_triggered'][1]:.1%} |" for r in rows]
    name = f"rectify_asr_floor_{args.dataset}"
    (OUT / f"{name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    (OUT / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
