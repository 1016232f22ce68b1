"""Shared test helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES_ENV = "SSNI_FIXTURES"
REQUIRE_ENV = "SSNI_REQUIRE_FIXTURES"
DEFAULT_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def _missing(reason: str) -> None:
    """Skip, or fail when ``SSNI_REQUIRE_FIXTURES=1`` (CI must never skip silently)."""
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{reason}; {REQUIRE_ENV} is set, so this is an error", pytrace=False)
    pytest.skip(reason)


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
    _missing(
        f"architecture fixtures not found at {path} (set {FIXTURES_ENV} to the folder "
        "holding *.small.json / *.manifest.json)"
    )


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The Fashion-MNIST folder (``$SSNI_FASHION_MNIST_DIR`` or the Debian location) with all
    four idx files. The one check for "Fashion-MNIST present": skips when absent, fails when
    ``SSNI_REQUIRE_FIXTURES=1`` (CI)."""
    from ssni.data.fashion_mnist import FILES, resolve_dir

    path = resolve_dir()
    stems = [stem for pair in FILES.values() for stem in pair]
    if all((path / (s + ".gz")).is_file() or (path / s).is_file() for s in stems):
        return path
    _missing(
        f"Fashion-MNIST idx files not found in {path} (apt-get install dataset-fashion-mnist, "
        "or set SSNI_FASHION_MNIST_DIR)"
    )
