"""Shared test settings: CPU only, one thread per worker (the suite runs with xdist on 2 cores)."""
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data beside the repo; tests that need it skip cleanly when it is absent."""
    if not (SHARED_DATA / "nasa").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
