"""Shared test helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES_ENV = "SSNI_FIXTURES"
REQUIRE_ENV = "SSNI_REQUIRE_FIXTURES"
DEFAULT_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def fixtures_dir() -> Path:
    """The architecture fixtures folder: ``$SSNI_FIXTURES`` or ``../shared/fixtures``."""
    return Path(os.environ.get(FIXTURES_ENV) or DEFAULT_FIXTURES)


@pytest.fixture
def public_fixtures() -> Path:
    """Path of the fixtures folder. Skips when it is absent, but fails when
    ``SSNI_REQUIRE_FIXTURES=1`` (CI), so CI can never silently skip these tests."""
    path = fixtures_dir()
    if path.is_dir() and any(path.glob("*.small.json")):
        return path
    reason = (
        f"architecture fixtures not found at {path} (set {FIXTURES_ENV} to the folder "
        "holding *.small.json / *.manifest.json)"
    )
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{reason}; {REQUIRE_ENV} is set, so this is an error", pytrace=False)
    pytest.skip(reason)
