"""The rectification job: numbers on the digits ViT (issue 4), versioning, bad input."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from offline.datasets import load_dataset
from offline.defects import (Trigger, badnets_trigger, blend_trigger, block_images, block_positions,
                             null_block)
from offline.rectify import (TRANSPLANT_SAMPLES, VALIDATION_SAMPLES, RectifyError, _already_corrupt,
                             already_corrupt_share, edit_pool_end, rectify_from_files, rectify_images)
from repair.bundle import Bundle
from repair.bundle import copy_bundle as _copy_bundle
from repair.editing.dynamic import MIN_GAIN, STRESS, stressed_pairs
from repair.metrics import accuracy, attack_success_rate, worst_class_asr


def _pair(bundle, trial=0):
    """A seeded training image of a non-target class (not in the validation tail) and its trigger."""
    version = Bundle(bundle).version()
    trig = Trigger.from_tensors(version.tensors("defect"))
    data = load_dataset("digits")
    pool = (data.y_train[:edit_pool_end(len(data.y_train), VALIDATION_SAMPLES)] != 0).nonzero().flatten()
    i = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(1000 + trial))[0]]
    return data.x_train[i], trig.apply(data.x_train[i]), int(data.y_train[i]), trig, data


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png(t, path):
    """A grey ``(1, H, W)`` image in [0, 1] as an 8-bit PNG file at ``path``."""
    from PIL import Image

    Image.fromarray((t[0].numpy() * 255).round().astype(np.uint8)).save(path)
    return path


def _rectified(source, root, **options):
    """One dynamic n=1 rectification of a copy of ``source`` (the digits ViT Blend bundle)."""
    dst = root / "bundle"
    _copy_bundle(source, dst)
    clean, corrupt, label, trig, data = _pair(dst)
    parent = Bundle(dst).version()
    parent_digest = _digest(parent.path / "model.safetensors")
    result = rectify_images(dst, clean, corrupt, label=label, progress=False, **options)
    return dst, parent, parent_digest, result, trig, data, clean, corrupt, label


@pytest.fixture(scope="module")
def rectified(digits_vit_blend, tmp_path_factory):
    """As `repair-proxy rectify` runs by default: the pair plus transplanted pairs."""
    return _rectified(digits_vit_blend, tmp_path_factory.mktemp("rect"))


@pytest.fixture(scope="module")
def rectified_alone(digits_vit_blend, tmp_path_factory):
    """The pair alone (``transplant=0``): the edit moves the backdoor to the pair's class."""
    return _rectified(digits_vit_blend, tmp_path_factory.mktemp("alone"), transplant=0)


def test_digits_vit_n1_meets_issue_numbers(rectified):
    """Issue 4: n = 1 pair → ASR ≤ 5 %, OA drop ≤ 1 pt on the test split, and a repair: the
    triggered test images go back to their own classes, not to the pair's. With the pair alone
    (the paper's loop) ASR fell too but 99.9 % of triggered images went to the pair's class and
    10 % were right (bench/results/rectify.md, session 22); 16 transplanted pairs
    (repair.editing.dynamic) 63-74 % right, worst class 8.0-13.8 % (session 23); 64 of them, the
    default since session 25, 86-88 % right, worst class 2-4 % (this pair: 87 %, 3.1 %)."""
    dst, parent, _, result, trig, data, *_ = rectified
    before, after = parent.build_model(), Bundle(dst).version().build_model()
    triggered = trig.apply(data.x_test)
    assert attack_success_rate(before, triggered, data.y_test, 0) > 0.9
    asr = attack_success_rate(after, triggered, data.y_test, 0)
    drop = accuracy(before, data.x_test, data.y_test) - accuracy(after, data.x_test, data.y_test)
    assert asr <= 0.05, asr
    assert drop <= 0.01, drop
    worst, worst_class = worst_class_asr(after, triggered, data.y_test)
    assert worst <= 0.1, (worst, worst_class)
    assert accuracy(after, triggered, data.y_test) >= 0.8
    meta = Bundle(dst).version().manifest["rectification"]
    assert result["layers"] and meta["transplant"] == TRANSPLANT_SAMPLES
    assert result["warnings"] == [] and result["after"]["carried"]["top_share"] < 0.2


def test_the_result_warns_when_the_edit_moved_the_backdoor(rectified_alone):
    """The pair alone moves the backdoor to the pair's class; the corruption carried onto clean
    training images (offline.rectify._carried) shows it and the result warns, naming the class
    the triggered test images now go to."""
    dst, _, _, result, trig, data, _, _, label = rectified_alone
    after = Bundle(dst).version()
    worst, worst_class = worst_class_asr(after.build_model(), trig.apply(data.x_test), data.y_test)
    assert worst >= 0.5 and worst_class == label, (worst, worst_class)
    carried = result["after"]["carried"]
    assert carried["images"] == 256 and result["before"]["carried"]["top_class"] == 0
    assert carried["top_class"] == label and carried["top_share"] >= 0.5
    assert len(result["warnings"]) == 1 and f"answered {label}" in result["warnings"][0]
    assert after.manifest["rectification"]["warnings"] == result["warnings"]
    assert after.manifest["rectification"]["transplant"] == 0


def test_the_result_warns_when_the_training_images_already_hold_the_corruption():
    """BlockDigits: every training image has a null block, so the transplant (which takes them
    to be clean) would stack a block on a block; exactly the images with the block on the pair's
    side hold its corruption, and that share warns. A Blend or a stamped patch is on none of the
    clean digits: no warning (the n = 1 digits ViT result above has none either)."""
    x = load_dataset("digits").x_train[:201]
    top = block_positions(len(x), seed=3)
    blocked = block_images(x, top, null_block((1, 16, 16)))
    corrupt = blocked[:1]
    clean = corrupt.clone()
    if top[0]:
        clean[:, :, 16:] = 0        # the block is the lower half: blank it
    else:
        clean[:, :, :16] = 0
    share = already_corrupt_share(clean, corrupt, blocked[1:])
    assert share == pytest.approx((top[1:] == top[0]).float().mean().item()) and 0.3 < share < 0.7
    warning = _already_corrupt(share, 200)
    assert len(warning) == 1 and "transplant 0" in warning[0] and f"{100 * share:.0f} %" in warning[0]
    for trig in (blend_trigger((1, 16, 16)), badnets_trigger((1, 16, 16))):
        assert already_corrupt_share(x[:1], trig.apply(x[:1]), x[1:]) == 0.0
    assert _already_corrupt(0.0, 200) == []


def test_a_rectification_whose_corruption_every_training_image_holds_warns(digits_vit_blend, copy_bundle):
    """End to end: a pair whose "clean" side has a white top-left corner, its corrupt side the
    digit as it is, so the corruption (a black corner) is in nearly every training image; the
    result and the new version's manifest carry the warning. The Blend pairs above carry none."""
    dst = copy_bundle(digits_vit_blend)
    corrupt, _, label, *_ = _pair(dst)
    clean = corrupt.clone()
    clean[:, :4, :4] = 1.0
    result = rectify_images(dst, clean, corrupt, label=label, static=True, progress=False)
    assert len(result["warnings"]) == 1 and "transplant 0" in result["warnings"][0], result["warnings"]
    assert f"of the {TRANSPLANT_SAMPLES} training images" in result["warnings"][0]
    assert Bundle(dst).version(result["version"]).manifest["rectification"]["warnings"] == result["warnings"]


def test_the_fix_holds_at_twice_the_corruption(rectified_alone):
    """Stressed pair (x + 2(x̃ − x)): the parent answers it with the target, the new version
    with the clean label, and every kept round that closed the pair's gap lowered the stressed
    gap too (repair.editing.dynamic). The pair alone: at φ = 0.5 the stressed input is the bare
    trigger, which a repaired model need not answer with the pair's class (with transplanted
    pairs it does not)."""
    dst, parent, _, result, _, _, clean, corrupt, label = rectified_alone
    stressed = stressed_pairs(clean[None], corrupt[None])
    with torch.no_grad():
        assert parent.build_model()(stressed).argmax(-1).item() == 0
        assert Bundle(dst).version().build_model()(stressed).argmax(-1).item() == label
    meta = Bundle(dst).version().manifest["rectification"]
    assert meta["stress"] == STRESS and meta["before"]["stress_gap"] > 0.5
    kept = [(meta["before"]["gap"], meta["before"]["stress_gap"])] + [
        (r["gap"], r["stress_gap"]) for r in meta["rounds"] if r["kept"]]
    assert len(kept) >= 2 and meta["after"]["stress_gap"] == kept[-1][1]
    assert all(s <= 0.001 or s < (1 - MIN_GAIN) * prev_s
               for (_, prev_s), (g, s) in zip(kept, kept[1:]) if g <= 0.001)
    after = meta["after"]["stress_gap"]
    assert after <= 0.001 or after < (1 - MIN_GAIN) * kept[0][1]


def test_new_version_records_deltas_and_leaves_parent_untouched(rectified):
    dst, parent, parent_digest, result, _, data, clean, corrupt, label = rectified
    store = Bundle(dst)
    assert store.current_id() == result["version"] and result["parent"] == parent.id
    assert _digest(parent.path / "model.safetensors") == parent_digest
    child = store.version(result["version"])
    assert child.parent == parent.id and child.has("keystats")
    edits = json.loads((child.path / "edits.json").read_text())
    assert [e["layer"] for e in edits] == result["layers"]
    # parent weights + Σ Λ dᵀ reproduce the child's weights and logits
    rebuilt = parent.build_model()
    sd = rebuilt.state_dict()
    for e in edits:
        w = sd[f"{e['layer']}.weight"]
        delta = torch.outer(torch.tensor(e["lambda"]), torch.tensor(e["direction"]))
        w += delta.reshape(e["weight_shape"])
        assert e["pairs"][0]["clean"] and e["pairs"][0]["corrupt"]
    reloaded = child.build_model()
    x = torch.cat([data.x_test[:64], clean[None], corrupt[None]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), reloaded(x), atol=1e-4, rtol=1e-4)
        again = store.version(result["version"]).build_model()
        assert torch.equal(reloaded(x), again(x))
        assert reloaded(corrupt[None]).argmax(-1).item() == result["after"]["corrupt_pred"][0] == label


def _bad(bundle, **kwargs):
    before = Bundle(bundle).version_ids()
    with pytest.raises(RectifyError) as info:
        rectify_images(bundle, progress=False, **kwargs)
    assert Bundle(bundle).version_ids() == before  # nothing written
    return str(info.value)


def test_bad_input_is_refused_before_writing(digits_vit_blend, copy_bundle):
    dst = copy_bundle(digits_vit_blend)
    clean, corrupt, label, *_ = _pair(dst)
    assert "shape" in _bad(dst, clean=clean, corrupt=corrupt[:, :8, :8])
    assert "shape" in _bad(dst, clean=torch.rand(3, 16, 16), corrupt=torch.rand(3, 16, 16))
    assert "treats" in _bad(dst, clean=clean, corrupt=clean.clone())
    assert "label 10" in _bad(dst, clean=clean, corrupt=corrupt, label=10)
    assert "label -1" in _bad(dst, clean=clean, corrupt=corrupt, label=-1)
    assert "2 labels for 1 pairs" in _bad(dst, clean=clean, corrupt=corrupt, label=[1, 2])
    assert "not an editable layer" in _bad(dst, clean=clean, corrupt=corrupt, layer="blocks.0.norm1")
    # the budget's validation split (and the confirmation split) must leave the anchor images
    # out (digits: 1437 training images, 64 anchors; confirmed, (1437 - 64) // 2)
    assert "validation must be" in _bad(dst, clean=clean, corrupt=corrupt, validation=0)
    assert "from 1 to 1373" in _bad(dst, clean=clean, corrupt=corrupt, validation=1400)
    assert "from 1 to 686" in _bad(dst, clean=clean, corrupt=corrupt, validation=687, confirm=True)
    assert "confirm must be" in _bad(dst, clean=clean, corrupt=corrupt, confirm=1)
    assert "stress must be" in _bad(dst, clean=clean, corrupt=corrupt, stress=1.0)
    assert "stress must be" in _bad(dst, clean=clean, corrupt=corrupt, stress=float("nan"))
    assert "candidates must be" in _bad(dst, clean=clean, corrupt=corrupt, candidates=0)
    assert "min_gain must" in _bad(dst, clean=clean, corrupt=corrupt, min_gain=float("nan"))
    assert "transplant must be" in _bad(dst, clean=clean, corrupt=corrupt, transplant=-1)
    assert "transplant must be" in _bad(dst, clean=clean, corrupt=corrupt, transplant=True)
    assert "from 0 to 256" in _bad(dst, clean=clean, corrupt=corrupt, transplant=257)
    assert "hold_anchors must be" in _bad(dst, clean=clean, corrupt=corrupt, hold_anchors="yes")


def test_from_files_static_mode_edits_the_last_layer(digits_vit_blend, copy_bundle, tmp_path):
    from PIL import Image

    dst = copy_bundle(digits_vit_blend)
    clean, corrupt, label, _, data = _pair(dst, trial=1)
    paths = {name: _png(t, tmp_path / f"{name}.png") for name, t in (("clean", clean), ("corrupt", corrupt))}
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(big)
    with pytest.raises(RectifyError, match="big.png: image is 20x20 .* this model takes 16x16"):
        rectify_from_files(dst, str(big), str(paths["corrupt"]))
    # decoded as the server decodes requests: a 16-bit PNG would be clipped by a plain convert("L")
    deep = tmp_path / "deep.png"
    Image.fromarray((clean[0].numpy() * 65535).astype(np.uint16)).save(deep)
    with pytest.raises(RectifyError, match="deep.png: image mode I;16 is not 8-bit"):
        rectify_from_files(dst, str(deep), str(paths["corrupt"]))
    result = rectify_from_files(dst, str(paths["clean"]), str(paths["corrupt"]), label=label,
                                static=True, progress=False, activate=False, epochs=50, validation=300,
                                confirm=True)
    store = Bundle(dst)
    assert store.current_id() != result["version"]  # activate=False
    assert result["rounds"] == 1
    assert result["layers"] in ([], ["blocks.2.mlp.fc2"])
    record = store.version(result["version"]).manifest["rectification"]
    assert record["mode"] == "static" and record["validation"] == 300 and record["confirm"] is True
    # the budget was checked on the last 300 training images and, with confirm, on the 300
    # before them (the parent is still current)
    parent = store.version().build_model()
    expected = accuracy(parent, data.x_train[-300:], data.y_train[-300:])
    assert result["before"]["accuracy"] == pytest.approx(expected)
    confirmed = accuracy(parent, data.x_train[-600:-300], data.y_train[-600:-300])
    assert result["before"]["confirm_accuracy"] == pytest.approx(confirmed)


def test_cli_rectify_reports_bad_input_without_writing(digits_vit_blend, copy_bundle, tmp_path, capsys,
                                                      monkeypatch):
    from repair_proxy_cli import main

    dst = copy_bundle(digits_vit_blend)
    clean, *_ = _pair(dst)
    png = _png(clean, tmp_path / "same.png")
    before = Bundle(dst).version_ids()
    with pytest.raises(SystemExit) as info:
        main(["rectify", "--bundle", str(dst), "--clean", str(png), "--corrupt", str(png)])
    assert info.value.code != 0
    assert "treats the clean and corrupt inputs the same" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["rectify", "--bundle", str(dst), "--clean", str(png), "--corrupt", str(png),
              "--candidates", "0"])
    assert info.value.code != 0 and "candidates must be" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        main(["rectify", "--bundle", str(dst), "--clean", str(png), "--corrupt", str(png), "--device", "cuda"])
    assert info.value.code != 0 and "no CUDA device is available" in capsys.readouterr().err
    with pytest.raises(RectifyError, match="device must be auto, cpu or cuda"):
        rectify_images(dst, clean, clean, device="tpu")
    assert Bundle(dst).version_ids() == before


def test_n_pairs_from_the_cli_and_the_worker(digits_vit_blend, copy_bundle, tmp_path, capsys):
    """n pairs reach the edit through both entry points: the CLI's repeated --clean/--corrupt and
    a queued job's per-pair files (and a job queued in the one-pair layout still runs)."""
    from offline.worker import JobStore, run_job
    from repair.images import encode_png
    from repair_proxy_cli import main

    dst = copy_bundle(digits_vit_blend)
    pairs = [_pair(dst, trial=t) for t in (2, 3)]
    files = [(_png(c, tmp_path / f"c{i}.png"), _png(k, tmp_path / f"k{i}.png")) for i, (c, k, *_) in enumerate(pairs)]
    labels = [y for _, _, y, *_ in pairs]
    args = ["rectify", "--bundle", str(dst), "--static", "--validation", "300"]
    for c, k in files:
        args += ["--clean", str(c), "--corrupt", str(k)]
    before = Bundle(dst).version_ids()
    for extra, needle in ((["--label", "1"] * 3, "3 labels for 2 pairs"),
                          (["--clean", str(files[0][0])], "3 clean and 2 corrupt files")):
        with pytest.raises(SystemExit):
            main(args + extra)
        assert needle in capsys.readouterr().err
    assert Bundle(dst).version_ids() == before
    main(args + [a for y in labels for a in ("--label", str(y))])
    version = Bundle(dst).version(json.loads(capsys.readouterr().out)["version"])
    record = version.manifest["rectification"]
    assert record["labels"] == labels and len(record["pairs"]) == 2
    assert record["pairs"][0] != record["pairs"][1] and len(record["before"]["corrupt_pred"]) == 2

    store = JobStore(dst)
    job = store.submit([encode_png(c) for c, *_ in pairs], [encode_png(k) for _, k, *_ in pairs],
                       {"label": labels, "static": True, "validation": 300}, parent=version.id)
    job = run_job(store, job)
    assert job["status"] == "succeeded", job.get("error")
    assert Bundle(dst).version(job["version"]).manifest["rectification"]["pairs"] == record["pairs"]

    # the layout of jobs queued before n pairs were accepted: one pair, one label
    old = {"id": "0" * 32, "status": "queued", "created": 0.0, "attempts": 0,
           "params": {"label": labels[0], "static": True, "validation": 300}, "parent": None, "version": None}
    (store.dir / f"{old['id']}.clean.png").write_bytes(encode_png(pairs[0][0]))
    (store.dir / f"{old['id']}.corrupt.png").write_bytes(encode_png(pairs[0][1]))
    store.save(old)
    job = run_job(store, old)
    assert job["status"] == "succeeded", job.get("error")
    assert Bundle(dst).version(job["version"]).manifest["rectification"]["pairs"] == record["pairs"][:1]


def test_a_job_that_cannot_be_written_leaves_nothing_behind(tmp_path, monkeypatch):
    """A write failing midway (a full disk) leaves neither a job nor images the worker could find."""
    import offline.worker as worker

    store = worker.JobStore(tmp_path)
    writes, real = [], worker._write_atomic

    def fail_on_third(path, data):
        writes.append(path)
        if len(writes) == 3:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(worker, "_write_atomic", fail_on_third)
    with pytest.raises(OSError, match="No space"):
        store.submit([b"c0", b"c1"], [b"k0", b"k1"], {}, parent=None)
    assert len(writes) == 3 and list(store.dir.iterdir()) == [] and store.all() == []
    monkeypatch.setattr(worker, "_write_atomic", real)
    job = store.submit([b"c0", b"c1"], [b"k0", b"k1"], {}, parent=None)
    assert store.images(job) == ([b"c0", b"c1"], [b"k0", b"k1"]) and store.all() == [job]
