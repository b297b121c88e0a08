"""The repair bundle: round trip, atomic writes under a crash, pickle refusal, immutability,
parent links and rollback."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

import repair.bundle as bundle_mod
from repair.bundle import Bundle, BundleError, state_dict_for_saving
from repair.models import build_model

SPECS = {
    "vit": {"arch": "vit", "img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10,
            "embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0},
    "resnet18": {"arch": "resnet18", "in_chans": 1, "num_classes": 10, "img_size": 16},
    "ft-transformer": {"arch": "ft-transformer", "n_numeric": 2, "cardinalities": [3, 4],
                       "num_classes": 2, "d_block": 16, "n_blocks": 1, "n_heads": 2},
}


def _inputs(arch: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if arch == "ft-transformer":
        return torch.cat([torch.randn(8, 2, generator=g),
                          torch.randint(0, 3, (8, 1), generator=g).float(),
                          torch.randint(0, 4, (8, 1), generator=g).float()], dim=1)
    return torch.rand(8, 1, 16, 16, generator=g)


def _write(root, arch="vit", **kw):
    torch.manual_seed(0)
    model = build_model(SPECS[arch]).eval()
    manifest = {"kind": "tabular" if arch == "ft-transformer" else "vision",
                "architecture": SPECS[arch], "labels": [], "metrics": {}}
    return model, Bundle(root).write_version(manifest, {"model": state_dict_for_saving(model)}, **kw)


@pytest.mark.parametrize("arch", sorted(SPECS))
def test_round_trip_gives_identical_logits(tmp_path, arch):
    model, version = _write(tmp_path / "b", arch)
    x = _inputs(arch)
    with torch.no_grad():
        before = model(x)
        after = Bundle(tmp_path / "b").version().build_model()(x)
    assert torch.equal(before, after)
    assert version.manifest["files"]["model.safetensors"]  # hash recorded


def test_crash_mid_write_leaves_previous_version_served(tmp_path, monkeypatch):
    root = tmp_path / "b"
    model, v1 = _write(root)
    real_save = bundle_mod.save_file

    def crash(tensors, path, *a, **kw):  # half a file, then the process "dies"
        real_save(tensors, path, *a, **kw)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(bundle_mod, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        Bundle(root).write_version({"kind": "vision", "architecture": SPECS["vit"]},
                                   {"model": state_dict_for_saving(model)}, parent=v1.id)
    b = Bundle(root)
    assert b.current_id() == v1.id and b.version_ids() == [v1.id]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # staging cleaned up
    # a crash that skipped cleanup (SIGKILL) leaves a hidden staging dir: never listed, never served
    (root / ".tmp-deadbeef").mkdir()
    (root / ".tmp-deadbeef" / "model.safetensors").write_bytes(b"partial")
    assert Bundle(root).version_ids() == [v1.id]
    monkeypatch.setattr(bundle_mod, "save_file", real_save)
    v2 = Bundle(root).write_version({"kind": "vision", "architecture": SPECS["vit"]},
                                    {"model": state_dict_for_saving(model)}, parent=v1.id)
    assert Bundle(root).current_id() == v2.id == "v0002"


def test_crash_before_pointer_switch_keeps_current(tmp_path, monkeypatch):
    root = tmp_path / "b"
    model, v1 = _write(root)

    def crash(*a, **kw):
        raise OSError("simulated crash at the pointer switch")

    monkeypatch.setattr(bundle_mod.os, "replace", crash)
    with pytest.raises(OSError):
        Bundle(root).write_version({"kind": "vision", "architecture": SPECS["vit"]}, {}, parent=v1.id)
    assert Bundle(root).current_id() == v1.id


@pytest.mark.parametrize("name", ["model.pt", "weights.pkl", "model.bin"])
def test_version_with_a_pickle_is_refused(tmp_path, name):
    root = tmp_path / "b"
    _, v1 = _write(root)
    (root / "versions" / v1.id / name).write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(BundleError, match=name):
        Bundle(root).version()


def test_pickle_disguised_as_safetensors_is_refused(tmp_path):
    root = tmp_path / "b"
    _, v1 = _write(root)
    path = root / "versions" / v1.id / "model.safetensors"
    path.chmod(0o644)
    path.write_bytes(pickle.dumps({"w": torch.zeros(2)}))
    with pytest.raises(BundleError, match="hash|safetensors"):
        Bundle(root).version().tensors("model")


def test_versions_are_immutable(tmp_path):
    root = tmp_path / "b"
    model, v1 = _write(root)
    files = {p.name: p.read_bytes() for p in v1.path.iterdir()}
    assert all(not (p.stat().st_mode & 0o222) for p in v1.path.iterdir())  # read-only
    Bundle(root).write_version({"kind": "vision", "architecture": SPECS["vit"]},
                               {"model": {k: v + 1 for k, v in state_dict_for_saving(model).items()}},
                               parent=v1.id)
    assert {p.name: p.read_bytes() for p in v1.path.iterdir()} == files  # untouched by v2
    # tampering (even by root, who ignores modes) is caught by the manifest's hashes
    path = v1.path / "model.safetensors"
    sd = state_dict_for_saving(model)
    sd[next(iter(sd))] += 1
    path.chmod(0o644)
    from safetensors.torch import save_file

    save_file(sd, path)
    with pytest.raises(BundleError, match="hash"):
        Bundle(root).version(v1.id).tensors("model")


def test_parent_links_edits_and_rollback(tmp_path):
    root = tmp_path / "b"
    model, v1 = _write(root)
    b = Bundle(root)
    with pytest.raises(BundleError, match="no parent"):
        b.rollback()
    v2 = b.write_version({"kind": "vision", "architecture": SPECS["vit"]},
                         {"detector": {"w": torch.ones(3)}}, edits=[{"layer": "a"}], parent=v1.id)
    v3 = b.write_version({"kind": "vision", "architecture": SPECS["vit"]}, {},
                         edits=[{"layer": "b"}], parent=v2.id, activate=False)
    assert b.current_id() == v2.id  # activate=False leaves CURRENT alone
    assert (v2.parent, v3.parent) == (v1.id, v2.id)
    assert [e["layer"] for e in v3.edits()] == ["a", "b"]  # edits accumulate along the chain
    assert torch.equal(v3.tensors("detector")["w"], torch.ones(3))  # artefacts copied from parent
    assert v3.tensors("model").keys() == v1.tensors("model").keys()
    b.activate(v3.id)
    assert b.rollback() == v2.id and b.current_id() == v2.id
    assert b.rollback() == v1.id and b.version().id == v1.id
    with pytest.raises(BundleError, match="no version"):
        b.activate("v0099")
    with pytest.raises(BundleError, match="invalid"):
        b.version("../v0001")
    for bad in ("v" * 5000, "v0001\0"):  # past any file name limit; a NUL byte: not an OSError either
        with pytest.raises(BundleError, match="invalid version id"):
            b.activate(bad)
