from pathlib import Path

import pytest

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
