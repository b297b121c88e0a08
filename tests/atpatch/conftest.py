"""AtPatch fixtures: the session's one detector build is the shared ``digits_vit_badnets_atpatch``."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_patched(digits_vit_badnets_atpatch) -> Path:
    """The shared BadNets bundle with its AtPatch detector version (read-only)."""
    return digits_vit_badnets_atpatch
