"""Wall time of one n = 1 rectification of the digits ViT (issue 4: ≤ 30 s on 2 CPU threads).

``rectify_images`` end to end (load, checks, localization, Algorithm 1, evaluation, writing the
version) on a copy of the digits ViT Blend bundle: *cold* computes and stores the key statistics,
*warm* finds them in the bundle (``prepare_keystats``). Three pairs each; each new version's OA and
ASR on the test split too (the edit has to work on the device it ran on, not only finish).

    .venv/bin/python bench/rectify_timing.py [--device cuda]   (cuda: rectify_timing_cuda.md)
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline.rectify import prepare_keystats, rectify_images  # noqa: E402
from rectify_common import CACHE, Setup, cached_zoo_bundle, write_results  # noqa: E402
from repair.bundle import Bundle  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2, help="the target is for 2; 1 gives an upper bound")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where rectify_images runs")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    src = cached_zoo_bundle(CACHE, "digits", "vit", visibility=0.5)
    setup = Setup(src)
    rows = []
    for mode in ("cold", "warm"):
        for trial in range(3):
            with tempfile.TemporaryDirectory() as tmp:
                dst = Path(tmp) / "b"
                shutil.copytree(src, dst)
                if mode == "warm":
                    prepare_keystats(dst, progress=False)
                clean, corrupt, labels = setup.pairs(1, trial)
                started = time.perf_counter()
                res = rectify_images(dst, clean[0], corrupt[0], label=int(labels[0]), progress=False,
                                     device=a.device)
                seconds = round(time.perf_counter() - started, 2)
                setup.model.load_state_dict(Bundle(dst).version(res["version"]).build_model().state_dict())
                edited = setup.evaluate()
                setup.reset()
                rows.append({"mode": mode, "trial": trial, "seconds": seconds, "rounds": res["rounds"],
                             "layers": res["layers"], "oa": round(edited["oa"], 4), "asr": round(edited["asr"], 4)})
                print(rows[-1], flush=True)
    command = " ".join(["python", "bench/rectify_timing.py", *sys.argv[1:]])
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"{a.threads} CPU thread(s)"
    md = [f"# One n=1 rectification of the digits ViT, {where}", "",
          f"Command: `{command}`. Target ≤ 30 s (on 2 CPU threads). Load average (1, 5, 15 min) at the end: "
          f"{tuple(round(v, 2) for v in os.getloadavg())}. The model before: OA {setup.base['oa']:.4f}, "
          f"ASR {setup.base['asr']:.4f}.", "",
          "| key statistics | median s | max s |", "| --- | --- | --- |"]
    for mode in ("cold", "warm"):
        s = [r["seconds"] for r in rows if r["mode"] == mode]
        md.append(f"| {mode} | {statistics.median(s):.2f} | {max(s):.2f} |")
    md += ["", *(f"- {r['mode']} trial {r['trial']}: {r['seconds']} s, {r['rounds']} rounds, "
                 f"OA {r['oa']}, ASR {r['asr']}, {r['layers']}" for r in rows)]
    name = "rectify_timing" + ("_cuda" if a.device == "cuda" else "")
    write_results(name, {"command": command, "device": a.device, "base": setup.base, "runs": rows},
                  "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
