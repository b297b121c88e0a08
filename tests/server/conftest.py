"""Fixtures for the server tests: small bundles (helpers live in ``server_live``)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from repair.bundle import copy_bundle


@pytest.fixture(scope="session")
def digits_data():
    from offline.datasets import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="module")
def plain_bundle(digits_vit_badnets, tmp_path_factory) -> Path:
    """A writable copy of the BadNets digits ViT, without a detector (plain predictions)."""
    return copy_bundle(digits_vit_badnets, tmp_path_factory.mktemp("plain") / "digits")


@pytest.fixture(scope="session")
def tabular_bundle(tmp_path_factory) -> Path:
    """A tiny FT-Transformer bundle with a hand-made schema (random weights, seeded)."""
    from repair.bundle import Bundle, state_dict_for_saving
    from repair.models import build_model
    from repair.tabular import Feature, TabularSchema

    schema = TabularSchema([Feature("age", "numeric", mean=40.0, std=10.0),
                            Feature("hours", "numeric", mean=40.0, std=12.0),
                            Feature("sex", "categorical", categories=["Female", "Male"]),
                            Feature("work", "categorical", categories=["private", "gov", "self"])],
                           protected=["sex"])
    spec = {"arch": "ft-transformer", "n_numeric": 2, "cardinalities": [2, 3], "num_classes": 2,
            "d_block": 16, "n_blocks": 1, "n_heads": 2}
    torch.manual_seed(0)
    model = build_model(spec).eval()
    out = tmp_path_factory.mktemp("tab") / "tab"
    Bundle(out).write_version({"kind": "tabular", "architecture": spec, "labels": ["<=50K", ">50K"],
                               "preprocessing": {"kind": "tabular", **schema.to_json()},
                               "dataset": {"name": "synthetic"}, "defect": {"type": "none"},
                               "metrics": {}, "provenance": {"created_by": "tests"}},
                              {"model": state_dict_for_saving(model)})
    return out


@pytest.fixture(scope="module")
def atpatch_bundle(digits_vit_badnets_atpatch) -> Path:
    """The shared BadNets digits ViT with its AtPatch detector (read-only: served, never written)."""
    return digits_vit_badnets_atpatch
