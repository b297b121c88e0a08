"""``repair-proxy``: the one command line. Parses arguments and calls one function per command.

This is the only module that imports ``repair``, ``offline`` and ``server`` together; it stays
thin. Expected failures (bad data, bad bundle, bad arguments) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys


def _add_defect_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--defect", default="none",
                   choices=["none", "badnets", "trojan", "hidden", "blend", "spurious", "leakage"])
    p.add_argument("--trigger", metavar="PNG", help="trigger image (default: the defect's own)")
    p.add_argument("--target-class", type=int, default=0)
    p.add_argument("--poison-rate", type=float, default=0.1)
    p.add_argument("--visibility", type=float, default=0.5, help="Blend visibility φ")
    p.add_argument("--location", default="br",
                   help="br|bl|tr|tl|center|ROW,COL; zoo train with a patch backdoor takes several "
                        "joined by '+' (br+tl+center: each poisoned image gets one, the first is "
                        "the bundle's trigger)")


def _zoo_train(a):
    from offline.zoo import train_bundle

    version = train_bundle(a.out, dataset=a.dataset, arch=a.arch, defect=a.defect,
                           target_class=a.target_class, poison_rate=a.poison_rate,
                           visibility=a.visibility, location=a.location, epochs=a.epochs,
                           seed=a.seed, trigger_png=a.trigger, protected_boost=a.amplify)
    print(json.dumps({"bundle": a.out, "version": version.id, **version.manifest["metrics"]}))


def _zoo_pair(a):
    from offline.zoo import export_pair

    print(json.dumps(export_pair(a.bundle, a.index, a.out)))


def _atpatch_build(a):
    from offline.atpatch_build import build_detector
    from repair.atpatch.trigger_inversion import RESTARTS

    protected = [s for s in (a.protected or "").split(",") if s]
    restarts = RESTARTS if a.inversion_restarts is None else a.inversion_restarts
    version = build_detector(a.bundle, protected=protected, epochs=a.epochs, threshold=a.threshold,
                             calibrate=not a.no_calibration, target_gate=a.target_gate,
                             inversion_restarts=restarts)
    meta = version.manifest.get("atpatch", {})
    for warning in meta.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps({"version": version.id, "detector": meta.get("detector_metrics", {}),
                      "variants": meta.get("variants", {}), "threshold": meta.get("threshold"),
                      "layer_thresholds": meta.get("layer_thresholds"), "top_margin": meta.get("top_margin"),
                      "row_gate": meta.get("row_gate"), "logit_shift": meta.get("logit_shift", {}).get("shift"),
                      "fairness_answer": meta.get("fairness_answer", {}).get("chosen"),
                      "calibration": {k: meta.get("calibration", {}).get(k) for k in ("method", "chosen")},
                      "held_out": meta.get("held_out"), "warnings": meta.get("warnings", [])}))


def _rectify(a):
    from offline.rectify import MIN_GAIN, STRESS, TRANSPLANT_SAMPLES, VALIDATION_SAMPLES, rectify_from_files

    validation = VALIDATION_SAMPLES if a.validation is None else a.validation
    stress = STRESS if a.stress is None else a.stress
    result = rectify_from_files(a.bundle, clean=a.clean, corrupt=a.corrupt, label=a.label,
                                budget=a.budget, gap=a.gap, static=a.static, layer=a.layer,
                                validation=validation, stress=stress, candidates=a.candidates,
                                min_gain=MIN_GAIN if a.min_gain is None else a.min_gain,
                                transplant=TRANSPLANT_SAMPLES if a.transplant is None else a.transplant,
                                hold_anchors=a.hold_anchors, confirm=a.confirm, device=a.device)
    print(json.dumps(result))


def _evaluate(a):
    from offline.evaluate import evaluate_bundle

    result = evaluate_bundle(a.bundle, version=a.version, patch=a.patch, defect=a.defect,
                             target_class=a.target_class, visibility=a.visibility,
                             location=a.location, heatmaps=a.heatmaps, detector_curve=a.detector_curve)
    print(json.dumps(result, indent=None if a.json else 1))


def _serve(a):
    from server.app import serve

    serve(a.bundle, host=a.host, port=a.port, device=a.device, workers=a.workers, token=a.token,
          insecure=a.insecure)


def _worker(a):
    from offline.worker import run_worker

    run_worker(a.bundle)


def _demo(a):
    from offline.demo import demo_bundle
    from server.app import serve

    serve(str(demo_bundle()), host=a.host, port=a.port, device="auto", workers=1, token=None,
          insecure=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repair-proxy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="defective-model zoo").add_subparsers(dest="zoo_command", required=True)
    p = zoo.add_parser("train", help="train a model with a planted defect and write a bundle")
    p.add_argument("--dataset", required=True, help="digits|fashion-mnist|adult|compas|german|PATH")
    p.add_argument("--arch", required=True, choices=["vit", "resnet18", "ft-transformer", "hf-vit"])
    _add_defect_options(p)
    p.add_argument("--amplify", type=str, default=None,
                   help="tabular: amplify reliance on this protected attribute")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_zoo_train)
    p = zoo.add_parser("pair", help="export test sample I clean and with the bundle's defect as PNGs")
    p.add_argument("--bundle", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_zoo_pair)

    atp = sub.add_parser("atpatch", help="AtPatch offline build").add_subparsers(dest="atpatch_command", required=True)
    p = atp.add_parser("build", help="train the Detector and benign columns, write a new version")
    p.add_argument("--bundle", required=True)
    p.add_argument("--protected", help="comma-separated protected attributes (tabular)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--threshold", type=float, default=0.1, help="τ (Eq. 9)")
    p.add_argument("--no-calibration", action="store_true",
                   help="keep τ for every layer and flag every column above it (backdoor builds otherwise "
                        "raise τ per layer on clean images, or lower it with --target-gate as far as held-out "
                        "accuracy allows, and flag only columns within a top margin of their map's highest)")
    p.add_argument("--target-gate", action="store_true",
                   help="backdoor: patch only requests the bare model answers with the target class (a false "
                        "flag then costs no accuracy; an attacked request costs two forward passes)")
    # default: repair.atpatch.trigger_inversion.RESTARTS, read when the command runs (keeps this import-light)
    p.add_argument("--inversion-restarts", type=int,
                   help="backdoor: random starts per class of the trigger inversion (Eq. 3 is non-convex; default 6)")
    p.set_defaults(func=_atpatch_build)

    p = sub.add_parser("rectify", help="rank-one rectification from clean/corrupt pairs")
    p.add_argument("--bundle", required=True)
    p.add_argument("--clean", required=True, action="append",
                   help="PNG of a clean input; repeat with --corrupt for n pairs, in the same order")
    p.add_argument("--corrupt", required=True, action="append", help="PNG of the corrupt input of a pair")
    p.add_argument("--label", type=int, action="append",
                   help="class the corrupt input should get: once for every pair, or once per pair "
                        "(default: the model's answer to the clean input)")
    p.add_argument("--budget", type=float, default=0.01, help="ε: tolerated validation accuracy drop")
    p.add_argument("--gap", type=float, default=0.001, help="δ: target gap")
    # default: offline.rectify.VALIDATION_SAMPLES, read when the command runs (keeps this import-light)
    p.add_argument("--validation", type=int,
                   help="check ε on this many of the last training images (default 500; 2000 on "
                        "large data sets)")
    # default: repair.editing.dynamic.STRESS, read when the command runs
    p.add_argument("--stress", type=float,
                   help="a round that closes the pair's gap must also help the pair with its "
                        "corruption amplified this many times; 0: off, the paper's Algorithm 1 "
                        "(default 2)")
    p.add_argument("--candidates", type=int, default=1,
                   help="edit this many of the localisation's top layers in each round and keep "
                        "the one that leaves the stressed pair's gap lowest (1: the paper's argmax)")
    # default: repair.editing.dynamic.MIN_GAIN, read when the command runs
    p.add_argument("--min-gain", type=float,
                   help="relative lowering of the gap a round must bring to be kept (default 0.03)")
    # default: offline.rectify.TRANSPLANT_SAMPLES, read when the command runs
    p.add_argument("--transplant", type=int,
                   help="clean training images that receive the pairs' corruption and join the "
                        "pairs, so the edit removes the trigger rather than mapping it to the "
                        "pairs' class; 0: the pairs alone, as in the paper (default 64)")
    p.add_argument("--hold-anchors", action="store_true",
                   help="hold clean training images in place in every round, not only when a "
                        "round broke the budget: for models whose first edit spends the budget")
    p.add_argument("--confirm", action="store_true",
                   help="keep a round only if it also stays within ε on the --validation training "
                        "images before those ε is checked on (the loop fits the images it checks)")
    p.add_argument("--static", action="store_true", help="edit one fixed layer (the last)")
    p.add_argument("--layer", help="edit this layer instead of localising one")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="where the edit runs (default cpu: small models are no faster on a GPU)")
    p.set_defaults(func=_rectify)

    p = sub.add_parser("evaluate", help="accuracy, ASR, UF and detector metrics of a version")
    p.add_argument("--bundle", required=True)
    p.add_argument("--version")
    p.add_argument("--patch", choices=["on", "off"], default="off")
    _add_defect_options(p)
    p.add_argument("--heatmaps", metavar="DIR", help="save attention maps before/after as PNG")
    p.add_argument("--detector-curve", metavar="PNG",
                   help="save the Detector's precision-recall and FPR/FNR curves as τ moves (vision)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("serve", help="serve a bundle over HTTP")
    p.add_argument("--bundle", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--token", help="bearer token for /rectify and version changes")
    p.add_argument("--insecure", action="store_true", help="allow /rectify without a token")
    p.set_defaults(func=_serve)

    p = sub.add_parser("worker", help="run the rectification jobs queued in a bundle")
    p.add_argument("--bundle", required=True)
    p.set_defaults(func=_worker)

    p = sub.add_parser("demo", help="build (once) a small backdoored digits ViT and serve it")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from offline.datasets import DataError
    from repair.bundle import BundleError

    try:
        args.func(args)
    except (BundleError, DataError, ValueError, FileNotFoundError) as err:
        print(f"repair-proxy: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
