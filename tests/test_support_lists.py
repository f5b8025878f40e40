"""Explicit support lists (--support-list): parsing, errors, and runs equal to the seeded draw of the same ids."""
from __future__ import annotations

import json

import pytest

import evaluate
from cribo.backbones import load_backbone
from helpers_data import make_folder_dataset
from index.datasets import open_dataset
from index.protocol import run_protocol
from index.store import select_support
from index.support_lists import SupportListError, read_support_lists

SPLIT = [f"train_{j:03d}" for j in range(9)]


def test_file_and_folder_with_hummingbird_names(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train_4_42.txt").write_text("# published list\ntrain_003\n\ntrain_001  \n")
    (tmp_path / "lists" / "train_4_7.txt").write_text("train_000\ntrain_008\n")
    (tmp_path / "lists" / "notes.md").write_text("not a list")
    lists = read_support_lists(tmp_path / "lists", SPLIT)
    assert [(sl.name, sl.ratio, sl.seed, sl.ids) for sl in lists] == [
        ("train_4_42", 4, 42, ["train_003", "train_001"]), ("train_4_7", 4, 7, ["train_000", "train_008"])]
    one = read_support_lists(tmp_path / "lists" / "train_4_7.txt", SPLIT)
    assert len(one) == 1 and one[0].describe()["num_ids"] == 2 and len(one[0].sha256) == 64


def test_other_names_get_ratio_from_size_and_seed_from_position(tmp_path):
    (tmp_path / "a.txt").write_text("train_000\ntrain_001\ntrain_002\n")  # 9 / 3 -> ratio 3
    (tmp_path / "b.txt").write_text("train_004\n")  # 9 / 1 -> ratio 9
    lists = read_support_lists(tmp_path, SPLIT)
    assert [(sl.name, sl.ratio, sl.seed) for sl in lists] == [("a", 3, 0), ("b", 9, 1)]


def test_missing_ids_stop_unless_allowed(tmp_path):
    f = tmp_path / "voc_8_1.txt"
    f.write_text("train_001\n2008_007456\ntrain_002\n")
    with pytest.raises(SupportListError, match=r"voc_8_1.txt: 1 of its 3 ids are not in the train split "
                                               r"\(2008_007456\).*--allow-missing-ids"):
        read_support_lists(f, SPLIT, split="train")
    (sl,) = read_support_lists(f, SPLIT, allow_missing=True)
    assert sl.ids == ["train_001", "train_002"] and sl.missing == ["2008_007456"]
    assert sl.describe()["num_missing"] == 1


@pytest.mark.parametrize("content,message", [
    ("", "holds no image id"),
    ("# only a comment\n\n", "holds no image id"),
    ("train_001\ntrain_001\n", "repeats ids train_001"),
    ("2008_000001\n", "none of its 1 ids is in the support split"),
])
def test_bad_lists_are_named(tmp_path, content, message):
    f = tmp_path / "l.txt"
    f.write_text(content)
    with pytest.raises(SupportListError, match=message):
        read_support_lists(f, SPLIT, allow_missing=True)


def test_bad_paths(tmp_path):
    with pytest.raises(SupportListError, match="does not exist"):
        read_support_lists(tmp_path / "absent.txt", SPLIT)
    with pytest.raises(SupportListError, match=r"folder without any \*.txt list"):
        read_support_lists(tmp_path, SPLIT)
    (tmp_path / "x.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SupportListError, match="unreadable"):
        read_support_lists(tmp_path / "x.txt", SPLIT)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("lists")
    root = make_folder_dataset(base / "ds", {"train": 9, "val": 3})
    backbone = load_backbone("vit_tiny_patch16_224", random_init=True, seed=0)
    train, val = open_dataset("folder", root, "train"), open_dataset("folder", root, "val")
    return root, backbone, train, val, base / "cache"


def test_listed_runs_equal_the_seeded_draws_of_the_same_ids(setup, tmp_path):
    root, backbone, train, val, cache = setup
    kw = dict(k=3, cache_dir=cache, num_workers=0, progress=False, log=None)
    drawn = run_protocol(backbone, train, val, ratios=(2,), seeds=2, **kw)
    for seed in (0, 1):  # written in reverse order: the run must not depend on the file's order
        ids = select_support(train.ids, 2, seed)
        (tmp_path / f"train_2_{seed}.txt").write_text("\n".join(reversed(ids)) + "\n")
    listed = run_protocol(backbone, train, val, support_lists=read_support_lists(tmp_path, train.ids), **kw)
    e, d = listed["ratios"]["2"], drawn["ratios"]["2"]
    assert e["miou"] == d["miou"] and e["support_ids"] == d["support_ids"] and e["seeds"] == [0, 1]
    assert e["support_lists"] == ["train_2_0", "train_2_1"]
    assert [sl["name"] for sl in listed["support_lists"]] == ["train_2_0", "train_2_1"]
    assert drawn["support_lists"] is None and "support_lists" not in d


def test_lists_repeating_a_ratio_and_seed_are_refused(setup, tmp_path):
    _, backbone, train, val, cache = setup
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train_2_0.txt").write_text("train_000\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train_2_0.txt").write_text("train_001\n")
    lists = read_support_lists(tmp_path / "a", train.ids) + read_support_lists(tmp_path / "b", train.ids)
    with pytest.raises(ValueError, match=r"repeat a \(ratio, seed\) pair"):
        run_protocol(backbone, train, val, support_lists=lists, k=1, cache_dir=cache, num_workers=0,
                     progress=False, log=None)


def test_cli_names_the_list_in_results(setup, tmp_path, capsys):
    root, *_, cache = setup
    (tmp_path / "mine.txt").write_text("train_000\ntrain_004\ntrain_005\nnot_here\n")
    args = ["--dataset", "folder", "--root", str(root), "--backbone", "vit_tiny_patch16_224", "--random-init",
            "--k", "3", "--workers", "0", "--cache-dir", str(cache), "--support-list", str(tmp_path / "mine.txt"),
            "--out", str(tmp_path / "res" / "results.json")]
    assert evaluate.main(args) == 2
    assert "1 of its 4 ids are not in the train split (not_here)" in capsys.readouterr().err
    assert evaluate.main(args + ["--allow-missing-ids"]) == 0
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    assert list(res["ratios"]) == ["3"] and res["ratios"]["3"]["support_lists"] == ["mine"]
    assert res["support_lists"][0]["missing"] == ["not_here"]
    md = (tmp_path / "res" / "results.md").read_text()
    assert "- support lists: `mine` (3 ids, 1 missing)" in md
