"""Where to read the value v* (layers.py docstring): layer output vs block output vs logits.

One rank-one edit (n = 1, 100 Adam steps) of each listed layer of the digits ViT Blend model with ``value`` =
``layer`` / ``block`` / ``logits``; OA and ASR on the test split.

    .venv/bin/python bench/rectify_value_point.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rectify_common import CACHE, Setup, cached_zoo_bundle, write_results  # noqa: E402
from repair.editing.rank_one import rank_one_edit  # noqa: E402

LAYERS = ("patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc2",
          "blocks.2.mlp.fc2")


def main():
    torch.set_num_threads(1)
    setup = Setup(cached_zoo_bundle(CACHE, "digits", "vit", visibility=0.5))
    rows = []
    for trial in range(3):
        clean, corrupt, _ = setup.pairs(1, trial)
        for name in LAYERS:
            for value in ("layer", "block", "logits"):
                setup.reset()
                rank_one_edit(setup.model, setup.layers[name], setup.stats[name], clean, corrupt,
                              value=value)
                ev = setup.evaluate()
                rows.append({"trial": trial, "layer": name, "value": value, "oa": ev["oa"],
                             "asr": ev["asr"]})
                print(rows[-1], flush=True)
    command = "python bench/rectify_value_point.py"
    md = ["# Value point of the rank-one edit (digits ViT, Blend φ=0.5, n=1)", "",
          f"Command: `{command}` (1 CPU thread). Base OA {setup.base['oa']:.4f}, ASR "
          f"{setup.base['asr']:.4f}. Mean over 3 pairs. `block` = past the residual sum for "
          "`attn.proj`/`mlp.fc2` (same as `layer` for the others).", "",
          "| layer | value | OA | ASR |", "| --- | --- | --- | --- |"]
    for name in LAYERS:
        for value in ("layer", "block", "logits"):
            sel = [r for r in rows if r["layer"] == name and r["value"] == value]
            md.append(f"| {name} | {value} | {sum(r['oa'] for r in sel) / len(sel):.4f} | "
                      f"{sum(r['asr'] for r in sel) / len(sel):.4f} |")
    write_results("rectify_value_point", {"command": command, "base": setup.base, "rows": rows},
                  "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
