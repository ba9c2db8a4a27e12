"""Shared setup for the RAFS tests: the real Nydus images, or a skip saying why not."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.rafs.fixture_paths import FIXTURES


@pytest.fixture
def nydus_fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"Nydus fixtures not found at {FIXTURES} (shared/ is not beside the repo)")
    return FIXTURES
