"""The app over HTTP: ``app.py`` in a subprocess on 127.0.0.1, driven by ``gradio_client``.

The server runs a randomly initialised ViT-Tiny/16 (``--random-init``, seed 0) against a small flat
index of the first voc-mini ``train_aug`` images built here with ``build_index.py``'s library function.
Every endpoint is called on real voc-mini ``val`` images and its outputs are checked against the
library computed in this process: the predicted mask pixel for pixel, the mIoU, the object matches,
the batch mIoU of ``run_protocol``. Bad inputs must come back as errors with a clear message while
the server keeps answering. The ``app_server`` fixture is shared with ``test_app_browser.py``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image

from app.draw import class_palette
from app.label import colours_to_mask
from app.objects import ObjectBank, build_bank, cluster_images, match_objects
from cribo.backbones import load_backbone
from cribo.pretrain.bank import ObjectMemoryBank
from index.datasets import FileSegDataset, open_dataset
from index.features import extract_features
from index.labels import paint_patches, patch_labels, resize_mask
from index.metrics import confusion_matrix, mean_iou
from index.protocol import build_support_index, run_protocol
from index.store import SupportIndex
from index.transfer import knn_vote

REPO = Path(__file__).resolve().parents[1]
ARCH = "vit_tiny_patch16_224"
N_SUPPORT = 8  # first train_aug images in the index
MAX_SIDE, MAX_PIXELS = 512, 400_000  # VOC images (<= 500 px) are processed as they are


def first_images(ds: FileSegDataset, n: int) -> FileSegDataset:
    """The first ``n`` images of a file-based split, same classes."""
    return FileSegDataset(kind=ds.kind, name=ds.name, root=ds.root, split=ds.split, ids=ds.ids[:n],
                          class_names=ds.class_names, image_paths=ds.image_paths[:n],
                          mask_paths=ds.mask_paths[:n], lut=ds.lut)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    pytest.fail(f"app.py did not answer on {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


_RUNNING: dict[str, tuple] = {}  # one server per test session, also when test_app_browser.py imports the fixture


@pytest.fixture(scope="session")
def app_server(tmp_path_factory, voc_root):
    """``(url, index_dir, workdir)`` of a running app; stopped at the end of the session.

    ``test_app_browser.py`` imports this fixture, which makes pytest register it a second time; the
    module-level ``_RUNNING`` makes the second registration reuse the first server.
    """
    if "server" in _RUNNING:
        yield _RUNNING["server"]
        return
    work = tmp_path_factory.mktemp("app")
    backbone = load_backbone(ARCH, random_init=True, seed=0)
    train = first_images(open_dataset("voc", voc_root, "train_aug"), N_SUPPORT)
    index_dir = work / "index"
    # one feature cache for the index, the server (--cache-dir work/cache) and the reference runs below
    build_support_index(backbone, train, ratio=1, kind="flat", cache_dir=work / "cache" / "features",
                        num_workers=0, progress=False, out=index_dir)
    port = free_port()
    log = work / "server.log"
    cmd = [sys.executable, str(REPO / "app.py"), "--backbone", ARCH, "--random-init", "--index", str(index_dir),
           "--cache-dir", str(work / "cache"), "--port", str(port), "--max-side", str(MAX_SIDE),
           "--max-pixels", str(MAX_PIXELS)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}  # no network calls from the test server
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_up(proc, url, log)
        _RUNNING["server"] = (url, index_dir, work)
        yield _RUNNING["server"]
    finally:
        _RUNNING.pop("server", None)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def client(app_server):
    return Client(app_server[0], verbose=False)


@pytest.fixture(scope="module")
def lib(app_server, voc_root):
    """The same computation in this process: backbone, index, val split."""
    _, index_dir, work = app_server
    backbone = load_backbone(ARCH, random_init=True, seed=0)
    index = SupportIndex.load(index_dir)
    val = open_dataset("voc", voc_root, "val")
    return backbone, index, val, work


def library_prediction(lib, i: int):
    """Patch predictions, grid and patch labels of val image ``i`` via extract_features + knn_vote."""
    backbone, index, val, work = lib
    one = FileSegDataset(kind=val.kind, name=val.name, root=val.root, split=val.split, ids=[val.ids[i]],
                         class_names=val.class_names, image_paths=[val.image_paths[i]],
                         mask_paths=[val.mask_paths[i]], lut=val.lut)
    fs = extract_features(backbone, one, work / "lib-features", num_workers=0, progress=False)
    D, I = index.search(np.asarray(fs.features, np.float32), 50)
    pred, share = knn_vote(I, index.labels, len(val.class_names), D)
    return pred, share, tuple(int(v) for v in fs.grids[0]), fs.labels


def table(df: dict) -> list[list]:
    return df["data"]


# ---------------------------------------------------------------------------------------------- /segment
def test_segment_with_the_image_alone_returns_the_libraries_mask_as_a_class_id_png(client, lib):
    backbone, index, val, _ = lib
    i = 0
    path = val.image_paths[i]
    overlay, mask_png, legend, conf, scores, rows, latency, details = client.predict(handle_file(str(path)),
                                                                                     api_name="/segment")
    W, H = Image.open(path).size
    mask_im = Image.open(mask_png)
    assert mask_png.endswith(".png") and mask_im.format == "PNG"
    assert mask_im.mode in ("L", "P") and mask_im.size == (W, H)
    mask = np.asarray(mask_im)
    assert set(np.unique(mask).tolist()) <= set(np.unique(index.labels).tolist())
    pred, share, grid, _ = library_prediction(lib, i)
    expected = paint_patches(pred, grid, backbone.patch_size, (H, W))
    np.testing.assert_array_equal(mask, expected)
    assert Image.open(overlay).size == (W, H)
    assert details["grid"] == list(grid) and details["k"] == 50 and details["vote"] == "majority"
    assert details["mean_confidence"] == pytest.approx(float(share.mean()), abs=1e-6)
    for name in ("forward", "search", "vote", "drawing", "total"):
        assert details["timings_ms"][name] >= 0 and f"{name} " in latency
    present = {val.class_names[c] for c in np.unique(mask)}
    assert all(f">{name}<" in legend or f">{name} <" in legend for name in present)
    assert scores == "" and table(rows) == []


def test_segment_with_ground_truth_gives_the_library_miou(client, lib):
    backbone, index, val, _ = lib
    i = 1
    out = client.predict(handle_file(str(val.image_paths[i])), "", 50, "majority",
                         handle_file(str(val.mask_paths[i])), api_name="/segment")
    details, rows = out[7], table(out[5])
    pred, _, _, gt_patch = library_prediction(lib, i)
    C = len(val.class_names)
    expected = 100 * mean_iou(confusion_matrix(pred, gt_patch, C))
    assert details["miou_patch"] == pytest.approx(expected, abs=1e-9)
    # pixel level: painted prediction against the original mask, void ignored
    gt = val.load_mask(i)
    painted = paint_patches(pred, tuple(details["grid"]), backbone.patch_size, gt.shape)
    assert details["miou_pixel"] == pytest.approx(100 * mean_iou(confusion_matrix(painted, gt, C, ignore=(255,))),
                                                  abs=1e-9)
    assert f"mIoU {expected:.1f}%" in out[4]
    assert {r[1] for r in rows} == set(np.unique(np.concatenate([pred, gt_patch[gt_patch >= 0]])).tolist())


def test_segment_soft_vote_and_k_change_the_request(client, lib):
    _, _, val, _ = lib
    out = client.predict(handle_file(str(val.image_paths[2])), "", 7, "soft", None, api_name="/segment")
    assert out[7]["k"] == 7 and out[7]["vote"] == "soft"
    assert 0.0 < out[7]["mean_confidence"] <= 1.0


def test_large_image_is_downscaled_and_the_mask_keeps_its_size(client, lib, tmp_path):
    _, _, val, _ = lib
    big = tmp_path / "wide.png"
    Image.fromarray(val.load_image(0)).resize((600, 300)).save(big)  # longer side 600 > --max-side 512
    out = client.predict(handle_file(str(big)), api_name="/segment")
    assert Image.open(out[1]).size == (600, 300)
    assert out[7]["processed_size"] == [256, 512] and "processed at 512x256" in out[7]["note"]


# ---------------------------------------------------------------------------------------------- /clusters
def test_clusters_split_both_views_and_mark_one_view_clusters_dropped(client, lib):
    _, _, val, _ = lib
    args = (handle_file(str(val.image_paths[3])), 3, 0.3, 6, 1.0, False)
    v1, v2, boxes, summary, df = client.predict(*args, api_name="/clusters")
    rows = table(df)
    assert [r[0] for r in rows] == list(range(6))
    n = (224 // 16) ** 2
    assert sum(r[2] for r in rows) == n and sum(r[3] for r in rows) == n
    for _, _, c1, c2, status in rows:
        want = "kept" if c1 and c2 else "dropped: view 1 only" if c1 else "dropped: view 2 only" if c2 else "empty"
        assert status == want
    kept = sum(r[4] == "kept" for r in rows)
    assert summary.startswith(f"**{kept} of 6 clusters are objects**")
    assert Image.open(v1).size == Image.open(v2).size == (448, 448)
    assert Image.open(boxes).size == Image.open(val.image_paths[3]).size
    # the same arguments give the same clustering (seeded views and seeds)
    assert table(client.predict(*args, api_name="/clusters")[4]) == rows


# ---------------------------------------------------------------------------------------------- /matches
def test_matches_equal_the_bank_lookup_computed_here(client, lib, app_server):
    backbone, index, val, _ = lib
    sheet, df, summary = client.predict(handle_file(str(val.image_paths[4])), "", 4, 6, 1.0, 0, 0.3,
                                        api_name="/matches")
    rows = table(df)
    train = open_dataset("voc", val.root, "train_aug")
    ids = index.meta["image_ids"][:4]
    pics = [Image.fromarray(train.load_image(train.ids.index(i))) for i in ids]
    obank = build_bank(backbone, pics, ids, K=6, lambda_pos=1.0, seed=1, scale_min=0.3, photometric=False)
    query = cluster_images(backbone, [Image.fromarray(val.load_image(4))], K=6, lambda_pos=1.0, seed=0, scale_min=0.3,
                           photometric=False)
    found = match_objects(obank, query)
    assert len(rows) == len(found) == int(query.valid.sum()) > 0
    for r, m in zip(rows, found):
        assert r[:4] == [m.k, m.size, ids[m.image], m.k_match]
        assert r[4] == pytest.approx(m.cosine, abs=1e-3) and r[5] == m.cycle_consistent
    # the picture: two pairs (224 | 224) with a caption band per row
    cell_w, cell_h, gap = 2 * 224 + 8, 224 + 26, 12
    rows_drawn = -(-len(rows) // 2)
    assert Image.open(sheet).size == (2 * cell_w + gap, rows_drawn * (cell_h + gap) - gap)
    assert f"**{sum(r[5] for r in rows)} cycle-consistent**" in summary


def test_bank_query_positions_map_back_to_the_newest_push():
    K, D = 3, 8
    ones = torch.ones(4, K, dtype=torch.bool)
    bank = ObjectMemoryBank(5, K, D, dtype=torch.float32)
    older = torch.randn(4, K, D)
    bank.push(older, older, ones)  # the next push wraps the ring
    c = torch.randn(3, K, D)
    bank.push(c, c, ones[:3])
    ob = ObjectBank(bank, None, ["a", "b", "c"])
    for i in range(3):  # each object of image i finds itself (cosine 1)
        q = bank.query(c[i:i + 1], c[i:i + 1], ones[:1])
        assert [ob.image_of_position(p) for p in q.idx1[0].tolist()] == [(i, k) for k in range(K)]


# ---------------------------------------------------------------------------------------------- /evaluate
def test_evaluate_json_miou_equals_run_protocol(client, lib, app_server, voc_root):
    backbone, index, val, work = lib
    summary, df, chart, files, results = client.predict("voc", str(voc_root), "val", 5, "", 50, "majority",
                                                        api_name="/evaluate")
    train = first_images(open_dataset("voc", voc_root, "train_aug"), N_SUPPORT)
    ref = run_protocol(backbone, train, first_images(val, 5), ratios=[1], seeds=1, k=50,
                       cache_dir=work / "cache" / "features", num_workers=0, progress=False, log=None)
    expected = ref["ratios"]["1"]["mean"]
    assert results["ratios"]["1"]["mean"] == pytest.approx(expected, abs=1e-9)
    assert results["num_query_patches"] == ref["num_query_patches"]
    paths = {Path(f).suffix: f for f in files}
    saved = json.loads(Path(paths[".json"]).read_text())
    assert saved["ratios"]["1"]["miou"] == [pytest.approx(expected, abs=1e-9)]
    assert f"{expected:.4f}" in Path(paths[".csv"]).read_text()
    rows = table(df)
    iou = ref["per_class_iou"]["1"]
    assert [[r[0], r[1]] for r in rows] == [[val.class_names[c], c] for c, v in enumerate(iou) if v is not None]
    assert all(r[2] == pytest.approx(iou[r[1]], abs=0.01) for r in rows)
    assert Image.open(chart).format == "PNG" and f"mIoU {expected:.2f}%" in summary


# ---------------------------------------------------------------------------------------------- /label
def test_label_adds_painted_patches_and_changes_the_segmentation(app_server, lib, tmp_path):
    backbone, index, val, _ = lib
    c = Client(app_server[0], verbose=False)  # own session: its labels must not reach the other tests
    image = val.load_image(5)
    H, W = image.shape[:2]
    palette = class_palette(len(val.class_names))
    paint = np.zeros((H, W, 4), np.uint8)
    paint[:, : W // 2] = (*palette[12], 255)  # left half: dog
    paint[: H // 2, W // 2:] = (*palette[7], 128)  # half-transparent: not a label
    bg, layer = tmp_path / "bg.png", tmp_path / "layer.png"
    Image.fromarray(image).save(bg)
    Image.fromarray(paint).save(layer)
    editor = {"background": handle_file(str(bg)), "layers": [handle_file(str(layer))], "composite": None, "id": None}
    query = handle_file(str(val.image_paths[6]))
    before, after, summary = c.predict(editor, query, "", 50, "majority", api_name="/label")
    mask = colours_to_mask(paint, palette)
    p = backbone.patch_size
    labels = patch_labels(resize_mask(mask, (H // p * p, W // p * p)), p, len(val.class_names))
    n = int((labels >= 0).sum())
    assert (labels[labels >= 0] == 12).all() and n > 0
    assert f"Added **{n} labelled patches** from the painted image: dog {n}." in summary
    assert f"now holds {index.ntotal + n:,} patches" in summary
    qh, qw = val.load_image(6).shape[:2]
    assert Image.open(before).size == Image.open(after).size == (qw, qh)
    # the session's index is used by /segment; /forget_labels restores the original one
    seg = c.predict(query, api_name="/segment")
    assert seg[7]["index_patches"] == index.ntotal + n
    c.predict(api_name="/forget_labels")
    assert c.predict(query, api_name="/segment")[7]["index_patches"] == index.ntotal


# ---------------------------------------------------------------------------------------------- bad input
def expect_error(client, match: str, *args, api_name: str):
    with pytest.raises(Exception, match=match):
        client.predict(*args, api_name=api_name)


def test_bad_inputs_give_clear_errors_and_the_server_keeps_serving(client, lib, tmp_path):
    _, _, val, _ = lib
    img = handle_file(str(val.image_paths[0]))
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    expect_error(client, "notes.jpg is not a readable image", handle_file(str(text)), api_name="/segment")
    huge = tmp_path / "huge.png"
    Image.new("RGB", (800, 600)).save(huge)  # 0.48 MP > --max-pixels 0.4 MP
    expect_error(client, r"above this app's limit", handle_file(str(huge)), api_name="/segment")
    small = tmp_path / "small_mask.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(small)
    expect_error(client, "the mask must have the image's size", img, "", 50, "majority", handle_file(str(small)),
                 api_name="/segment")
    rgb = tmp_path / "rgb_mask.png"
    Image.fromarray(np.zeros((*val.load_mask(0).shape, 3), np.uint8)).save(rgb)
    expect_error(client, "single-channel PNG", img, "", 50, "majority", handle_file(str(rgb)), api_name="/segment")
    ids = tmp_path / "ids_mask.png"
    Image.fromarray(np.full(val.load_mask(0).shape, 40, np.uint8)).save(ids)
    expect_error(client, r"values \[40\] that are not class ids", img, "", 50, "majority", handle_file(str(ids)),
                 api_name="/segment")
    expect_error(client, "support index directory not found", img, str(tmp_path / "nowhere"), api_name="/segment")
    (tmp_path / "empty").mkdir()
    expect_error(client, "incomplete", img, str(tmp_path / "empty"), api_name="/segment")
    expect_error(client, "Value 500 is greater than maximum value 200", img, "", 500, api_name="/segment")
    expect_error(client, "dataset root", "voc", "", "val", api_name="/evaluate")
    expect_error(client, "Value 1 is less than minimum value 2", img, 0, 0.25, 1, api_name="/clusters")
    # still serving
    out = client.predict(img, api_name="/segment")
    assert Image.open(out[1]).mode in ("L", "P")


# ---------------------------------------------------------------------------------------------- drawing helpers
def test_painted_colours_map_to_class_ids_exactly():
    palette = class_palette(21)
    assert len({tuple(c) for c in class_palette(256)}) == 256  # every id its own colour
    rgba = np.zeros((2, 4, 4), np.uint8)
    rgba[0, 0] = (*palette[15], 255)  # person
    rgba[0, 1] = (*palette[0], 255)  # background (black) is a class, not "unpainted"
    rgba[0, 2] = (*palette[15], 254)  # anti-aliased edge: partial alpha
    rgba[0, 3] = (*((palette[15].astype(int) + palette[7]) // 2), 255)  # blended colour
    rgba[1, 0] = (*palette[20], 255)
    rgba[1, 1] = (*class_palette(22)[21], 255)  # a colour beyond this index's classes
    expected = np.array([[15, 0, 255, 255], [20, 255, 255, 255]], np.uint8)  # row 1, cols 2-3: alpha 0
    np.testing.assert_array_equal(colours_to_mask(rgba, palette), expected)


def test_label_mask_png_round_trips_class_ids(tmp_path):
    from app.draw import label_mask_png

    mask = np.random.default_rng(0).integers(0, 21, (37, 53)).astype(np.uint8)
    mask[:3, :5] = 255
    label_mask_png(mask, class_palette(21), tmp_path / "m.png")
    im = Image.open(tmp_path / "m.png")
    assert im.mode == "P" and im.size == (53, 37)
    np.testing.assert_array_equal(np.asarray(im), mask)
    assert im.getpalette()[15 * 3:16 * 3] == class_palette(21)[15].tolist()
