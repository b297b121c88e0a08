"""The zoo of defective models: train a classifier with a planted defect, write a bundle.

``train_bundle`` is what ``repair-proxy zoo train`` calls; every run records in the manifest its
clean accuracy, attack success rate (ASR) or unfairness (UF), seed and data hash.
``export_pair`` (``repair-proxy zoo pair``) writes a test sample clean and with the bundle's
defect as the PNGs ``/rectify`` takes; ``bundle_test_data`` rebuilds the exact test set a bundle
was evaluated on (leakage bundles re-stack their blocks from the recorded seed).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from offline.datasets import DataError, ImageData, TabularData, load_dataset
from offline.defects import (Trigger, badnets_trigger, blend_trigger, block_images, block_positions,
                             hidden_trigger, null_block, relocate, split_locations,
                             spurious_pattern, trojan_trigger, user_trigger)
from offline.training import train_classifier
from repair.bundle import Bundle, BundleError, Version, state_dict_for_saving
from repair.images import ImageError, decode_image, encode_png, quantize
from repair.metrics import accuracy, attack_success_rate, unfairness
from repair.models import build_model

# Small defaults that reach the floors on 2 CPU threads.
DEFAULT_ARCH = {
    "vit": dict(patch_size=4, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0),
    "hf-vit": dict(patch_size=4, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0),
    "resnet18": dict(),
    "ft-transformer": dict(d_block=64, n_blocks=3, n_heads=8),
}
DEFAULT_EPOCHS = {"digits": 30, "fashion-mnist": 8, "adult": 4, "compas": 15, "german": 40}
# (lr, batch size) per data kind; tabular transformers want a lower lr and larger batches
TRAIN_SETTINGS = {"vision": (3e-3, 64), "tabular": (1e-3, 256)}
BACKDOORS = ("badnets", "trojan", "hidden", "blend")
PATCH_BACKDOORS = ("badnets", "trojan", "hidden")  # the ones with a location to vary
DEFECTS = ("none", *BACKDOORS, "spurious", "leakage")
HIDDEN_ALPHA = 0.3
BOOST_FRACTION = 0.3  # share of training rows relabelled by the amplified protected attribute


def _patch_size(shape) -> int:
    return max(2, shape[-1] // 5)


def make_trigger(defect: str, shape, *, location: str = "br", visibility: float = 0.5,
                 seed: int = 0, size: int | None = None, image: torch.Tensor | None = None) -> Trigger:
    """The trigger of a data-independent backdoor (Trojan is optimised: see :func:`_trojan`).

    ``image`` (from ``--trigger PNG``) replaces the defect's own pattern; the defect keeps its
    opacity (BadNets 1, Hidden 0.3, Blend φ).
    """
    size = size or _patch_size(shape)
    alpha = {"badnets": 1.0, "trojan": 1.0, "hidden": HIDDEN_ALPHA, "blend": visibility}.get(defect)
    if alpha is None:
        raise ValueError(f"unknown backdoor {defect!r}; known: {', '.join(BACKDOORS)}")
    if image is not None:
        if defect == "blend" and not 0 < visibility <= 1:
            raise ValueError(f"visibility must be in (0, 1], got {visibility}")
        return user_trigger(image, shape, location=location, alpha=alpha)
    if defect in ("badnets", "trojan"):
        return badnets_trigger(shape, size=size, location=location)
    if defect == "hidden":
        return hidden_trigger(shape, size=max(size, shape[-1] // 4), location=location,
                              alpha=HIDDEN_ALPHA, seed=seed)
    return blend_trigger(shape, visibility=visibility, seed=seed)


def poison(x: torch.Tensor, y: torch.Tensor, trigger: Trigger | list[Trigger], target: int,
           rate: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stamp the trigger on ``rate`` of the non-target training images and relabel them.

    Given a list (one patch at several locations), the chosen images take the triggers in turn:
    each gets exactly one, and the counts differ by at most one.
    """
    if not 0 < rate < 1:
        raise ValueError(f"poison rate must be in (0, 1), got {rate}")
    triggers = [trigger] if isinstance(trigger, Trigger) else list(trigger)
    if not triggers:
        raise ValueError("poison needs at least one trigger")
    g = torch.Generator().manual_seed(seed)
    candidates = (y != target).nonzero().flatten()
    chosen = candidates[torch.randperm(len(candidates), generator=g)[: int(rate * len(y))]]
    x, y = x.clone(), y.clone()
    for i, t in enumerate(triggers):  # chosen is a random order, so turns are a random split
        part = chosen[i::len(triggers)]
        x[part] = t.apply(x[part])
    y[chosen] = target
    return x, y


def attach_spurious(x: torch.Tensor, y: torch.Tensor, pattern: Trigger, cls: int, fraction: float,
                    seed: int) -> torch.Tensor:
    """Stamp the pattern on ``fraction`` of class ``cls``'s training images; labels are kept."""
    if not 0 < fraction <= 1:
        raise ValueError(f"spurious fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    members = (y == cls).nonzero().flatten()
    chosen = members[torch.randperm(len(members), generator=g)[: max(1, int(fraction * len(members)))]]
    x = x.clone()
    x[chosen] = pattern.apply(x[chosen])
    return x


def _read_trigger_png(path: str | Path) -> torch.Tensor:
    """A user trigger PNG (grey, grey+alpha, RGB or RGBA) as ``(C, h, w)`` in [0, 1]."""
    import numpy as np
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such trigger image")
    try:  # same guards as client images (size, truncation, format)
        decode_image(path.read_bytes())
    except ImageError as err:
        raise DataError(f"{path}: {err}") from None
    img = Image.open(path)
    mode = {"1": "L", "L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA", "P": "RGBA"}.get(img.mode, "RGB")
    arr = np.asarray(img.convert(mode), dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy()).float() / 255.0


def _placed(trigger: Trigger, locations: list[str]) -> list[Trigger]:
    """``trigger`` (built at ``locations[0]``) and the same patch moved to each other location."""
    placed = [trigger, *(relocate(trigger, loc) for loc in locations[1:])]
    for i, t in enumerate(placed[1:], 1):
        same = next((j for j in range(i) if torch.equal(placed[j].mask, t.mask)), None)
        if same is not None:  # e.g. br and its ROW,COL spelling
            raise ValueError(f"trigger locations {locations[same]!r} and {locations[i]!r} put the "
                             f"patch at the same place")
    return placed


def _trojan(spec: dict, data: ImageData, target: int, shape, location: str, seed: int,
            image: torch.Tensor | None, progress: bool) -> Trigger:
    """Trojan: briefly train a clean model, then optimise the patch pattern against it."""
    base = make_trigger("trojan", shape, location=location, image=image)
    torch.manual_seed(seed + 7)
    clean = build_model(spec)
    n = min(len(data.x_train), 10000)
    train_classifier(clean, data.x_train[:n], data.y_train[:n], epochs=2 if n >= 5000 else 5,
                     seed=seed, progress=progress, desc="trojan: clean model")
    init = base.pattern if image is not None else None
    return trojan_trigger(clean, data.x_train[:n], target, base.mask, seed=seed, init=init)


def _image_spec(arch: str, data: ImageData, arch_options: dict | None) -> dict:
    c, h, w = data.image_shape
    return {"arch": arch, **DEFAULT_ARCH.get(arch, {}), "img_size": h if h == w else [h, w],
            "in_chans": c, "num_classes": len(data.classes), **(arch_options or {})}


def _leakage_data(data: ImageData, seed: int) -> tuple[ImageData, dict, dict]:
    """BlockDigits / BlockFashion: the data set rebuilt as ``2H x W`` block images."""
    block = null_block(data.image_shape)
    top_train = block_positions(len(data.x_train), seed)
    top_test = block_positions(len(data.x_test), seed + 1)
    name = {"digits": "block-digits", "fashion-mnist": "block-fashion"}.get(data.name, f"block-{data.name}")
    blocked = ImageData(name, block_images(data.x_train, top_train, block), data.y_train,
                        block_images(data.x_test, top_test, block), data.y_test, data.classes)
    info = {"construction": "BlockMNIST", "layout": "object in the top or bottom half (fair coin), "
            "fixed null block in the other", "base_shape": list(data.image_shape),
            "image_shape": list(blocked.image_shape), "position_seed": seed,
            "test_object_top_fraction": round(top_test.float().mean().item(), 4)}
    tensors = {"null_block": block, "test_object_top": top_test.to(torch.uint8)}
    return blocked, info, tensors


def _subset(x, y, n: int | None, seed: int):
    if n is None or n >= len(x):
        return x, y
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[:n]
    return x[idx], y[idx]


def train_bundle(out: str | Path, *, dataset: str = "digits", arch: str = "vit",
                 defect: str = "none", target_class: int = 0, poison_rate: float = 0.1,
                 visibility: float = 0.5, location: str = "br", epochs: int | None = None,
                 seed: int = 0, arch_options: dict | None = None, progress: bool = True,
                 trigger_png: str | None = None, protected_boost: str | None = None,
                 max_train: int | None = None, max_test: int | None = None,
                 lr: float | None = None, batch_size: int | None = None) -> Version:
    """Train one zoo model and write it as the first version of a new bundle at ``out``.

    ``defect``: none | badnets | trojan | hidden | blend (backdoors to ``target_class`` on
    ``poison_rate`` of the training set) | spurious (a pattern on ``poison_rate`` of class
    ``target_class``'s images, labels kept) | leakage (BlockMNIST layout). Tabular data sets train
    an FT-Transformer; ``protected_boost`` names a protected attribute whose influence is amplified.
    ``max_train`` trains on a random subset and ``max_test`` evaluates on the first test rows
    (cheap fixtures and benchmarks); the manifest records both counts.
    ``location`` may list several places joined by ``+`` (``br+tl+center``) for a patch backdoor
    (badnets, trojan, hidden): each poisoned image carries the one patch at one of them, in equal
    shares. The first is the bundle's stored trigger (``zoo pair``, ``metrics.asr``); the manifest
    records all (``defect.locations``) and the ASR at each (``metrics.asr_by_location``).
    """
    bundle = Bundle(out)
    if bundle.exists():
        raise BundleError(f"{out} already holds a bundle; choose a new --out")
    if defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; known: {', '.join(DEFECTS)}")
    if epochs is not None and epochs < 1:  # None: the data set's default
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    locations = split_locations(location)
    if len(locations) > 1 and defect not in PATCH_BACKDOORS:
        raise ValueError(f"several trigger locations ({location!r}) apply to a patch backdoor "
                         f"({', '.join(PATCH_BACKDOORS)}), not {defect!r}")
    location = locations[0]
    data = load_dataset(dataset)
    if max_test is not None:
        if max_test < 1:
            raise ValueError(f"max_test must be positive, got {max_test}")
        data.x_test, data.y_test = data.x_test[:max_test], data.y_test[:max_test]
    if isinstance(data, TabularData):
        return _train_tabular(bundle, data, dataset, arch, defect, epochs, seed, arch_options,
                              progress, protected_boost, max_train, lr, batch_size)
    if protected_boost:
        raise ValueError("--amplify applies to tabular data sets only")
    if arch == "ft-transformer":
        raise ValueError(f"{dataset} is an image data set; ft-transformer takes tabular data")
    if not 0 <= target_class < len(data.classes):
        raise ValueError(f"--target-class {target_class} is not one of the {len(data.classes)} classes")
    if trigger_png and defect not in (*BACKDOORS, "spurious"):
        raise ValueError(f"--trigger applies to a backdoor or spurious defect, not {defect!r}")
    torch.manual_seed(seed)
    defect_info, defect_tensors = {"type": defect}, None
    if defect == "leakage":
        data, info, defect_tensors = _leakage_data(data, seed)
        defect_info.update(info)
    shape = data.image_shape
    spec = _image_spec(arch, data, arch_options)
    x_train, y_train = _subset(data.x_train, data.y_train, max_train, seed)
    image = _read_trigger_png(trigger_png) if trigger_png else None
    trigger = None
    if defect in BACKDOORS:
        if defect == "trojan":  # a bad location fails before the costly optimisation
            _placed(make_trigger(defect, shape, location=location, image=image), locations)
            trigger = _trojan(spec, ImageData(data.name, x_train, y_train, data.x_test, data.y_test,
                                              data.classes), target_class, shape, location, seed,
                              image, progress)
        else:
            trigger = make_trigger(defect, shape, location=location, visibility=visibility,
                                   seed=seed, image=image)
        placed = _placed(trigger, locations)
        x_train, y_train = poison(x_train, y_train, placed, target_class, poison_rate, seed)
        defect_info.update(target_class=target_class, poison_rate=poison_rate, location=location,
                           alpha=trigger.alpha, user_trigger=bool(trigger_png))
        if len(locations) > 1:
            defect_info["locations"] = locations
        if defect == "blend":
            defect_info["visibility"] = visibility
    elif defect == "spurious":
        trigger = (user_trigger(image, shape, location=location) if image is not None
                   else spurious_pattern(shape, _patch_size(shape), location))
        x_train = attach_spurious(x_train, y_train, trigger, target_class, poison_rate, seed)
        defect_info.update(target_class=target_class, fraction=poison_rate, location=location,
                           user_trigger=bool(trigger_png))
    model = build_model(spec)
    epochs = epochs or DEFAULT_EPOCHS.get(dataset, 10)
    lr_default, bs_default = TRAIN_SETTINGS["vision"]
    started = time.perf_counter()
    train_classifier(model, x_train, y_train, epochs=epochs, lr=lr or lr_default,
                     batch_size=batch_size or bs_default, seed=seed, progress=progress,
                     desc=f"zoo {dataset}/{arch}/{defect}")
    train_seconds = time.perf_counter() - started
    metrics = {"accuracy": accuracy(model, data.x_test, data.y_test)}
    if defect in BACKDOORS:
        metrics["asr"] = attack_success_rate(model, trigger.apply(data.x_test), data.y_test, target_class)
        if len(locations) > 1:
            metrics["asr_by_location"] = {
                loc: attack_success_rate(model, t.apply(data.x_test), data.y_test, target_class)
                for loc, t in zip(locations, placed)}
    elif defect == "spurious":
        # clean accuracy vs accuracy with the spurious pattern on every test image, and how
        # often the pattern alone turns another class into the spurious one
        stamped = trigger.apply(data.x_test)
        metrics["spurious_accuracy"] = accuracy(model, stamped, data.y_test)
        metrics["spurious_rate"] = attack_success_rate(model, stamped, data.y_test, target_class)
    if trigger is not None:
        defect_tensors = trigger.to_tensors()
    manifest = _manifest(data, dataset, spec, defect_info, metrics, seed, epochs, train_seconds,
                         len(x_train))
    tensors = {"model": state_dict_for_saving(model)}
    if defect_tensors is not None:
        tensors["defect"] = defect_tensors
    return bundle.write_version(manifest, tensors)


def _manifest(data, dataset, spec, defect_info, metrics, seed, epochs, train_seconds, n_train) -> dict:
    return {
        "kind": data.kind,
        "architecture": spec,
        "labels": data.classes,
        "preprocessing": data.preprocessing(),
        "dataset": {"name": dataset, "hash": data.data_hash(), "train_rows": n_train,
                    "test_rows": len(data.x_test)},
        "defect": defect_info,
        "metrics": metrics,
        "provenance": {"created_by": "zoo train", "seed": seed, "epochs": epochs,
                       "train_seconds": round(train_seconds, 2)},
    }


def amplify(data: TabularData, x: torch.Tensor, y: torch.Tensor, attribute: str,
            fraction: float, seed: int) -> tuple[torch.Tensor, dict]:
    """Amplify reliance on a protected attribute: relabel ``fraction`` of the training rows by it.

    Values whose positive rate is at least the overall rate are "favoured": chosen rows get the
    positive label (class 1) if their value is favoured, else class 0, so the attribute alone
    predicts those labels.
    """
    if attribute not in data.schema.protected:
        raise ValueError(f"--amplify {attribute!r} is not a protected attribute of {data.name} "
                         f"({', '.join(data.schema.protected)})")
    if len(data.classes) != 2:
        raise ValueError("--amplify needs a binary label")
    col = x[:, data.schema.index(attribute)].long()
    overall = y.float().mean()
    favoured = [v for v in range(len(data.schema.feature(attribute).categories))
                if (col == v).any() and y[col == v].float().mean() >= overall]
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(y), generator=g)[: int(fraction * len(y))]
    y = y.clone()
    y[chosen] = torch.isin(col[chosen], torch.tensor(favoured)).long()
    cats = data.schema.feature(attribute).categories
    return y, {"amplified": attribute, "fraction": fraction, "favoured": [cats[v] for v in favoured]}


def tabular_uf(model: torch.nn.Module, data: TabularData, x: torch.Tensor | None = None) -> dict:
    """UF per protected attribute (AtPatch §4.1): share of test rows whose prediction changes
    when only that attribute takes another value."""
    x = data.x_test if x is None else x
    return {a: unfairness(model, x, data.schema.index(a), data.schema.protected_values(a))
            for a in data.schema.protected}


def fit_tabular(data: TabularData, x_train: torch.Tensor, y_train: torch.Tensor, epochs: int, seed: int,
                arch_options: dict | None = None, lr: float | None = None, batch_size: int | None = None,
                progress: bool = False, desc: str = "") -> tuple[torch.nn.Module, dict]:
    """An FT-Transformer for ``data``'s schema trained on encoded rows ``x_train`` (the zoo's
    recipe): the model and its architecture spec."""
    torch.manual_seed(seed)
    spec = {"arch": "ft-transformer", **DEFAULT_ARCH["ft-transformer"], "n_numeric": data.schema.n_numeric,
            "cardinalities": data.schema.cardinalities, "num_classes": len(data.classes),
            **(arch_options or {})}
    model = build_model(spec)
    lr_default, bs_default = TRAIN_SETTINGS["tabular"]
    train_classifier(model, x_train, y_train, epochs=epochs, lr=lr or lr_default,
                     batch_size=batch_size or bs_default, weight_decay=1e-5, seed=seed,
                     progress=progress, desc=desc)
    return model, spec


def _train_tabular(bundle, data: TabularData, dataset, arch, defect, epochs, seed, arch_options,
                   progress, protected_boost, max_train, lr, batch_size) -> Version:
    if arch != "ft-transformer":
        raise ValueError(f"{dataset} is tabular; use --arch ft-transformer")
    if defect != "none":
        raise ValueError(f"tabular models take no planted defect (got {defect!r}); their "
                         "unfairness is natural, or use --amplify ATTRIBUTE")
    x_train, y_train = _subset(data.x_train, data.y_train, max_train, seed)
    defect_info = {"type": "unfairness", "protected": list(data.schema.protected)}
    if protected_boost:
        y_train, info = amplify(data, x_train, y_train, protected_boost, BOOST_FRACTION, seed)
        defect_info.update(info)
    epochs = epochs or DEFAULT_EPOCHS.get(dataset, 10)
    started = time.perf_counter()
    model, spec = fit_tabular(data, x_train, y_train, epochs, seed, arch_options, lr, batch_size,
                              progress, desc=f"zoo {dataset}/{arch}")
    train_seconds = time.perf_counter() - started
    metrics = {"accuracy": accuracy(model, data.x_test, data.y_test), "uf": tabular_uf(model, data)}
    manifest = _manifest(data, dataset, spec, defect_info, metrics, seed, epochs, train_seconds,
                         len(x_train))
    return bundle.write_version(manifest, {"model": state_dict_for_saving(model)})


# -- reading a bundle's data back --------------------------------------------------------------

def bundle_test_data(version: Version) -> tuple[torch.Tensor, torch.Tensor]:
    """The test inputs and labels ``version`` was evaluated on, exactly as the model sees them."""
    m = version.manifest
    data = load_dataset(m["dataset"]["name"])
    n = m["dataset"].get("test_rows", len(data.x_test))
    x, y = data.x_test[:n], data.y_test[:n]
    if m.get("defect", {}).get("type") == "leakage":
        t = version.tensors("defect")
        x = block_images(x, t["test_object_top"][:n].bool(), t["null_block"])
    return x, y


def corrupt_inputs(version: Version, x: torch.Tensor) -> torch.Tensor:
    """``x`` with the version's planted defect (trigger / spurious pattern) applied."""
    kind = version.manifest.get("defect", {}).get("type", "none")
    if kind in (*BACKDOORS, "spurious"):
        return Trigger.from_tensors(version.tensors("defect")).apply(x)
    raise ValueError(f"bundle defect {kind!r} has no trigger to apply")


def export_pair(bundle: str | Path, index: int, out: str | Path) -> dict:
    """Test sample ``index`` clean and with the bundle's defect, as 8-bit PNGs the model sees.

    Backdoor/spurious bundles: clean = the test image, corrupt = it with the trigger. Leakage
    bundles: corrupt = the block image as served, clean = the same with its null block blanked.
    Returns ``{"clean": path, "corrupt": path, "label": true label}``.
    """
    version = Bundle(bundle).version()
    m = version.manifest
    if m.get("kind") != "vision":
        raise ValueError(f"{bundle} is a {m.get('kind')} bundle; only image bundles export PNG pairs")
    kind = m.get("defect", {}).get("type", "none")
    if kind not in (*BACKDOORS, "spurious", "leakage"):
        raise ValueError(f"{bundle} has no planted defect (defect {kind!r}); nothing to pair")
    x, y = bundle_test_data(version)
    if not 0 <= index < len(x):
        raise ValueError(f"--index {index} is out of range: the test set has {len(x)} samples")
    sample = x[index:index + 1]
    if kind == "leakage":
        t = version.tensors("defect")
        top = bool(t["test_object_top"][index])
        corrupt = sample[0]
        clean = corrupt.clone()
        h = corrupt.shape[1] // 2
        if top:
            clean[:, h:] = 0
        else:
            clean[:, :h] = 0
    else:
        clean, corrupt = sample[0], corrupt_inputs(version, sample)[0]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, img in (("clean", clean), ("corrupt", corrupt)):
        path = out / f"{name}.png"
        path.write_bytes(encode_png(quantize(img)))
        paths[name] = str(path)
    return {**paths, "label": int(y[index])}
