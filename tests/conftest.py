"""Shared test helpers: the fixture root comes from COSYVOICE2_FIXTURES (default ../shared/fixtures)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def fixture_root() -> Path:
    return Path(os.environ.get("COSYVOICE2_FIXTURES", REPO.parent / "shared" / "fixtures")).resolve()


@pytest.fixture(scope="session")
def fixtures() -> Path:
    root = fixture_root()
    if not root.is_dir():
        pytest.fail(f"fixture root {root} does not exist; set COSYVOICE2_FIXTURES")
    return root


def load_pt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def _single_thread():
    # The fixtures were produced with one thread; fewer threads also keep CI (2 cores) predictable.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
