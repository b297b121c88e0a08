"""Fine-Pruning, the baseline AtPatch compares with: pruned neurons stay dead, the parent model is
untouched, and clean accuracy survives."""
from __future__ import annotations

import torch

from offline.datasets import load_dataset
from offline.fine_pruning import _last_hidden, fine_prune
from repair.bundle import Bundle
from repair.metrics import accuracy


def test_fine_pruning_zeroes_the_dormant_neurons_and_keeps_accuracy(digits_vit_badnets):
    version = Bundle(digits_vit_badnets).version()
    model = version.build_model()
    data = load_dataset("digits")
    before = _last_hidden(model).weight.clone()
    x, y = data.x_train[:400], data.y_train[:400]
    pruned = fine_prune(model, x, y, ratio=0.7, epochs=1)
    layer = _last_hidden(pruned)
    dead = (layer.weight == 0).all(1) & (layer.bias == 0)
    assert int(dead.sum()) == int(0.7 * layer.out_features)
    assert torch.equal(_last_hidden(model).weight, before)  # a copy was pruned, not the model
    assert accuracy(pruned, data.x_test, data.y_test) >= accuracy(model, data.x_test, data.y_test) - 0.1
