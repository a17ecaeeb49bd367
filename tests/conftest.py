import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("ST_AR_GOLDEN", REPO.parent / "shared" / "golden"))


def load_golden(name: str) -> dict:
    path = GOLDEN / name
    if not path.exists():
        pytest.skip(f"golden file {path} not found (set ST_AR_GOLDEN to the folder holding it)")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def gpt_golden() -> dict:
    return load_golden("gpt_tiny.pt")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
