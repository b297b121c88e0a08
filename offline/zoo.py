"""The zoo of defective models: train a classifier with a planted defect, write a bundle.

``train_bundle`` is what ``repair-proxy zoo train`` calls; every run records in the manifest its
clean accuracy, attack success rate (ASR) or unfairness (UF), seed and data hash.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from offline.datasets import ImageData, load_dataset
from offline.defects import Trigger, badnets_trigger, blend_trigger
from offline.training import train_classifier
from repair.bundle import Bundle, BundleError, state_dict_for_saving
from repair.metrics import accuracy, attack_success_rate
from repair.models import build_model

# Small defaults that reach the floors on 2 CPU threads.
DEFAULT_ARCH = {
    "vit": dict(patch_size=4, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0),
    "hf-vit": dict(patch_size=4, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0),
    "resnet18": dict(),
}
DEFAULT_EPOCHS = {"digits": 30}
BACKDOORS = ("badnets", "blend")


def make_trigger(defect: str, shape, *, location: str = "br", visibility: float = 0.5,
                 seed: int = 0, size: int | None = None) -> Trigger:
    if defect == "badnets":
        return badnets_trigger(shape, size=size or max(2, shape[-1] // 5), location=location)
    if defect == "blend":
        return blend_trigger(shape, visibility=visibility, seed=seed)
    raise ValueError(f"unknown backdoor {defect!r}; known: {', '.join(BACKDOORS)}")


def poison(x: torch.Tensor, y: torch.Tensor, trigger: Trigger, target: int, rate: float,
           seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stamp the trigger on ``rate`` of the non-target training images and relabel them."""
    if not 0 < rate < 1:
        raise ValueError(f"poison rate must be in (0, 1), got {rate}")
    g = torch.Generator().manual_seed(seed)
    candidates = (y != target).nonzero().flatten()
    chosen = candidates[torch.randperm(len(candidates), generator=g)[: int(rate * len(y))]]
    x, y = x.clone(), y.clone()
    x[chosen] = trigger.apply(x[chosen])
    y[chosen] = target
    return x, y


def train_bundle(out: str | Path, *, dataset: str = "digits", arch: str = "vit",
                 defect: str = "none", target_class: int = 0, poison_rate: float = 0.1,
                 visibility: float = 0.5, location: str = "br", epochs: int | None = None,
                 seed: int = 0, arch_options: dict | None = None, progress: bool = True):
    """Train one zoo model and write it as the first version of a new bundle at ``out``."""
    bundle = Bundle(out)
    if bundle.exists():
        raise BundleError(f"{out} already holds a bundle; choose a new --out")
    data = load_dataset(dataset)
    if not isinstance(data, ImageData):
        raise NotImplementedError("tabular zoo models come with the data-set loaders")
    if not 0 <= target_class < len(data.classes):
        raise ValueError(f"--target-class {target_class} is not one of the {len(data.classes)} classes")
    torch.manual_seed(seed)
    c, h, _ = data.image_shape
    spec = {"arch": arch, **DEFAULT_ARCH.get(arch, {}), "img_size": h, "in_chans": c,
            "num_classes": len(data.classes), **(arch_options or {})}
    model = build_model(spec)
    x_train, y_train = data.x_train, data.y_train
    trigger, defect_info = None, {"type": defect}
    if defect in BACKDOORS:
        trigger = make_trigger(defect, data.image_shape, location=location, visibility=visibility, seed=seed)
        x_train, y_train = poison(x_train, y_train, trigger, target_class, poison_rate, seed)
        defect_info.update(target_class=target_class, poison_rate=poison_rate, location=location,
                           visibility=visibility)
    elif defect != "none":
        raise ValueError(f"unknown defect {defect!r}")
    epochs = epochs or DEFAULT_EPOCHS.get(dataset, 10)
    started = time.perf_counter()
    train_classifier(model, x_train, y_train, epochs=epochs, seed=seed, progress=progress,
                     desc=f"zoo {dataset}/{arch}/{defect}")
    train_seconds = time.perf_counter() - started
    metrics = {"accuracy": accuracy(model, data.x_test, data.y_test)}
    if trigger is not None:
        metrics["asr"] = attack_success_rate(model, trigger.apply(data.x_test), data.y_test, target_class)
    manifest = {
        "kind": data.kind,
        "architecture": spec,
        "labels": data.classes,
        "preprocessing": data.preprocessing(),
        "dataset": {"name": dataset, "hash": data.data_hash()},
        "defect": defect_info,
        "metrics": metrics,
        "provenance": {"created_by": "zoo train", "seed": seed, "epochs": epochs,
                       "train_seconds": round(train_seconds, 2)},
    }
    tensors = {"model": state_dict_for_saving(model)}
    if trigger is not None:
        tensors["defect"] = trigger.to_tensors()
    return bundle.write_version(manifest, tensors)
