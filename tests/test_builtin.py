"""The shipped built-in backbone: present, small, loadable, and the checksum the model card states."""
import json
import re

import torch

from cribo.backbones import BUILTIN_ARCH, BUILTIN_WEIGHTS, file_sha256, load_backbone

CARD = BUILTIN_WEIGHTS.parent / "MODEL_CARD.md"


def test_builtin_files_and_size():
    assert BUILTIN_WEIGHTS.is_file() and BUILTIN_WEIGHTS.with_suffix(".json").is_file() and CARD.is_file()
    assert BUILTIN_WEIGHTS.stat().st_size <= 25 * 2**20


def test_builtin_checksum_matches_model_card_and_json():
    sha = file_sha256(BUILTIN_WEIGHTS)
    meta = json.loads(BUILTIN_WEIGHTS.with_suffix(".json").read_text())
    assert meta["sha256"] == sha
    assert re.search(rf"sha256[^\n]*`{sha}`", CARD.read_text()), "MODEL_CARD.md must state the file's sha256"


def test_builtin_loads_and_differs_from_random_init():
    bb = load_backbone("builtin")
    assert bb.arch == BUILTIN_ARCH and bb.identity == file_sha256(BUILTIN_WEIGHTS)
    rnd = load_backbone("builtin", random_init=True, seed=0)
    assert rnd.arch == BUILTIN_ARCH and rnd.identity != bb.identity
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = bb.forward_features(x), rnd.forward_features(x)
    assert a["grid"] == (4, 6) and a["x_norm_patchtokens"].shape == (1, 24, bb.embed_dim)
    assert not torch.allclose(a["x_norm_patchtokens"], b["x_norm_patchtokens"])
