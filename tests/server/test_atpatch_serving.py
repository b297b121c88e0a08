"""AtPatch behind the HTTP API with the real detector (``atpatch build`` on the BadNets digits
ViT): triggered digits are corrected (ASR ≤ 1 %) and clean accuracy holds."""
from __future__ import annotations

import pytest
import torch

from offline.defects import Trigger
from repair.bundle import Bundle
from server_live import b64png, live_server, predict_in_chunks


@pytest.fixture(scope="module")
def server(atpatch_bundle):
    with live_server(atpatch_bundle, max_batch_size=64) as s:
        yield s


@pytest.fixture(scope="module")
def images(atpatch_bundle, digits_data):
    version = Bundle(atpatch_bundle).version()
    target = int(version.manifest["defect"]["target_class"])
    trigger = Trigger.from_tensors(version.tensors("defect"))
    keep = digits_data.y_test != target
    clean = [b64png(x) for x in digits_data.x_test]
    triggered = [b64png(x) for x in trigger.apply(digits_data.x_test[keep])]
    return clean, digits_data.y_test, triggered, target


def _predict(server, images, patch):
    return predict_in_chunks(server.url, "images", images, patch)


def test_triggered_inputs_corrected_and_clean_accuracy_holds(server, images):
    clean, labels, triggered, target = images
    assert server.service.runtime.served.has_patch
    off = _predict(server, triggered, "off")
    on = _predict(server, triggered, "on")
    asr_off = sum(p["class_index"] == target for p in off) / len(off)
    asr_on = sum(p["class_index"] == target for p in on) / len(on)
    assert asr_off > 0.9  # the backdoor is there without the patch
    assert asr_on <= 0.01, asr_on
    assert not any(p["patched"] for p in off)
    # The trigger (bottom-right 4x4 patch = token 16) is among the patched columns.
    patched = [p for p in on if p["patched"]]
    assert len(patched) >= 0.9 * len(on)
    assert sum(any(t == 16 for _, t in p["patched_columns"]) for p in patched) >= 0.9 * len(patched)
    acc_off = sum(p["class_index"] == y for p, y in zip(_predict(server, clean, "off"), labels.tolist())) / len(clean)
    acc_on = sum(p["class_index"] == y for p, y in zip(_predict(server, clean, "on"), labels.tolist())) / len(clean)
    assert acc_on >= acc_off - 0.02, (acc_on, acc_off)
