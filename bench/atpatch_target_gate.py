"""The target-class gate (``atpatch build --target-gate``) on already built AtPatch versions: test
accuracy, ASR and the share of clean images patched, without and with the gate.

The gate changes only what is served from a build (``TargetClassGate``), not the Detector, so the
same built version is measured both ways: ``--bundle`` takes versions written by
``bench/atpatch_vision.py`` (its ``--work`` folders).

    .venv/bin/python bench/atpatch_target_gate.py --bundle /tmp/atpatch-digits/patched-seed0 \
        --bundle /tmp/atpatch-fashion-trojan/patched-seed0 ...
Writes bench/results/atpatch_target_gate.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offline.datasets import load_dataset  # noqa: E402
from offline.defects import Trigger  # noqa: E402
from repair.atpatch.runtime import AtPatch, TargetClassGate  # noqa: E402
from repair.bundle import Bundle  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def _answers(atp: AtPatch, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    preds, patched = [], []
    for i in range(0, len(x), 512):
        r = atp(x[i:i + 512], mode)
        preds.append(r.logits.argmax(-1))
        patched.append(r.patched)
    return torch.cat(preds), torch.cat(patched)


def measure(bundle: str) -> dict:
    version = Bundle(bundle).version()
    model = version.build_model()
    data = load_dataset(version.manifest["dataset"]["name"])
    trig = Trigger.from_tensors(version.tensors("defect"))
    target = version.manifest["defect"]["target_class"]
    inverted = version.manifest["atpatch"]["inversion"]["target"]
    x, y = data.x_test, data.y_test
    keep = y != target
    x_bad = trig.apply(x[keep])
    atp = AtPatch.from_version(version, model)
    out = {"bundle": bundle, "version": version.id, "target": target, "inverted_target": inverted}
    for name, gate, mode in (("off", None, "off"), ("on", None, "on"), ("gated", TargetClassGate(inverted), "on")):
        atp.gate = gate
        clean, clean_patched = _answers(atp, x, mode)
        bad, _ = _answers(atp, x_bad, mode)
        out[name] = {"accuracy": round((clean == y).float().mean().item(), 4),
                     "asr": round((bad == target).float().mean().item(), 4),
                     "clean_patched": round(clean_patched.float().mean().item(), 4)}
    atp.remove()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", action="append", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(b) for b in args.bundle]
    command = "python bench/atpatch_target_gate.py " + " ".join(sys.argv[1:])
    (OUT / "atpatch_target_gate.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    lines = ["# AtPatch with the target-class gate", "", f"Command: `{command}`", "",
             "Test split. Accuracy on clean images, ASR on triggered images of the other classes, and the "
             "share of clean images patched; `on`: every flagged row patched, `gated`: only flagged rows "
             "the bare model answers with the inverted target.", "",
             "| build | accuracy off / on / gated | ASR off / on / gated | clean patched on / gated |",
             "|---|---|---|---|"]
    for r in rows:
        o, n, g = r["off"], r["on"], r["gated"]
        lines.append(f"| {r['bundle']} | {o['accuracy']} / {n['accuracy']} / {g['accuracy']} | "
                     f"{o['asr']} / {n['asr']} / {g['asr']} | {n['clean_patched']} / {g['clean_patched']} |")
    (OUT / "atpatch_target_gate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
