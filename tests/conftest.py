from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
VOC_MINI = SHARED_DATA / "voc-mini"
ADE_SAMPLE = SHARED_DATA / "ade-sample"


@pytest.fixture(scope="session")
def voc_root() -> Path:
    if not (VOC_MINI / "VOC2012" / "JPEGImages").is_dir():
        pytest.fail(f"test data missing: {VOC_MINI} (the shared/ folder must sit beside the repository)")
    return VOC_MINI


@pytest.fixture(scope="session")
def ade_root() -> Path:
    if not (ADE_SAMPLE / "ADEChallengeData2016").is_dir():
        pytest.fail(f"test data missing: {ADE_SAMPLE}")
    return ADE_SAMPLE


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models gain nothing from two, the CPU is shared, and the kernels are the same in subprocesses
    started with OMP_NUM_THREADS=1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
