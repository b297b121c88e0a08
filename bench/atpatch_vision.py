"""AtPatch on a vision zoo model: build (timed), evaluate off/on, τ and variant sweep (on the
layers the build chose). Default: the digits ViT BadNets model, trained here if missing.

    .venv/bin/python bench/atpatch_vision.py [--epochs 50] [--work /tmp/atpatch-digits]
    .venv/bin/python bench/atpatch_vision.py --zoo /work/zoo-runs/fashion-vit-trojan --name fashion-trojan
    .venv/bin/python bench/atpatch_vision.py --zoo ... --target-gate   # builds served with the target gate
Writes bench/results/atpatch_NAME.{json,md}, the Detectors' curves as τ moves in
atpatch_NAME_detector.png, and heatmaps under bench/results/atpatch_heatmaps/NAME.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offline.atpatch_build import build_detector  # noqa: E402
from offline.datasets import load_dataset  # noqa: E402
from offline.defects import Trigger  # noqa: E402
from offline.evaluate import FPR_BOUND, evaluate_bundle, plot_detector_curves  # noqa: E402
from offline.zoo import train_bundle  # noqa: E402
from repair.atpatch import benign as benign_io  # noqa: E402
from repair.atpatch.runtime import AtPatch, row_gate  # noqa: E402
from repair.atpatch.trigger_inversion import RESTARTS  # noqa: E402
from repair.bundle import Bundle, copy_bundle  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
# How a build's calibration reads (``manifest["atpatch"]["calibration"]["method"]``).
CALIBRATION_SYMBOL = {"clean_flag_rate": "α", "gated_lowest_threshold": "τ"}
SWEEP_THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def sweep(bundle: Path) -> list[dict]:
    """Accuracy, ASR and clean patch rate at one τ for every layer, both variants, served as built
    (with the build's row gate, if any)."""
    v = Bundle(bundle).version()
    model = v.build_model()
    data = load_dataset(v.manifest["dataset"]["name"])
    trig = Trigger.from_tensors(v.tensors("defect"))
    target = v.manifest["defect"]["target_class"]
    xb = trig.apply(data.x_test[data.y_test != target])
    probe = AtPatch.from_version(v, model)
    det = probe.detector
    probe.remove()
    benign = benign_io.from_tensors(v.tensors("benign"), det.n_layers)
    meta = v.manifest["atpatch"]
    rows = []
    for tau in SWEEP_THRESHOLDS:
        for variant in ("replace", "masked"):
            a = AtPatch(model, det, benign, threshold=tau, variant=variant, layers=meta["layers"], gate=row_gate(meta),
                        top_margin=meta.get("top_margin"))
            r, rb = a(data.x_test), a(xb)
            rows.append({"threshold": tau, "variant": variant,
                         "accuracy": round((r.logits.argmax(-1) == data.y_test).float().mean().item(), 4),
                         "asr": round((rb.logits.argmax(-1) == target).float().mean().item(), 4),
                         "clean_patch_rate": round(r.patched.float().mean().item(), 4)})
            a.remove()
    return rows


def build_and_evaluate(zoo: Path, work: Path, epochs: int, seed: int, heatmaps: Path | None,
                       target_gate: bool, inversion_restarts: int) -> dict:
    bundle = work / f"patched-seed{seed}"
    shutil.rmtree(bundle, ignore_errors=True)
    copy_bundle(zoo, bundle)
    t = time.perf_counter()
    version = build_detector(bundle, epochs=epochs, seed=seed, progress=False, target_gate=target_gate,
                             inversion_restarts=inversion_restarts)
    build_s = time.perf_counter() - t
    on = evaluate_bundle(bundle, patch="on", heatmaps=str(heatmaps) if heatmaps else None)
    on["heatmaps"] = [str(Path(p).relative_to(OUT.parent.parent)) for p in on.get("heatmaps", [])]
    return {"seed": seed, "bundle": str(bundle), "build_seconds": round(build_s, 1), "on": on,
            "atpatch_manifest": {k: version.manifest["atpatch"][k] for k in
                                 ("threshold", "layer_thresholds", "calibration", "top_margin", "variants",
                                  "variant_selection", "layers", "layer_selection",
                                  "detector_metrics", "debugging_set", "inversion", "training")}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--work", default="/tmp/atpatch-digits")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--zoo", help="an existing zoo bundle (default: train the digits ViT BadNets)")
    ap.add_argument("--name", default="digits")
    ap.add_argument("--seeds", default="0,1,2", help="one build per seed: the Detector's training varies")
    ap.add_argument("--target-gate", action="store_true", help="build with --target-gate (TargetClassGate)")
    ap.add_argument("--inversion-restarts", type=int, default=RESTARTS,
                    help="random starts per class of the trigger inversion (results before session 14: 3)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    zoo = Path(args.zoo) if args.zoo else work / "zoo"
    if not (zoo / "CURRENT").exists():
        train_bundle(zoo, dataset="digits", arch="vit", defect="badnets", target_class=0, seed=0, progress=False)
    off = evaluate_bundle(zoo, patch="off")
    seeds = [int(s) for s in args.seeds.split(",")]
    builds = [build_and_evaluate(zoo, work, args.epochs, seed,
                                 OUT / "atpatch_heatmaps" / args.name if i == 0 else None, args.target_gate,
                                 args.inversion_restarts)
              for i, seed in enumerate(seeds)]
    command = "python bench/atpatch_vision.py " + " ".join(sys.argv[1:])
    result = {"command": command, "threads": args.threads, "off": off, "builds": builds,
              "sweep": sweep(Path(builds[0]["bundle"]))}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"atpatch_{args.name}.json").write_text(json.dumps(result, indent=1))
    m = Bundle(zoo).version().manifest
    lines = [f"# AtPatch on {m['dataset']['name']} {m['architecture']['arch']} {m['defect']['type']}", "",
             f"Command: `{command}` ({args.threads} thread(s)). One build per seed (inversion + debugging "
             f"set + Detector {args.epochs} epochs + both variants measured + layer choice); the result depends on the "
             "seed (inversion start, split, Detector initialisation), so every build is listed. Detector metrics: strict §4.2.2 on test maps "
             "(triggered inputs on which the backdoor works, with the real trigger's tokens as truth, "
             "and as many clean inputs), on the layers the Detector runs on, at the build's thresholds: "
             "τ = 0.1, raised per layer where the build's calibration chose a clean-flag rate α, or "
             "lowered to one τ for every layer where a target-gated build could afford it "
             "(column calibration: α or τ, or none; τ per layer in the JSON), and only columns within the build's "
             "top margin of their map's highest (`flag_columns`; column top margin, logits, or none). "
             f"Target gate: {'yes' if args.target_gate else 'no'}.", "",
             f"Unpatched: accuracy {off['accuracy']}, ASR {off['asr']}; clean images of the other classes "
             f"answered with the target: {off['clean_to_target']} (what ASR stays at when the trigger "
             "is removed perfectly; column clean → target: the same with the patch on).", "",
             "| seed | build s | layers | variant | calibration | top margin | accuracy | ASR | clean → target | "
             "clean patch rate | precision | recall | FPR | FNR | no Detector: acc / ASR | no rescaling: acc / ASR | "
             "real trigger's columns: acc / ASR |",
             "|" + "---|" * 17]
    for b in builds:
        on, d, meta = b["on"], b["on"]["detector"], b["atpatch_manifest"]
        ab = on.get("ablations", {})
        nd, nr, tc = (ab.get(k, {}) for k in ("without_detector", "without_rescaling", "true_columns"))
        calib = meta["calibration"]
        alpha = "none" if calib["chosen"] is None else \
            f"{CALIBRATION_SYMBOL[calib.get('method', 'clean_flag_rate')]} = {calib['chosen']}"
        lines.append(f"| {b['seed']} | {b['build_seconds']} | {meta['layers']} | {meta['variants']['backdoor']} | {alpha} | "
                     f"{meta.get('top_margin') or 'none'} | "
                     f"{on['accuracy']} | {on['asr']} | {on['clean_to_target']} | {on['patch_rate']['clean']} | {d['precision']} | "
                     f"{d['recall']} | {d['fpr']} | {d['fnr']} | {nd.get('accuracy')} / {nd.get('asr')} | "
                     f"{nr.get('accuracy')} / {nr.get('asr')} | {tc.get('accuracy')} / {tc.get('asr')} |")
    curve_png = plot_detector_curves({f"seed {b['seed']}": b["on"]["detector"]["curve"] for b in builds},
                                     OUT / f"atpatch_{args.name}_detector.png",
                                     f"{args.name}: Detectors on test maps (strict), every layer's τ moved together")
    lines += ["", f"The Detectors' scores as τ moves (every layer's logit threshold shifted together; "
              f"`{curve_png.name}`): the lowest FNR any τ reaches at FPR ≤ {FPR_BOUND} on these test maps. "
              "That τ is chosen with the real trigger's truth: it shows what the scores allow, not a τ a build, "
              "which knows only its inverted trigger, could pick.", "",
              f"| seed | served τ | FPR | FNR | best τ at FPR ≤ {FPR_BOUND} | FPR | FNR |", "|---|---|---|---|---|---|---|"]
    for b in builds:
        c = b["on"]["detector"]["curve"]
        at, best = c["served"], c["best_fnr_at_fpr"]
        lines.append(f"| {b['seed']} | {at['thresholds']} | {at['fpr']} | {at['fnr']} | {best['thresholds']} | "
                     f"{best['fpr']} | {best['fnr']} |")
    served = [(b["seed"], b["on"]["detector"]["served"]) for b in builds if "served" in b["on"]["detector"]]
    if served:
        lines += ["", "Served Detector metrics (the same maps, flags only on rows the target gate lets through: "
                  "clean images the bare model answers with the target, every triggered one): " +
                  "; ".join(f"seed {s}: precision {d['precision']}, recall {d['recall']}, FPR {d['fpr']}, "
                            f"FNR {d['fnr']}" for s, d in served) + "."]
    lines += ["", f"One τ for every layer (no calibration; the build's top margin kept) and variant sweep, "
              f"seed {seeds[0]}'s build, on its layers, "
              f"{'gated' if args.target_gate else 'every flagged row patched'}:", "",
              "| τ | variant | accuracy | ASR | clean patch rate |", "|---|---|---|---|---|"]
    lines += [f"| {r['threshold']} | {r['variant']} | {r['accuracy']} | {r['asr']} | {r['clean_patch_rate']} |"
              for r in result["sweep"]]
    (OUT / f"atpatch_{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
