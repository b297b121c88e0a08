"""Rectification job (CONTRACTS §2): a clean/corrupt pair (or n of them) in, a new bundle version out.

``rectify_images`` validates the pair before anything is computed or written, loads the key
statistics from the version (or computes them from the bundle's training data and stores them in
the new version), runs dynamic rectification (paper Algorithm 1; ``static=True`` edits the last
editable layer once; ``layer=`` edits a named layer) and writes a new version whose weights
hold the edits and whose ``edits.json`` records each edit as an explicit delta
``W' − W = Λ dᵀ`` (layer, Λ, d, weight shape, pair hashes). The parent version is never touched.

The loop fits the user's pairs plus ``transplant`` clean training images that carry their
corruption (:mod:`repair.editing.dynamic`, "Transplanted pairs"); a round's ``gap`` in the record
covers all of them, ``before``/``after`` ``gap`` the user's pairs alone.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from offline.datasets import load_dataset
from repair.bundle import Bundle, BundleError, state_dict_for_saving
from repair.editing.dynamic import MAX_ROUNDS, MIN_GAIN, STRESS, carried_pairs, prediction_gap, rectify
from repair.editing.keystats import compute_keystats, stats_from_tensors, stats_to_tensors
from repair.editing.layers import editable_layers
from repair.images import ImageError, decode_image
from repair.metrics import predict
from repair.models import resolve_device

KEYSTATS_SAMPLES = 1024   # clean training images for C = K Kᵀ
# Training images (the last ones) on which the budget ε is checked (with `confirm`, as many again
# before them confirm each kept round: `budget_splits`); the test split stays unseen.
# 500 suits digits (1437 training images). On a data set of tens of thousands, check on more
# (`--validation 2000`): a rectification changes a few percent of the answers, so 500 images
# estimate a 1 pt drop only to about ± 1 pt (Fashion-MNIST ViT: `bench/results/rectify.md`).
VALIDATION_SAMPLES = 500
ANCHOR_SAMPLES = 64      # clean inputs held in place when a round that broke the budget is retried
MAX_STRESS = 10.0        # beyond, clipping leaves little but the corruption's sign
MAX_TRANSPLANT = 256     # each transplanted image is one more pair every optimisation step reads
# The check of a moved backdoor: the pairs' corruption carried onto this many clean training
# images (after the anchors, before the validation split), and the share of them that one
# class must take for the result to warn. Digits ViT (session 22): one pair's edits send
# 68-83 % of them to the pair's class (the backdoor moved: 99-100 % of triggered test images
# go there), twenty pairs' 10-15 % (a repair: 73-76 % of triggered test images right).
CARRY_SAMPLES = 256
MOVED_SHARE = 0.5
# The transplant takes training images to be clean. Where this share of them or more already
# holds a pair's corruption (the pixels it changes, each within HOLDS_TOLERANCE), the result
# warns: BlockDigits (every image has a null block, half of them where the pair's is) raised
# feature leakage 0.128 -> 0.225 with the transplant (bench/results/rectify.md, session 31). A
# spurious square on 70 % of one digit class is on 7 % of the training images.
ALREADY_CORRUPT_SHARE = 0.25
CHANGED_PIXEL = 0.1
HOLDS_TOLERANCE = 0.05
# Clean training images (right after the anchors) that each receive one pair's corruption and
# join the pairs (`repair.editing.dynamic`, "Transplanted pairs"): without them one pair's edit
# moves the backdoor to the pair's class. More of them generalise better, at the cost of every
# optimisation step reading them (one pair; 16 with Adam, session 23-24; 64 and 128 with L-BFGS,
# session 25): digits ViT 16 → 64: triggered test images right 63-74 → 86-88 %; Fashion-MNIST
# ResNet-18 ASR 13-18 % (16) → 3.7-6.9 % (64), 8.1 % with 128 (one pair).
TRANSPLANT_SAMPLES = 64


class RectifyError(ValueError):
    """Bad rectification input: shapes, no gap, label out of range, a non-editable layer."""


def _pair_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _as_batch(t, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise RectifyError(f"{name} must be a tensor, got {type(t).__name__}")
    t = t.detach().float().cpu()
    if t.dim() == len(shape):
        t = t.unsqueeze(0)
    if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != tuple(shape):
        raise RectifyError(f"{name} has shape {tuple(t.shape)}; the model expects {tuple(shape)} "
                           f"(or a batch of them)")
    if not torch.isfinite(t).all():
        raise RectifyError(f"{name} holds NaN or infinite values")
    return t


def _labels(label, n_pairs: int, n_classes: int) -> torch.Tensor:
    """One label for every pair, or one per pair, as a ``(n_pairs,)`` tensor."""
    given = [label] if isinstance(label, (int, np.integer)) else label
    if isinstance(given, (str, bytes)) or not isinstance(given, (list, tuple)):
        raise RectifyError(f"label must be a class index or a list of them, got {label!r}")
    if len(given) not in (1, n_pairs):
        raise RectifyError(f"{len(given)} labels for {n_pairs} pairs: give one label for all pairs or one per pair")
    for y in given:
        if isinstance(y, bool) or not isinstance(y, (int, np.integer)) or not 0 <= y < n_classes:
            raise RectifyError(f"label {y!r} is not one of the model's {n_classes} classes (0..{n_classes - 1})")
    return torch.tensor([int(y) for y in given] * (n_pairs // len(given)))


def _input_shape(manifest: dict) -> tuple[int, int, int]:
    pre = manifest.get("preprocessing", {})
    if manifest.get("kind") != "vision" or pre.get("kind") != "image":
        raise RectifyError("rectify_images needs a vision bundle")
    return pre["channels"], pre["height"], pre["width"]


def training_images(version) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean training inputs as the version's model sees them (leakage bundles: re-stacked with
    the null block from the recorded seed), labels alongside."""
    from offline.defects import block_images, block_positions

    m = version.manifest
    data = load_dataset(m["dataset"]["name"])
    x, y = data.x_train, data.y_train
    defect = m.get("defect", {})
    if defect.get("type") == "leakage":
        top = block_positions(len(x), defect["position_seed"])
        x = block_images(x, top, version.tensors("defect")["null_block"])
    return x, y


def budget_splits(x_train: torch.Tensor, y_train: torch.Tensor, validation: int, confirm: bool):
    """The budget's held-out splits, ``(val_x, val_y), (confirm_x, confirm_y)``: the last
    ``validation`` training images judge every round; with ``confirm`` the ``validation`` before
    them confirm the rounds kept (:mod:`repair.editing.dynamic`), else ``(None, None)``."""
    end = len(x_train) - validation
    confirmation = ((x_train[end - validation:end], y_train[end - validation:end]) if confirm
                    else (None, None))
    return (x_train[end:], y_train[end:]), confirmation


def edit_pool_end(n_train: int, validation: int, confirm: bool = False) -> int:
    """Training images before this index may be pairs, anchors, transplants or carried checks;
    those from it on are the budget's splits (:func:`budget_splits`; the confirmation split only
    with ``confirm``), which the edits never read."""
    return n_train - (2 if confirm else 1) * validation


def transplant_images(x_train: torch.Tensor, validation: int, count: int = TRANSPLANT_SAMPLES,
                      confirm: bool = False) -> torch.Tensor:
    """The clean training images that receive the pairs' corruption (right after the anchors,
    never in the budget's splits)."""
    return x_train[ANCHOR_SAMPLES:edit_pool_end(len(x_train), validation, confirm)][:count]


def rectify_images(bundle: str | Path, clean: torch.Tensor, corrupt: torch.Tensor,
                   label: int | list[int] | None = None, budget: float = 0.01, gap: float = 0.001,
                   static: bool = False, layer: str | None = None, progress: bool = True,
                   activate: bool = True, epochs: int = 100, max_rounds: int = MAX_ROUNDS,
                   device: str = "cpu", validation: int = VALIDATION_SAMPLES,
                   stress: float = STRESS, candidates: int = 1, min_gain: float = MIN_GAIN,
                   transplant: int = TRANSPLANT_SAMPLES, hold_anchors: bool = False,
                   confirm: bool = False) -> dict:
    """Rectify the current version with the pair(s) ``(clean, corrupt)``; see module docstring.

    ``clean``/``corrupt``: ``(C, H, W)`` in [0, 1] at the model's input size (or ``(n, C, H, W)``
    for n pairs). ``label``: the class the corrupt input(s) should get, one for every pair or a
    list with one per pair (default: what the model answers the clean input). ``validation``:
    how many of the last training images the budget is checked on; ``confirm``: each round kept
    must also stay within the budget on the ``validation`` images before them, or it is rolled
    back and the loop ends (:func:`budget_splits`, :mod:`repair.editing.dynamic`).
    ``stress``: the amplification of the stressed pairs that a round closing the gap must also
    help (0: off, the paper's loop; :mod:`repair.editing.dynamic`). ``candidates``: how many of
    ``Ĝ``'s top layers a round tries (1: Algorithm 1's argmax); ``min_gain``: the relative
    lowering of the gap a round must bring. ``transplant``: how many clean training images
    receive the pairs' corruption and join the pairs (0: the pairs alone, as in the paper).
    ``hold_anchors``: hold the anchors in every round, not only in the retry of a round that
    broke the budget (:mod:`repair.editing.dynamic`; for models whose first edit spends it).
    ``device``: cpu, cuda or auto; the new version's weights are stored from the CPU either way
    (the edits are the same; the digits ViT is no faster on an H100: ``rectify_timing_cuda.md``).
    The result's ``before`` / ``after`` hold ``carried`` (the pairs' corruption on clean
    training images: :func:`_carried`) and ``warnings`` says when the edit seems to have moved
    the backdoor to another class rather than removed it, and when the training images the
    transplant takes to be clean already hold the pairs' corruption (:func:`already_corrupt_share`).
    Raises :class:`RectifyError` before anything is written on bad input.
    """
    started = time.perf_counter()
    store = Bundle(bundle)
    try:
        parent = store.version()
    except BundleError as err:
        raise RectifyError(str(err)) from err
    shape = _input_shape(parent.manifest)
    clean_b, corrupt_b = _as_batch(clean, "clean", shape), _as_batch(corrupt, "corrupt", shape)
    if clean_b.shape != corrupt_b.shape:
        raise RectifyError(f"clean {tuple(clean_b.shape)} and corrupt {tuple(corrupt_b.shape)} "
                           f"differ in shape")
    if not 0 <= budget < 1 or not 0 <= gap < 1:
        raise RectifyError(f"budget and gap must lie in [0, 1), got {budget} and {gap}")
    if isinstance(stress, bool) or not isinstance(stress, (int, float)) or not (
            stress == 0 or 1 < stress <= MAX_STRESS):
        raise RectifyError(f"stress must be 0 (off) or lie in (1, {MAX_STRESS}], got {stress!r}")
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
        raise RectifyError(f"candidates must be a whole number of layers ≥ 1, got {candidates!r}")
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 0 <= min_gain < 1:
        raise RectifyError(f"min_gain must lie in [0, 1), got {min_gain!r}")
    if (isinstance(transplant, bool) or not isinstance(transplant, (int, np.integer))
            or not 0 <= transplant <= MAX_TRANSPLANT):
        raise RectifyError(f"transplant must be a whole number of images from 0 to {MAX_TRANSPLANT}, "
                           f"got {transplant!r}")
    if not isinstance(hold_anchors, bool):
        raise RectifyError(f"hold_anchors must be true or false, got {hold_anchors!r}")
    if not isinstance(confirm, bool):
        raise RectifyError(f"confirm must be true or false, got {confirm!r}")
    try:
        device = resolve_device(device)
    except ValueError as err:
        raise RectifyError(str(err)) from None
    model = parent.build_model(device)
    layers = editable_layers(model)
    if layer is not None and layer not in layers:
        raise RectifyError(f"{layer!r} is not an editable layer; editable: {', '.join(layers)}")
    n_classes = len(parent.manifest["labels"])
    clean_b, corrupt_b = clean_b.to(device), corrupt_b.to(device)
    with torch.no_grad():
        clean_pred = model(clean_b).argmax(-1)
        corrupt_pred = model(corrupt_b).argmax(-1)
    labels = clean_pred if label is None else _labels(label, len(clean_b), n_classes).to(device)
    gap_before = prediction_gap(model, clean_b, corrupt_b)
    if gap_before <= gap:
        raise RectifyError(f"the model already treats the clean and corrupt inputs the same "
                           f"(gap {gap_before:.2e} ≤ target gap {gap}); nothing to rectify")

    x_train, y_train = training_images(parent)
    # The anchors (the first training images) must not be among the images the budget reads:
    # `validation` of them, twice that with `confirm` (budget_splits).
    room = (len(x_train) - ANCHOR_SAMPLES) // (2 if confirm else 1)
    if (isinstance(validation, bool) or not isinstance(validation, (int, np.integer))
            or not 1 <= validation <= room):
        confirms = "; as many again confirm the budget" if confirm else ""
        raise RectifyError(f"validation must be a whole number of training images from 1 to {room} "
                           f"(this data set has {len(x_train)}, {ANCHOR_SAMPLES} of them anchors"
                           f"{confirms}), got {validation!r}")
    new_stats = None
    if parent.has("keystats"):
        stats = stats_from_tensors(parent.tensors("keystats"))
    else:
        stats = compute_keystats(model, list(layers.values()), x_train[:KEYSTATS_SAMPLES],
                                 progress=progress)
        new_stats = stats_to_tensors(stats)
    (val_x, val_y), (confirm_x, confirm_y) = budget_splits(x_train, y_train, validation, confirm)
    transplant_x = transplant_images(x_train, validation, transplant, confirm).to(device)
    # the check reads images the edit was not fitted on
    carry_x = x_train[ANCHOR_SAMPLES + len(transplant_x):edit_pool_end(len(x_train), validation, confirm)]
    carry_x = carry_x[:CARRY_SAMPLES].to(device)
    carried_before = _carried(model, clean_b, corrupt_b, carry_x)
    outcome = rectify(model, layers, stats, clean_b, corrupt_b, labels, val_x, val_y,
                      budget=budget, gap=gap, epochs=epochs, max_rounds=max_rounds, static=static,
                      layer=layer, progress=progress, anchors=x_train[:ANCHOR_SAMPLES].to(device),
                      stress=stress or None, candidates=int(candidates), min_gain=min_gain,
                      transplant=transplant_x, hold_anchors=hold_anchors,
                      confirm_x=confirm_x, confirm_y=confirm_y)

    pairs = [{"clean": _pair_hash(c), "corrupt": _pair_hash(k)} for c, k in zip(clean_b, corrupt_b)]
    edits = [{"method": "rank-one", "layer": e.layer, "round": i + 1,
              "weight_shape": list(layers[e.layer].module.weight.shape),
              "lambda": e.lam.tolist(), "direction": e.d.tolist(), "pairs": pairs,
              "labels": labels.tolist(), "loss_before": e.loss_before, "loss_after": e.loss_after,
              "steps": e.steps}
             for i, e in enumerate(outcome.edits)]
    with torch.no_grad():
        after_clean = model(clean_b).argmax(-1)
        after_corrupt = model(corrupt_b).argmax(-1)
    before = {"accuracy": outcome.accuracy_before, "confirm_accuracy": outcome.confirm_before,
              "gap": gap_before,
              "stress_gap": outcome.stress_gap_before,
              "clean_pred": clean_pred.tolist(), "corrupt_pred": corrupt_pred.tolist(),
              "carried": carried_before}
    after = {"accuracy": outcome.accuracy_after, "confirm_accuracy": outcome.confirm_after,
             "gap": prediction_gap(model, clean_b, corrupt_b),
             "stress_gap": outcome.stress_gap_after,
             "clean_pred": after_clean.tolist(), "corrupt_pred": after_corrupt.tolist(),
             "carried": _carried(model, clean_b, corrupt_b, carry_x)}
    warnings = _moved_backdoor(carried_before, after["carried"]) if outcome.edits else []
    warnings += _already_corrupt(already_corrupt_share(clean_b, corrupt_b, transplant_x), len(transplant_x))
    rounds = [{"layer": r.layer, "accuracy_drop": r.accuracy_drop, "gap": r.gap, "kept": r.kept,
               "anchored": r.anchored, "preserve": r.preserve, "stress_gap": r.stress_gap,
               "confirm_drop": r.confirm_drop, "round": r.round + 1,
               "completeness_error": r.completeness_error}
              for r in outcome.rounds]
    manifest = {k: v for k, v in parent.manifest.items()
                if k not in ("id", "parent", "created", "files")}
    manifest["rectification"] = {"mode": "layer" if layer else "static" if static else "dynamic",
                                 "budget": budget, "gap": gap, "validation": int(validation),
                                 "stress": stress, "candidates": int(candidates),
                                 "min_gain": min_gain, "transplant": len(transplant_x),
                                 "hold_anchors": hold_anchors, "confirm": confirm,
                                 "labels": labels.tolist(),
                                 "pairs": pairs, "rounds": rounds, "before": before, "after": after,
                                 "warnings": warnings}
    manifest["provenance"] = dict(parent.manifest.get("provenance", {}), created_by="rectify")
    manifest["metrics_version"] = parent.manifest.get("metrics_version", parent.id)  # metrics are the parent's
    tensors = {"model": state_dict_for_saving(model)}
    if new_stats is not None:
        tensors["keystats"] = new_stats
    version = store.write_version(manifest, tensors, edits=edits, parent=parent.id,
                                  activate=activate)
    return {"version": version.id, "parent": parent.id, "layers": [e.layer for e in outcome.edits],
            "rounds": len(outcome.rounds), "before": before, "after": after, "warnings": warnings,
            "seconds": round(time.perf_counter() - started, 3)}


def _carried(model, clean: torch.Tensor, corrupt: torch.Tensor, images: torch.Tensor) -> dict | None:
    """The pairs' corruption carried onto clean ``images``: the share whose answer it changes,
    and the class that takes the most of them with its share of all (None without images)."""
    if not len(images):
        return None
    plain = predict(model, images)
    carried = predict(model, carried_pairs(clean, corrupt, images))
    changed = carried[carried != plain]
    if not len(changed):
        return {"images": len(images), "changed": 0.0, "top_class": None, "top_share": 0.0}
    counts = torch.bincount(changed)
    return {"images": len(images), "changed": len(changed) / len(images),
            "top_class": int(counts.argmax()), "top_share": counts.max().item() / len(images)}


def _moved_backdoor(before: dict | None, after: dict | None) -> list[str]:
    """A warning when the edited model sends most images carrying the corruption to one class
    other than the one the parent sent them to: the edit moved the backdoor, not removed it."""
    if after is None or after["top_share"] < MOVED_SHARE or after["top_class"] == before["top_class"]:
        return []
    was = ("none changed" if before["top_class"] is None
           else f"{100 * before['top_share']:.0f} % answered {before['top_class']}")
    return [f"the edit may have moved the backdoor instead of removing it: with the pairs' "
            f"corruption carried onto {after['images']} clean training images, "
            f"{100 * after['top_share']:.0f} % of them are answered {after['top_class']} "
            f"(before: {was}); rectify with more pairs, of several classes"]


def already_corrupt_share(clean: torch.Tensor, corrupt: torch.Tensor, images: torch.Tensor) -> float:
    """The share of ``images`` that already hold one of the pairs' corruption: on the pixels the
    pair changes by more than ``CHANGED_PIXEL``, the image equals the corrupt input within
    ``HOLDS_TOLERANCE`` on average (0.0 without images)."""
    if not len(images):
        return 0.0
    holds = torch.zeros(len(images), dtype=torch.bool, device=images.device)
    for c, k in zip(clean, corrupt):
        changed = (k - c).abs().amax(0) > CHANGED_PIXEL          # (H, W): any channel
        if changed.any():
            off = (images - k).abs().amax(1)[:, changed].mean(1)  # per image, over those pixels
            holds |= off <= HOLDS_TOLERANCE
    return holds.float().mean().item()


def _already_corrupt(share: float, transplanted: int) -> list[str]:
    if share < ALREADY_CORRUPT_SHARE:
        return []
    return [f"{100 * share:.0f} % of the {transplanted} training images the pairs' corruption was "
            f"carried onto already hold it, so the edit fitted corruption on top of corruption; "
            f"if every training image carries the defect (e.g. a block or a watermark), "
            f"rectify with transplant 0"]


def prepare_keystats(bundle: str | Path, progress: bool = True, activate: bool = True) -> str:
    """Write a version that adds ``keystats.safetensors`` to the current one (same weights), so
    later rectification requests skip computing them; returns its id (the current id if present)."""
    store = Bundle(bundle)
    parent = store.version()
    if parent.has("keystats"):
        return parent.id
    model = parent.build_model()
    stats = compute_keystats(model, list(editable_layers(model).values()),
                             training_images(parent)[0][:KEYSTATS_SAMPLES], progress=progress)
    manifest = {k: v for k, v in parent.manifest.items()
                if k not in ("id", "parent", "created", "files")}
    manifest["provenance"] = dict(parent.manifest.get("provenance", {}), created_by="keystats")
    return store.write_version(manifest, {"keystats": stats_to_tensors(stats)}, parent=parent.id,
                               activate=activate).id


def load_png(path: str | Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """A PNG or JPEG file as ``(C, H, W)`` in [0, 1], decoded as the server decodes requests
    (:func:`repair.images.decode_image`: 8-bit only); it must already be the model's input size."""
    c, h, w = shape
    try:
        return decode_image(Path(path).read_bytes(), channels=c, height=h, width=w)
    except OSError as err:
        raise RectifyError(f"{path} is not a readable image: {err}") from err
    except ImageError as err:
        raise RectifyError(f"{path}: {err}") from err


def rectify_from_files(bundle, clean: str | list[str], corrupt: str | list[str], **kwargs) -> dict:
    """:func:`rectify_images` on PNG files, one clean and one corrupt file per pair (what
    ``repair-proxy rectify`` calls)."""
    clean, corrupt = ([clean] if isinstance(clean, (str, Path)) else list(clean),
                      [corrupt] if isinstance(corrupt, (str, Path)) else list(corrupt))
    if len(clean) != len(corrupt) or not clean:
        raise RectifyError(f"{len(clean)} clean and {len(corrupt)} corrupt files: give one of each per pair")
    try:
        shape = _input_shape(Bundle(bundle).version().manifest)
    except BundleError as err:
        raise RectifyError(str(err)) from err
    return rectify_images(bundle, torch.stack([load_png(p, shape) for p in clean]),
                          torch.stack([load_png(p, shape) for p in corrupt]), **kwargs)
