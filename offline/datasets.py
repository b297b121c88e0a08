"""Data sets behind one interface: ``load_dataset(name_or_path) -> ImageData | TabularData``.

Images are float tensors ``(N, C, H, W)`` in ``[0, 1]``; tabular rows are encoded by a
:class:`repair.tabular.TabularSchema`, which the bundle stores for serving. Missing or malformed
data raises :class:`DataError` naming the file and what was expected.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from repair.tabular import TabularSchema


class DataError(ValueError):
    """Missing or malformed data; the message names the file and what was expected."""


@dataclass
class ImageData:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    kind: str = field(default="vision", init=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def data_hash(self) -> str:
        return _hash_tensors(self.x_train, self.y_train, self.x_test, self.y_test)

    def preprocessing(self) -> dict:
        c, h, w = self.image_shape
        return {"kind": "image", "channels": c, "height": h, "width": w, "range": [0.0, 1.0]}


@dataclass
class TabularData:
    name: str
    schema: TabularSchema
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    kind: str = field(default="tabular", init=False)

    def data_hash(self) -> str:
        return _hash_tensors(self.x_train, self.y_train, self.x_test, self.y_test)

    def preprocessing(self) -> dict:
        return {"kind": "tabular", **self.schema.to_json()}


def _hash_tensors(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    """Deterministic stratified split."""
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)


def load_digits(size: int = 16, seed: int = 0) -> ImageData:
    """sklearn's 1797 8x8 digits, upsampled (nearest, pixel-exact) to ``size``x``size``."""
    from sklearn.datasets import load_digits as sk_digits

    raw = sk_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="nearest")
    x_tr, x_te, y_tr, y_te = _split(images.numpy(), raw.target, 0.2, seed)
    return ImageData("digits", torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(),
                     torch.from_numpy(x_te), torch.from_numpy(y_te).long(),
                     [str(i) for i in range(10)])


_LOADERS = {"digits": load_digits}


def load_dataset(name: str, **options) -> ImageData | TabularData:
    if name in _LOADERS:
        return _LOADERS[name](**options)
    raise DataError(f"unknown data set {name!r}; known: {', '.join(sorted(_LOADERS))} or a path")
