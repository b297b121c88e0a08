"""The Detector's strict §4.2.2 metrics on the flags AtPatch serves in its one forward pass, per
layer, for a built version and the same Detector on other layer sets and top margins.

``repair-proxy evaluate`` scores the Detector on each layer's *unpatched* map; served, layer
``l + 1`` sees the map after layer ``l`` was patched, flags carry to later layers and the row
gate keeps flags off rows it does not let through. This reads ``PatchResult.flagged`` instead:
per layer, how often the real trigger's columns are flagged, how often other columns are
flagged beside them (each a false negative by the strict definition), and the test accuracy and
ASR of each variant, so a lower FNR can be weighed against what it costs.

    .venv/bin/python bench/atpatch_served_flags.py --bundle WORK/patched-seed0 --name NAME
(``WORK``: a ``--work`` folder of ``bench/atpatch_vision.py``.)
Writes bench/results/atpatch_served_flags_NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offline.datasets import load_dataset  # noqa: E402
from offline.defects import Trigger  # noqa: E402
from offline.evaluate import detector_test_inputs  # noqa: E402
from repair.atpatch.debugging_set import patch_tokens  # noqa: E402
from repair.atpatch.detector import strict_metrics  # noqa: E402
from repair.atpatch.runtime import AtPatch  # noqa: E402
from repair.bundle import Bundle  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
MARGINS = (None, 2.0, 1.0)


def _served(atp: AtPatch, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Answers and served flags (B, L, N) of ``x``, in batches."""
    preds, flags = [], []
    for i in range(0, len(x), 512):
        r = atp(x[i:i + 512], "on")
        preds.append(r.logits.argmax(-1))
        flags.append(r.flagged)
    return torch.cat(preds), torch.cat(flags)


def measure(atp: AtPatch, x_clean, y, x_bad, target: int, tokens: list[int]) -> dict:
    """On ``offline.evaluate.detector_metrics``' inputs (``detector_test_inputs``); truth: the
    trigger's tokens on every layer run."""
    with atp.bare() as model:
        works, xc = detector_test_inputs(model, x_clean, x_bad, y, target)
    xb = x_bad[works]
    run = atp.layers
    _, fb = _served(atp, xb)
    _, fc = _served(atp, xc)
    fb, fc = fb[:, run], fc[:, run]
    truth = torch.zeros_like(fb)
    truth[:, :, tokens] = True

    def strict(b, c, t):
        m = strict_metrics(torch.cat([b, c]), torch.cat([t, torch.zeros_like(c)]))
        return {k: m[k] for k in ("fpr", "fnr")}

    per_layer = {}
    for j, layer in enumerate(run):
        per_layer[layer] = {**strict(fb[:, j], fc[:, j], truth[:, j]),
                            "trigger_flagged": round(fb[:, j][:, tokens].all(1).float().mean().item(), 4),
                            "others_flagged": round((fb[:, j] & ~truth[:, j]).any(1).float().mean().item(), 4)}
    pred_clean, _ = _served(atp, x_clean)
    pred_bad, _ = _served(atp, x_bad[y != target])
    return {"layers": run, "top_margin": atp.top_margin,
            **strict(fb.flatten(0, 1), fc.flatten(0, 1), truth.flatten(0, 1)), "per_layer": per_layer,
            "accuracy": round((pred_clean == y).float().mean().item(), 4),
            "asr": round((pred_bad == target).float().mean().item(), 4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True, help="a version built by `repair-proxy atpatch build`")
    ap.add_argument("--name", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    version = Bundle(args.bundle).version()
    model = version.build_model("cpu")
    atp = AtPatch.from_version(version, model)
    built = (list(atp.layers), atp.top_margin)
    data = load_dataset(version.manifest["dataset"]["name"])
    trig = Trigger.from_tensors(version.tensors("defect"))
    target = version.manifest["defect"]["target_class"]
    tokens = patch_tokens(trig.mask, int(version.manifest["architecture"].get("patch_size", 4)))
    x_bad = trig.apply(data.x_test)
    prefixes = sorted({tuple(range(k)) for k in (1, 2, atp.access.n_layers)} | {tuple(built[0])})
    rows = []
    for layers, margin in itertools.product(prefixes, MARGINS):
        atp.layers, atp.top_margin = list(layers), margin
        atp._install()
        rows.append(measure(atp, data.x_test, data.y_test, x_bad, target, tokens))
    atp.remove()
    command = "python bench/atpatch_served_flags.py " + " ".join(sys.argv[1:])
    result = {"command": command, "bundle": args.bundle, "built": {"layers": built[0], "top_margin": built[1]},
              "trigger_tokens": tokens, "rows": rows}
    (OUT / f"atpatch_served_flags_{args.name}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# AtPatch's served flags, {args.name}", "", f"Command: `{command}`", "",
             f"Built: layers {built[0]}, top margin {built[1]}; real trigger's tokens {tokens}. Strict §4.2.2 on the "
             "flags of the served forward pass (`PatchResult.flagged`: later layers see patched maps, flags carry, "
             "the row gate applies); per layer: share of triggered maps with the trigger's columns flagged, and with "
             "other columns flagged beside them. Accuracy and ASR on the whole test set.", "",
             "| layers | top margin | FPR | FNR | per layer: trigger flagged / others flagged / FNR | accuracy | ASR |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        per = "; ".join(f"{l}: {p['trigger_flagged']} / {p['others_flagged']} / {p['fnr']}"
                        for l, p in r["per_layer"].items())
        lines.append(f"| {r['layers']} | {r['top_margin']} | {r['fpr']} | {r['fnr']} | {per} | {r['accuracy']} | "
                     f"{r['asr']} |")
    (OUT / f"atpatch_served_flags_{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
