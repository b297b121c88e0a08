"""Shared helpers of the rectification benchmarks: zoo bundles, pairs, evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from offline.datasets import load_dataset
from offline.defects import Trigger, blend_trigger
from offline.rectify import (ANCHOR_SAMPLES, VALIDATION_SAMPLES, budget_splits, edit_pool_end,
                             transplant_images)
from repair.bundle import Bundle
from repair.editing.keystats import compute_keystats, stats_from_tensors
from repair.editing.layers import editable_layers
from repair.metrics import accuracy, attack_success_rate, predict, worst_class_asr


# dynamic: Algorithm 1 with the stressed and transplanted pairs (the default); dynamic-paper: without them
PAPER_LOOP = ("dynamic-paper", "static")  # as the paper runs them: no stressed pairs
ARCH_NAMES = {"vit": "ViT", "resnet18": "ResNet-18"}  # how the result files name the architectures
METHODS = ("dynamic", "dynamic-paper", "static", "finetune")


CACHE = Path("/tmp/rect-bench")  # the benchmarks' trained zoo models, kept between runs


def cached_zoo_bundle(cache: Path, dataset: str, arch: str, defect: str = "blend", name: str | None = None,
                      target_class: int = 0, **zoo) -> Path:
    """The zoo bundle cached under ``cache`` (trained on first use; ``zoo``: ``train_bundle``'s
    options, e.g. ``max_train``, ``epochs``, ``poison_rate``). ``name`` stands for the defect and
    its options in the folder's name; ``epochs`` and ``max_train`` are always in it, so a run with
    other zoo settings never reuses a model trained with different ones."""
    from offline.zoo import train_bundle

    sized = "".join(f"-{zoo[k]}" for k in ("epochs", "max_train") if zoo.get(k))
    path = Path(cache) / f"{dataset}-{arch}-{name or defect}{sized}"
    if not (path / "CURRENT").exists():
        train_bundle(path, dataset=dataset, arch=arch, defect=defect, target_class=target_class,
                     seed=0, progress=False, **zoo)
    return path


class Setup:
    """A bundle's model, trigger, data, editable layers and key statistics."""

    def __init__(self, bundle: Path, max_test: int | None = None, validation: int = VALIDATION_SAMPLES,
                 confirm: bool = False):
        version = Bundle(bundle).version()
        self.version = version
        self.model = version.build_model()
        self.trigger = Trigger.from_tensors(version.tensors("defect"))
        self.target = version.manifest["defect"]["target_class"]
        self.data = load_dataset(version.manifest["dataset"]["name"])
        if max_test is not None:  # evaluate on the first test rows only (large data sets)
            self.data.x_test, self.data.y_test = self.data.x_test[:max_test], self.data.y_test[:max_test]
        self.layers = editable_layers(self.model)
        if version.has("keystats"):
            self.stats = stats_from_tensors(version.tensors("keystats"))
        else:
            self.stats = compute_keystats(self.model, list(self.layers.values()),
                                          self.data.x_train[:1024], progress=False)
        self.weights = {k: v.clone() for k, v in self.model.state_dict().items()}
        # the budget's validation split: the last training images, never drawn as pairs; with
        # `confirm`, the dynamic loop confirms its rounds on as many before them (None: off)
        self.validation, self.confirm = validation, confirm
        (self.val_x, self.val_y), (self.confirm_x, self.confirm_y) = budget_splits(
            self.data.x_train, self.data.y_train, validation, confirm)
        self.anchors = self.data.x_train[:ANCHOR_SAMPLES]  # as `repair-proxy rectify` holds them
        # and transplants onto
        self.transplant = transplant_images(self.data.x_train, validation, confirm=confirm)
        self.base = self.evaluate()
        # the non-target clean test images the model answers with the target (no trigger)
        self.base["clean_to_target"] = attack_success_rate(self.model, self.data.x_test,
                                                           self.data.y_test, self.target)

    def reset(self):
        self.model.load_state_dict(self.weights)

    def pairs(self, n: int, trial: int):
        """n training images of non-target classes (seeded), clean and with the trigger."""
        g = torch.Generator().manual_seed(1000 + trial)
        end = edit_pool_end(len(self.data.y_train), self.validation, self.confirm)
        pool = (self.data.y_train[:end] != self.target).nonzero().flatten()
        idx = pool[torch.randperm(len(pool), generator=g)[:n]]
        clean = self.data.x_train[idx]
        return clean, self.trigger.apply(clean), self.data.y_train[idx]

    def evaluate(self, visibilities=()) -> dict:
        x, y = self.data.x_test, self.data.y_test
        triggered = self.trigger.apply(x)
        asr_worst, worst_class = worst_class_asr(self.model, triggered, y)
        out = {"oa": accuracy(self.model, x, y),
               "asr": attack_success_rate(self.model, triggered, y, self.target),
               "asr_flip": trigger_flip_rate(self.model, x, triggered, y, self.target),
               # a repair restores the labels; an edit that sends the trigger elsewhere does not
               "oa_triggered": accuracy(self.model, triggered, y),
               "asr_worst": asr_worst, "worst_class": worst_class}
        for phi in visibilities:
            t = blend_trigger(self.trigger.pattern.shape, visibility=phi, pattern=self.trigger.pattern)
            out[f"asr@{phi}"] = attack_success_rate(self.model, t.apply(x), y, self.target)
        return out


def trigger_flip_rate(model, clean: torch.Tensor, triggered: torch.Tensor, y: torch.Tensor,
                      target: int) -> float:
    """ASR counting only inputs whose *clean* answer is not the target. Plain ASR also counts
    the non-target images a model answers with the target without any trigger (the Fashion-MNIST
    ResNet-18 answers 2.2 % of the other classes' clean test images "T-shirt", the target), so
    it cannot go below that floor without the edit changing clean answers."""
    keep = (y != target) & (predict(model, clean) != target)
    return (predict(model, triggered[keep]) == target).float().mean().item()


def write_results(name: str, payload: dict, markdown: str) -> None:
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (out / f"{name}.md").write_text(markdown)
