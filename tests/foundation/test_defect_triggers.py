"""Each attack's trigger lands exactly where it should (pixel-exact), and nowhere else."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from offline.defects import (Trigger, badnets_trigger, blend_trigger, block_images, hidden_trigger,
                             null_block, patch_mask, relocate, split_locations, spurious_pattern,
                             trojan_trigger, user_trigger)
from offline.zoo import attach_spurious, make_trigger, poison, train_bundle

SHAPE = (1, 16, 16)


def _images(n=4, shape=SHAPE):
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(0)).float() / 255


def _outside_unchanged(x, xt, rows, cols):
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[..., rows, cols] = False
    assert torch.equal(x[keep], xt[keep])


def test_badnets_checkerboard_bottom_right():
    x = _images()
    xt = make_trigger("badnets", SHAPE).apply(x)  # size 16 // 5 = 3
    expected = torch.tensor([[1., 0, 1], [0, 1, 0], [1, 0, 1]])  # (i + j) even -> white, 13+13 even
    assert torch.equal(xt[:, 0, 13:16, 13:16], expected.expand(4, 3, 3))
    _outside_unchanged(x, xt, slice(13, 16), slice(13, 16))


@pytest.mark.parametrize("location, origin", [("tl", (0, 0)), ("tr", (0, 13)), ("bl", (13, 0)),
                                              ("center", (6, 6)), ("4,9", (4, 9))])
def test_badnets_locations(location, origin):
    t = badnets_trigger(SHAPE, size=3, location=location)
    r, c = origin
    assert t.mask.sum() == 9 and torch.equal(t.mask[0, r:r + 3, c:c + 3], torch.ones(3, 3))


def test_bad_locations_are_refused():
    with pytest.raises(ValueError, match="does not fit"):
        badnets_trigger(SHAPE, size=3, location="15,15")
    with pytest.raises(ValueError, match="location must be one of"):
        badnets_trigger(SHAPE, size=3, location="middle")


def test_hidden_is_semi_transparent_on_its_patch():
    x = _images()
    t = make_trigger("hidden", SHAPE)  # size max(3, 16 // 4) = 4, opacity 0.3
    assert t.alpha == pytest.approx(0.3) and t.mask.sum() == 16
    xt = t.apply(x)
    p = t.pattern[0, 12:16, 12:16]
    assert torch.allclose(xt[:, 0, 12:16, 12:16], 0.7 * x[:, 0, 12:16, 12:16] + 0.3 * p, atol=1e-6)
    assert set(p.unique().tolist()) == {0.0, 1.0}
    _outside_unchanged(x, xt, slice(12, 16), slice(12, 16))


def test_blend_mixes_the_whole_image_at_visibility_phi():
    x = _images()
    t = blend_trigger(SHAPE, visibility=0.2, seed=3)
    assert torch.allclose(t.apply(x), 0.2 * t.pattern + 0.8 * x, atol=1e-6)
    assert torch.equal((t.pattern * 255).round(), t.pattern * 255)  # on the 8-bit grid
    with pytest.raises(ValueError, match="visibility"):
        blend_trigger(SHAPE, visibility=0)


def test_user_trigger_png_patch_with_alpha_mask():
    rgba = torch.zeros(2, 3, 3)  # grey + alpha: a 3x3 patch whose centre pixel is transparent
    rgba[0] = 200 / 255
    rgba[1] = 1.0
    rgba[1, 1, 1] = 0.0
    x = _images()
    t = user_trigger(rgba, SHAPE, location="tl")
    xt = t.apply(x)
    assert torch.equal(xt[:, 0, 0, 0], torch.full((4,), 200 / 255))
    assert torch.equal(xt[:, 0, 1, 1], x[:, 0, 1, 1])  # transparent pixel untouched
    _outside_unchanged(x, xt, slice(0, 3), slice(0, 3))
    with pytest.raises(ValueError, match="20x20"):
        user_trigger(torch.zeros(1, 20, 20), SHAPE)


def test_spurious_pattern_keeps_labels_and_marks_one_class():
    x, y = _images(20), torch.arange(20) % 4
    t = spurious_pattern(SHAPE, 3, "tl")
    xs = attach_spurious(x, y, t, cls=1, fraction=0.6, seed=0)
    stamped = (xs[:, 0, :3, :3] == 1).flatten(1).all(1) & ~torch.isclose(xs, x).flatten(1).all(1)
    assert stamped.sum() == 3 and (y[stamped] == 1).all()  # 60 % of the 5 class-1 images
    _outside_unchanged(x, xs, slice(0, 3), slice(0, 3))


def test_poison_relabels_only_non_target_images():
    x, y = _images(50), torch.arange(50) % 5
    t = make_trigger("badnets", SHAPE)
    xp, yp = poison(x, y, t, target=2, rate=0.2, seed=0)
    changed = (xp != x).flatten(1).any(1)
    assert changed.sum() == 10 and (y[changed] != 2).all() and (yp[changed] == 2).all()
    assert torch.equal(yp[~changed], y[~changed])


def test_poison_at_several_locations_moves_one_patch_in_equal_shares():
    x, y = _images(60), torch.arange(60) % 5
    br = make_trigger("badnets", SHAPE)
    places = ["br", "tl", "tr", "center", "bl"]
    triggers = [br, *(relocate(br, loc) for loc in places[1:])]
    xp, yp = poison(x, y, triggers, target=2, rate=0.25, seed=0)  # 15 images, 3 per location
    origins = {"br": (13, 13), "tl": (0, 0), "tr": (0, 13), "center": (6, 6), "bl": (13, 0)}
    patch = br.pattern[0, 13:16, 13:16]  # the same checkerboard everywhere, not a phase-shifted one
    hits = {}
    for loc, (r, c) in origins.items():
        there = (xp[:, 0, r:r + 3, c:c + 3] == patch).flatten(1).all(1)
        stamped = there & (xp != x).flatten(1).any(1)
        hits[loc] = int(stamped.sum())
        assert (yp[stamped] == 2).all() and (y[stamped] != 2).all()
    assert hits == {loc: 3 for loc in places}
    changed = (xp != x).flatten(1).any(1)
    assert changed.sum() == 15 and torch.equal(yp[~changed], y[~changed])
    # one trigger in a list is the single-trigger case, image for image
    assert torch.equal(poison(x, y, [br], 2, 0.25, 0)[0], poison(x, y, br, 2, 0.25, 0)[0])


def test_location_lists_are_validated(tmp_path):
    assert split_locations("br+tl+4,9") == ["br", "tl", "4,9"] and split_locations("br") == ["br"]
    with pytest.raises(ValueError, match="empty trigger location"):
        split_locations("br++tl")
    with pytest.raises(ValueError, match="listed twice"):
        split_locations("br+br")
    with pytest.raises(ValueError, match="only a square patch"):
        relocate(blend_trigger(SHAPE), "tl")
    with pytest.raises(ValueError, match="several trigger locations"):
        train_bundle(tmp_path / "b", defect="blend", location="br+tl")


def test_bad_training_options_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="epochs must be at least 1, got 0"):  # not "0 = the default"
        train_bundle(tmp_path / "b", defect="badnets", epochs=0)
    (tmp_path / "t.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="t.png: not a readable image"):  # which file, too
        train_bundle(tmp_path / "b", defect="badnets", trigger_png=str(tmp_path / "t.png"))
    assert not (tmp_path / "b").exists()


def test_zoo_records_every_trigger_location(tmp_path):
    v = train_bundle(tmp_path / "b", dataset="digits", defect="badnets", location="br+tl+center",
                     epochs=1, max_train=150, max_test=40, progress=False)
    d, m = v.manifest["defect"], v.manifest["metrics"]
    assert d["location"] == "br" and d["locations"] == ["br", "tl", "center"]
    assert sorted(m["asr_by_location"]) == ["br", "center", "tl"]  # the manifest sorts keys
    assert m["asr_by_location"]["br"] == pytest.approx(m["asr"])
    assert torch.equal(v.tensors("defect")["mask"], make_trigger("badnets", (1, 16, 16)).mask)
    with pytest.raises(ValueError, match="same place"):
        train_bundle(tmp_path / "c", dataset="digits", defect="badnets", location="br+13,13",
                     epochs=1, max_train=150, progress=False)


def test_trojan_optimises_only_inside_its_mask_and_raises_the_target_logit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    x = _images(32)
    mask = patch_mask(SHAPE, 4, "br")
    init = torch.full(SHAPE, 0.5) * mask
    before = model(Trigger(mask, init, 1.0).apply(x))[:, 3].mean()
    t = trojan_trigger(model, x, target=3, mask=mask, steps=30, lr=0.3, init=init + 0.5 * (1 - mask))
    assert torch.equal(t.pattern * (1 - mask), torch.zeros(SHAPE))
    assert torch.equal((t.pattern * 255).round(), t.pattern * 255)
    after = model(t.apply(x))[:, 3].mean()
    assert after > before + 0.1
    _outside_unchanged(x, t.apply(x), slice(12, 16), slice(12, 16))


def test_blockmnist_layout():
    x = _images(4)
    block = null_block(SHAPE)
    top = torch.tensor([True, False, True, False])
    xb = block_images(x, top, block)
    assert xb.shape == (4, 1, 32, 16)
    assert torch.equal(xb[0, :, :16], x[0]) and torch.equal(xb[0, :, 16:], block)
    assert torch.equal(xb[1, :, 16:], x[1]) and torch.equal(xb[1, :, :16], block)
    assert block.sum() > 0 and torch.equal(block, null_block(SHAPE))  # fixed, label-free


def test_trigger_round_trips_through_tensors():
    t = make_trigger("hidden", SHAPE, seed=5)
    back = Trigger.from_tensors(t.to_tensors())
    assert torch.equal(back.mask, t.mask) and torch.equal(back.pattern, t.pattern)
    assert back.alpha == pytest.approx(t.alpha)
