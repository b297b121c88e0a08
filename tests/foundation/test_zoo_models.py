"""Zoo models: the digits floors, tabular UF, PNG pair export, the other defects end to end,
the demo cache, the CLI, and the torchvision compatibility shim."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offline.defects import Trigger
from offline.zoo import amplify, bundle_test_data, export_pair, tabular_uf, train_bundle
from repair.bundle import Bundle
from repair.images import decode_image
from repair.metrics import accuracy, attack_success_rate, worst_class_asr

ROOT = Path(__file__).resolve().parents[2]


def test_digits_badnets_floors_from_manifest_and_recomputed(digits_vit_badnets):
    version = Bundle(digits_vit_badnets).version()
    m = version.manifest
    assert m["metrics"]["accuracy"] >= 0.93 and m["metrics"]["asr"] >= 0.95
    assert m["defect"]["type"] == "badnets" and m["provenance"]["seed"] == 0 and m["dataset"]["hash"]
    model = version.build_model()
    x, y = bundle_test_data(version)
    trigger = Trigger.from_tensors(version.tensors("defect"))
    acc, asr = accuracy(model, x, y), attack_success_rate(model, trigger.apply(x), y, 0)
    assert acc >= 0.93 and asr >= 0.95
    assert acc == pytest.approx(m["metrics"]["accuracy"]) and asr == pytest.approx(m["metrics"]["asr"])
    # the backdoor's target is the class the triggered images go to most, at the ASR
    worst, worst_class = worst_class_asr(model, trigger.apply(x), y)
    assert worst_class == 0 and worst == pytest.approx(asr)


def test_worst_class_asr_sees_a_backdoor_moved_to_another_class():
    """A model that sends every input to class 3 has no ASR for the target 0, and ASR 1 for 3."""
    model = torch.nn.Linear(4, 10)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.arange(10) == 3)
    x, y = torch.randn(40, 4), torch.arange(40) % 10
    assert attack_success_rate(model, x, y, 0) == 0.0
    assert worst_class_asr(model, x, y) == (1.0, 3)


def test_export_pair_is_exactly_what_the_model_sees(digits_vit_badnets, tmp_path):
    version = Bundle(digits_vit_badnets).version()
    x, y = bundle_test_data(version)
    index = int((y != 0).nonzero()[0])
    pair = export_pair(digits_vit_badnets, index, tmp_path / "pair")
    assert pair["label"] == int(y[index]) and Path(pair["clean"]).name == "clean.png"
    clean = decode_image(Path(pair["clean"]).read_bytes(), 1, 16, 16)
    corrupt = decode_image(Path(pair["corrupt"]).read_bytes(), 1, 16, 16)
    trigger = Trigger.from_tensors(version.tensors("defect"))
    assert torch.equal(clean, x[index])  # digits sit on the 8-bit grid: exact
    assert torch.equal(corrupt, trigger.apply(x[index:index + 1])[0])
    model = version.build_model()
    assert model(corrupt[None]).argmax().item() == 0  # the backdoor fires on the exported PNG
    with pytest.raises(ValueError, match="out of range"):
        export_pair(digits_vit_badnets, len(x), tmp_path / "nope")


def test_export_pair_blend_within_quantisation(digits_vit_blend, tmp_path):
    version = Bundle(digits_vit_blend).version()
    x, _ = bundle_test_data(version)
    pair = export_pair(digits_vit_blend, 5, tmp_path)
    corrupt = decode_image(Path(pair["corrupt"]).read_bytes(), 1, 16, 16)
    expected = Trigger.from_tensors(version.tensors("defect")).apply(x[5:6])[0]
    assert (corrupt - expected).abs().max() <= 0.5 / 255 + 1e-6


def test_tabular_fixtures_record_uf_per_protected_attribute(adult_ft, compas_ft):
    from offline.datasets import load_dataset

    for path, attrs in ((adult_ft, ["race", "sex", "age"]), (compas_ft, ["race", "sex"])):
        version = Bundle(path).version()
        m = version.manifest
        assert sorted(m["metrics"]["uf"]) == sorted(attrs) and m["kind"] == "tabular"
        data = load_dataset(m["dataset"]["name"])
        x = data.x_test[: m["dataset"]["test_rows"]]
        model = version.build_model()
        if path == compas_ft:  # recomputed from the bundle (Adult's 2000 x 14 passes cost more)
            assert tabular_uf(model, data, x) == m["metrics"]["uf"]
        assert all(0 <= v <= 1 for v in m["metrics"]["uf"].values())
        assert m["preprocessing"]["protected"] == attrs
    assert Bundle(adult_ft).version().manifest["metrics"]["accuracy"] >= 0.80
    assert Bundle(compas_ft).version().manifest["metrics"]["accuracy"] >= 0.64


def test_amplify_relabels_by_the_protected_attribute():
    from offline.datasets import load_dataset

    data = load_dataset("compas")
    y, info = amplify(data, data.x_train, data.y_train, "sex", 0.3, seed=0)
    col = data.x_train[:, data.schema.index("sex")].long()
    male = data.schema.feature("sex").categories.index("Male")
    changed = y != data.y_train
    assert info["favoured"] == ["Male"] and changed.sum() > 0
    assert (y[changed] == (col[changed] == male).long()).all()
    with pytest.raises(ValueError, match="not a protected attribute"):
        amplify(data, data.x_train, data.y_train, "age", 0.3, seed=0)


@pytest.mark.parametrize("defect", ["spurious", "leakage"])
def test_spurious_and_leakage_bundles(tmp_path, defect):
    out = tmp_path / defect
    v = train_bundle(out, dataset="digits", defect=defect, target_class=1, poison_rate=0.8,
                     epochs=2, max_train=400, progress=False)
    m = v.manifest
    if defect == "spurious":
        assert {"accuracy", "spurious_accuracy", "spurious_rate"} <= set(m["metrics"])
        assert m["defect"]["fraction"] == 0.8
    else:
        assert m["preprocessing"]["height"] == 32 and m["defect"]["image_shape"] == [1, 32, 16]
        assert m["architecture"]["img_size"] == [32, 16]
        x, _ = bundle_test_data(v)
        pair = export_pair(out, 0, tmp_path / "pair")
        corrupt = decode_image(Path(pair["corrupt"]).read_bytes(), 1, 32, 16)
        clean = decode_image(Path(pair["clean"]).read_bytes(), 1, 32, 16)
        assert torch.equal(corrupt, x[0])
        top = bool(v.tensors("defect")["test_object_top"][0])
        blank = clean[:, 16:] if top else clean[:, :16]
        kept = clean[:, :16] if top else clean[:, 16:]
        assert blank.abs().sum() == 0 and torch.equal(kept, corrupt[:, :16] if top else corrupt[:, 16:])


def test_tabular_bundle_has_no_png_pair(compas_ft, tmp_path):
    with pytest.raises(ValueError, match="tabular"):
        export_pair(compas_ft, 0, tmp_path)


def test_demo_bundle_is_built_once(tmp_path, monkeypatch, digits_vit_badnets):
    import offline.atpatch_build
    import offline.zoo
    from offline.demo import demo_bundle
    from repair.atpatch.detector import DESIGN

    calls, detector_builds = [], []

    def fake_train(out, **kw):  # the real build is the digits fixture; copy it instead
        calls.append(kw)
        shutil.copytree(digits_vit_badnets, out)

    def fake_build(out, **kw):  # the real detector build is covered by tests/atpatch
        detector_builds.append((Path(out), kw))
        _write_detector_design(out, DESIGN)

    monkeypatch.setenv("REPAIR_PROXY_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(offline.zoo, "train_bundle", fake_train)
    monkeypatch.setattr(offline.atpatch_build, "build_detector", fake_build)
    first = demo_bundle(progress=False)
    second = demo_bundle(progress=False)
    assert first == second == tmp_path / "home" / "demo" and len(calls) == 1
    # the detector is built once, on the staged bundle before it is renamed into place
    assert len(detector_builds) == 1 and detector_builds[0][0].name.startswith(".demo-")
    assert detector_builds[0][1]["target_gate"] is True  # the demo serves the gated patch
    assert calls[0]["defect"] == "badnets" and Bundle(first).version().manifest["metrics"]["asr"] >= 0.95
    assert not [p for p in (tmp_path / "home").iterdir() if p.name.startswith(".demo-")]
    # a demo whose detector an older release built gets a new detector, in place
    _write_detector_design(first, "2-D map CNN")
    assert demo_bundle(progress=False) == first
    assert [path for path, _ in detector_builds[1:]] == [first] and len(calls) == 1


def _write_detector_design(bundle, design):
    b = Bundle(bundle)
    manifest = {k: v for k, v in b.version().manifest.items() if k not in ("id", "parent", "created", "files")}
    manifest["atpatch"] = {"detector": {"design": design}}
    b.write_version(manifest, {}, parent=b.current_id())


def test_cli_zoo_train_and_pair(tmp_path, digits_vit_badnets):
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,g,y\n" + "".join(f"{i},{i % 3},{'fm'[i % 2]},{int(i % 4 == 0)}\n" for i in range(60)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "import repair_proxy_cli as c; c.main()"]
    out = subprocess.run(cmd + ["zoo", "train", "--dataset", f"{csv}:label=y:protected=g",
                                "--arch", "ft-transformer", "--epochs", "1", "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["version"] == "v0001" and sorted(result["uf"]) == ["g"] and 0 <= result["accuracy"] <= 1
    out = subprocess.run(cmd + ["zoo", "pair", "--bundle", str(digits_vit_badnets), "--index", "3",
                                "--out", str(tmp_path / "pair")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    pair = json.loads(out.stdout)
    assert Path(pair["corrupt"]).is_file() and isinstance(pair["label"], int)
    out = subprocess.run(cmd + ["zoo", "train", "--dataset", str(tmp_path / "missing.csv"), "--arch", "vit",
                                "--out", str(tmp_path / "c")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 2 and "missing.csv" in out.stderr and not (tmp_path / "c").exists()


def test_torchvision_compat_is_a_noop_once_ops_exist():
    import timm  # noqa: F401  (imports torchvision)

    from repair.torchvision_compat import ensure_torchvision_importable, missing_ops

    assert missing_ops() == []
    assert ensure_torchvision_importable() == [] and ensure_torchvision_importable() == []
    assert missing_ops() == []
