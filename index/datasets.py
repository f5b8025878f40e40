"""Segmentation datasets for retrieval: images and class-id masks, in split-list order.

Every dataset is a :class:`SegDataset`: ``ids`` (image ids, the file stems as in VOC's split lists),
``class_names``, ``void = 255``, ``load_image(i) -> (H, W, 3) uint8 RGB`` and
``load_mask(i) -> (H, W) uint8`` already mapped to class ids ``0..C-1`` with void 255
(eval-protocol.md step 7). Layouts (``open_dataset(kind, root, split)``):

- ``voc``: ``ROOT/JPEGImages``, ``ROOT/ImageSets/Segmentation/<split>.txt``; masks from
  ``SegmentationClassAug`` for ``train_aug``, else ``SegmentationClass`` where present (else
  ``SegmentationClassAug``, whose val masks are identical). ROOT may also be a parent holding
  ``VOC2012/`` or ``VOCdevkit/VOC2012/``. Masks are palette PNGs: their palette indices are the ids.
- ``ade20k``: ``ROOT/images/<split>/*.jpg`` + ``ROOT/annotations/<split>/*.png`` (or a parent holding
  ``ADEChallengeData2016/``); label 0 ("other") -> void, 1..150 -> 0..149.
- ``folder``: ``ROOT/images/<split>/<id>.<jpg|jpeg|png>``, ``ROOT/masks/<split>/<id>.png``,
  ``ROOT/classes.txt`` (one class name per line, line index = class id), void 255.
- ``hf``: a Hugging Face ``datasets`` dataset, a hub name or a folder written by ``save_to_disk``.

Images are decoded with Pillow and ``convert("RGB")``; EXIF orientation is deliberately not applied,
so image pixels stay aligned with mask pixels. Bad data raises :class:`DatasetError` naming the file
and the fix; missing files are found when the dataset is opened, unreadable or mismatched files when
they are loaded.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cribo.constants import VOID
from cribo.errors import EXIT_USAGE, DataError

__all__ = [
    "DatasetError",
    "SegDataset",
    "FileSegDataset",
    "HFSegDataset",
    "open_dataset",
    "KINDS",
    "DEFAULT_SPLITS",
    "VOC_CLASSES",
    "ADE20K_CLASSES",
    "VOID",
]

IMAGE_EXTS = (".jpg", ".jpeg", ".png")

DEFAULT_SPLITS: dict[str, tuple[str, str]] = {
    "voc": ("train_aug", "val"),
    "ade20k": ("training", "validation"),
    "folder": ("train", "val"),
    "hf": ("train", "validation"),
}
"""(support split, query split) per dataset kind."""

KINDS: tuple[str, ...] = tuple(DEFAULT_SPLITS)

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# First names of ADEChallengeData2016/objectInfo150.txt, used when that file is absent.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator",
    "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall",
    "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)


class DatasetError(DataError, ValueError):
    """Bad dataset layout or content; the message names the file and the fix."""


# ----------------------------------------------------------------------------- decoding helpers

_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _open_pil(source: Path | bytes, what: str) -> Image.Image:
    """Open and fully decode an image file (or encoded bytes), naming ``what`` on failure."""
    try:
        im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        im.load()
    except _PIL_ERRORS as e:
        raise DatasetError(
            f"cannot read {what}: {type(e).__name__}: {e}. The file is corrupt or not an image: "
            f"re-download it or remove its id from the split"
        ) from e
    return im


def _image_size(source: Path | bytes, what: str) -> tuple[int, int]:
    """``(H, W)`` from the image header only (no pixel decoding)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            w, h = im.size
    except _PIL_ERRORS as e:
        raise DatasetError(
            f"cannot read {what}: {type(e).__name__}: {e}. The file is corrupt or not an image: "
            f"re-download it or remove its id from the split"
        ) from e
    return h, w


def _decode_image(source: Path | bytes, what: str) -> np.ndarray:
    im = _open_pil(source, what)
    return np.asarray(im.convert("RGB"))


_SINGLE_CHANNEL_MODES = ("P", "L", "1", "I", "I;16", "I;16L", "I;16B")


def _decode_mask_array(im: Image.Image, what: str) -> np.ndarray:
    """Raw class-id array of a single-channel mask (palette indices for mode P, never colours)."""
    if im.mode not in _SINGLE_CHANNEL_MODES:
        channels = len(im.getbands())
        raise DatasetError(
            f"mask {what} has {channels} channels (mode {im.mode}): expected a single-channel PNG of "
            f"class ids (palette or grayscale), not a colour rendering; convert it to class ids"
        )
    arr = np.asarray(im)
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DatasetError(
                f"mask {what} holds values {arr.min()}..{arr.max()}: class ids must fit in 0..255 "
                f"(void 255); expected a single-channel PNG of class ids"
            )
        arr = arr.astype(np.uint8)
    return arr


def _map_and_check(raw: np.ndarray, lut: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    """Map raw values through ``lut`` (256,) uint8 and check every id is < C or void."""
    mask = lut[raw]
    bad = (mask >= num_classes) & (mask != VOID)
    if bad.any():
        vals = np.unique(raw[bad])[:10].tolist()
        raise DatasetError(
            f"mask {what} has values {vals} that are not class ids of this dataset "
            f"({num_classes} classes + void {VOID}): expected a single-channel PNG of class ids "
            f"(an RGB colour mask or a mask of another dataset?)"
        )
    return mask


def _identity_lut() -> np.ndarray:
    return np.arange(256, dtype=np.uint8)


def _reduce_zero_lut() -> np.ndarray:
    """ADE20K mapping: 0 -> void, k -> k-1 (so raw 255 becomes 254, an invalid id for C <= 254)."""
    lut = (np.arange(256) - 1).astype(np.uint8)  # 0 wraps to 255 = void
    return lut


# ----------------------------------------------------------------------------- datasets


class SegDataset:
    """A split of a segmentation dataset: ids in split-list order, images and class-id masks.

    Attributes: ``kind`` (voc, ade20k, folder, hf), ``name``, ``root``, ``split``, ``ids``
    (list[str]), ``class_names`` (list[str], index = class id), ``void`` (255).
    """

    void: int = VOID

    def __init__(self, *, kind: str, name: str, root: str | Path, split: str, ids: list[str],
                 class_names: list[str]):
        if not ids:
            raise DatasetError(f"split '{split}' of {root} is empty: add image ids to it or choose another split")
        if not 0 < len(class_names) <= VOID:
            raise DatasetError(f"{len(class_names)} class names: a dataset needs 1..{VOID} classes")
        self.kind = kind
        self.name = name
        self.root = root
        self.split = split
        self.ids = list(ids)
        self.class_names = list(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, root={str(self.root)!r}, split={self.split!r}, "
                f"images={len(self)}, classes={self.num_classes})")

    def image_path(self, i: int) -> Path:
        """The image file of item ``i`` (file-based datasets only)."""
        raise DatasetError(f"{self.kind} dataset {self.name} has no image files: use load_image(i)")

    def mask_path(self, i: int) -> Path:
        """The mask file of item ``i`` (file-based datasets only)."""
        raise DatasetError(f"{self.kind} dataset {self.name} has no mask files: use load_mask(i)")

    def load_image(self, i: int) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB."""
        raise NotImplementedError

    def load_mask(self, i: int) -> np.ndarray:
        """``(H, W)`` uint8 class ids, void 255, checked against the image size."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-able description (for index and results metadata)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "root": str(self.root),
            "split": self.split,
            "num_images": len(self),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "void": self.void,
        }

    def _content_key(self) -> list[Any]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 hex of the description, the ids and the content key (file sizes and mtimes, or
        the Hugging Face fingerprint): changes whenever the images, masks or split change."""
        payload = {"describe": self.describe(), "ids": self.ids, "content": self._content_key()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class FileSegDataset(SegDataset):
    """Images and masks as files: ``image_paths[i]``, ``mask_paths[i]`` for ``ids[i]``.

    ``lut`` (256,) uint8 maps raw mask values to class ids (identity, or ADE's 0 -> void, k -> k-1).
    All files are checked to exist when the dataset is built.
    """

    def __init__(self, *, kind: str, name: str, root: str | Path, split: str, ids: list[str],
                 class_names: list[str], image_paths: list[Path], mask_paths: list[Path],
                 lut: np.ndarray | None = None):
        super().__init__(kind=kind, name=name, root=root, split=split, ids=ids, class_names=class_names)
        if not len(image_paths) == len(mask_paths) == len(ids):
            raise ValueError("ids, image_paths and mask_paths must have the same length")
        self.image_paths = [Path(p) for p in image_paths]
        self.mask_paths = [Path(p) for p in mask_paths]
        self.lut = _identity_lut() if lut is None else np.asarray(lut, dtype=np.uint8)
        for paths, what in ((self.image_paths, "image"), (self.mask_paths, "mask")):
            missing = [(i, p) for i, p in enumerate(paths) if not p.is_file()]
            if missing:
                shown = ", ".join(f"{self.ids[i]} ({p})" for i, p in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise DatasetError(
                    f"{len(missing)} ids of split '{split}' have no {what} file: {shown}{more}. "
                    f"Restore the files or remove the ids from the split"
                )

    def head(self, n: int) -> "FileSegDataset":
        """The first ``n`` images of this split (same classes and mask mapping), e.g. for a quick run."""
        if n >= len(self.ids):
            return self
        return FileSegDataset(kind=self.kind, name=self.name, root=self.root, split=self.split,
                              ids=self.ids[:n], class_names=self.class_names, image_paths=self.image_paths[:n],
                              mask_paths=self.mask_paths[:n], lut=self.lut)

    def image_path(self, i: int) -> Path:
        return self.image_paths[i]

    def mask_path(self, i: int) -> Path:
        return self.mask_paths[i]

    def load_image(self, i: int) -> np.ndarray:
        return _decode_image(self.image_paths[i], f"image {self.image_paths[i]}")

    def load_mask(self, i: int) -> np.ndarray:
        path = self.mask_paths[i]
        raw = _decode_mask_array(_open_pil(path, f"mask {path}"), str(path))
        h, w = _image_size(self.image_paths[i], f"image {self.image_paths[i]}")
        if raw.shape != (h, w):
            raise DatasetError(
                f"mask {path} is {raw.shape[0]}x{raw.shape[1]} but image {self.image_paths[i]} is "
                f"{h}x{w} (HxW): a mask must have its image's size; fix or remove id {self.ids[i]}"
            )
        return _map_and_check(raw, self.lut, self.num_classes, str(path))

    def _content_key(self) -> list[Any]:
        key = []
        for p in (*self.image_paths, *self.mask_paths):
            st = p.stat()
            key.append([st.st_size, st.st_mtime_ns])
        return key


# ----------------------------------------------------------------------------- layouts


def _require_dir(root: Path) -> Path:
    if not root.exists():
        raise DatasetError(f"dataset root {root} does not exist: check --root", exit_code=EXIT_USAGE)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a directory: check --root")
    return root


def _read_split_file(path: Path, available: list[str]) -> list[str]:
    if not path.is_file():
        raise DatasetError(
            f"split list {path} not found: choose one of the splits {available or '(none found)'} "
            f"or create the file (one image id per line)"
        )
    ids = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) == 1 and "/" not in tokens[0]:
            ids.append(tokens[0])
        elif Path(tokens[0]).suffix.lower() in IMAGE_EXTS:  # DeepLab style "/JPEGImages/x.jpg /Seg.../x.png"
            ids.append(Path(tokens[0]).stem)
        else:
            raise DatasetError(f"{path} line {n}: expected one image id per line, got {line!r}")
    if not ids:
        raise DatasetError(f"split list {path} is empty: add image ids (one per line) or choose another split")
    _check_unique(ids, str(path))
    return ids


def _check_unique(ids: list[str], where: str) -> None:
    if len(set(ids)) != len(ids):
        dups = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise DatasetError(f"{where} lists ids more than once: {dups[:5]}; remove the duplicates")


def _find_layout_root(root: Path, marker: str, parents: tuple[str, ...], hint: str) -> Path:
    _require_dir(root)
    candidates = [root, *(root / p for p in parents)]
    for c in candidates:
        if (c / marker).is_dir():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise DatasetError(f"no {marker}/ in {tried}: {hint}")


def _open_voc(root: Path, split: str) -> FileSegDataset:
    base = _find_layout_root(
        root, "JPEGImages", ("VOC2012", "VOCdevkit/VOC2012"),
        "--root must be the VOC folder holding JPEGImages/ (or its parent holding VOC2012/)",
    )
    lists = base / "ImageSets" / "Segmentation"
    available = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
    ids = _read_split_file(lists / f"{split}.txt", available)
    if split == "train_aug" or not (base / "SegmentationClass").is_dir():
        mask_dir = base / "SegmentationClassAug"
    else:
        mask_dir = base / "SegmentationClass"
    if not mask_dir.is_dir():
        raise DatasetError(f"mask folder {mask_dir} not found: VOC split '{split}' needs it (see eval-protocol.md)")
    return FileSegDataset(
        kind="voc", name="voc2012", root=base, split=split, ids=ids, class_names=list(VOC_CLASSES),
        image_paths=[base / "JPEGImages" / f"{i}.jpg" for i in ids],
        mask_paths=[mask_dir / f"{i}.png" for i in ids],
    )


def _list_images(folder: Path, split: str, available: list[str]) -> dict[str, Path]:
    """``{stem: path}`` of the images in ``folder``, sorted by stem."""
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} not found: choose one of the splits {available or '(none found)'}")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_EXTS or not p.is_file():
            continue
        if p.stem in found:
            raise DatasetError(f"two images with id {p.stem} in {folder} ({found[p.stem].name}, {p.name}): keep one")
        found[p.stem] = p
    if not found:
        raise DatasetError(f"split '{split}' is empty: no .jpg/.jpeg/.png images in {folder}")
    return found


def _ade_class_names(base: Path) -> list[str]:
    info = base / "objectInfo150.txt"
    if not info.is_file():
        return list(ADE20K_CLASSES)
    lines = [ln for ln in info.read_text(encoding="utf-8").splitlines() if ln.strip()]
    header = lines[0].split("\t")
    if "Name" not in header:
        raise DatasetError(f"{info}: no 'Name' column in the header {header}; restore the original file or delete it")
    col = header.index("Name")
    names = [ln.split("\t")[col].split(",")[0].split(";")[0].strip() for ln in lines[1:]]
    if len(names) != 150:
        raise DatasetError(f"{info} lists {len(names)} classes, expected 150: restore the original file or delete it")
    return names


def _open_ade20k(root: Path, split: str) -> FileSegDataset:
    base = _find_layout_root(
        root, "images", ("ADEChallengeData2016",),
        "--root must be the ADEChallengeData2016 folder holding images/ and annotations/ (or its parent)",
    )
    available = sorted(p.name for p in (base / "images").iterdir() if p.is_dir())
    images = _list_images(base / "images" / split, split, available)
    ids = list(images)
    return FileSegDataset(
        kind="ade20k", name="ade20k", root=base, split=split, ids=ids, class_names=_ade_class_names(base),
        image_paths=list(images.values()),
        mask_paths=[base / "annotations" / split / f"{i}.png" for i in ids],
        lut=_reduce_zero_lut(),
    )


def _open_folder(root: Path, split: str) -> FileSegDataset:
    _require_dir(root)
    classes = root / "classes.txt"
    if not classes.is_file():
        raise DatasetError(f"{classes} not found: the folder layout needs one class name per line (line index = class id)")
    names = classes.read_text(encoding="utf-8").splitlines()
    while names and not names[-1].strip():
        names.pop()
    if any(not n.strip() for n in names):
        raise DatasetError(f"{classes} has an empty line among the class names: every line up to the last is a class")
    available = sorted(p.name for p in (root / "images").iterdir() if p.is_dir()) if (root / "images").is_dir() else []
    images = _list_images(root / "images" / split, split, available)
    ids = list(images)
    return FileSegDataset(
        kind="folder", name=root.name, root=root, split=split, ids=ids, class_names=[n.strip() for n in names],
        image_paths=list(images.values()),
        mask_paths=[root / "masks" / split / f"{i}.png" for i in ids],
    )


# ----------------------------------------------------------------------------- Hugging Face

_HF_IMAGE_COLUMNS = ("image", "img", "pixel_values")
_HF_MASK_COLUMNS = ("annotation", "label", "mask", "segmentation", "semantic_map", "seg_map", "labels")
_HF_ID_COLUMNS = ("id", "image_id", "file_name", "filename")


def _pick_column(columns: list[str], given: str | None, candidates: tuple[str, ...], what: str, arg: str) -> str:
    if given is not None:
        if given not in columns:
            raise DatasetError(f"{what} column '{given}' not in the dataset's columns {columns}: fix {arg}")
        return given
    found = [c for c in candidates if c in columns]
    if not found:
        raise DatasetError(f"no {what} column among {columns} (looked for {list(candidates)}): pass {arg}")
    return found[0]


def _find_class_label(feature: Any) -> list[str] | None:
    """Names of a ClassLabel nested anywhere in ``feature`` (e.g. List(List(ClassLabel)))."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    inner = getattr(feature, "feature", None)
    if inner is not None:
        return _find_class_label(inner)
    return None


class HFSegDataset(SegDataset):
    """A split of a Hugging Face ``datasets.Dataset`` with an image column and a mask column.

    The image and mask columns are read undecoded when they are ``datasets.Image`` features (so a
    corrupt file gets our error), or as arrays otherwise. ``lut`` maps raw mask values to ids.
    """

    def __init__(self, ds: Any, *, name: str, root: str, split: str, image_column: str, mask_column: str,
                 class_names: list[str], ids: list[str], lut: np.ndarray):
        import datasets

        super().__init__(kind="hf", name=name, root=root, split=split, ids=ids, class_names=class_names)
        self.image_column = image_column
        self.mask_column = mask_column
        self.lut = lut
        self._fp = getattr(ds, "_fingerprint", None)
        cols = {}
        for col in (image_column, mask_column):
            view = ds.select_columns([col])
            if isinstance(ds.features[col], datasets.Image):
                view = view.cast_column(col, datasets.Image(decode=False))
            cols[col] = view
        self._images = cols[image_column]
        self._masks = cols[mask_column]

    def _what(self, i: int, kind: str) -> str:
        return f"{kind} of item {i} (id {self.ids[i]}) in Hugging Face dataset {self.name} split '{self.split}'"

    def _raw(self, view: Any, col: str, i: int, what: str) -> Image.Image | np.ndarray:
        value = view[int(i)][col]
        if isinstance(value, dict):  # undecoded datasets.Image: {"bytes": ..., "path": ...}
            source = value.get("bytes") or value.get("path")
            if source is None:
                raise DatasetError(f"{what} has neither bytes nor a path: the dataset is incomplete")
            return _open_pil(source if isinstance(source, bytes) else Path(source), what)
        if isinstance(value, Image.Image):
            return value
        return np.asarray(value)

    def _image_hw(self, i: int) -> tuple[int, int]:
        """The image's ``(H, W)``, from the encoded header where possible (no pixel decoding)."""
        what = self._what(i, "image")
        value = self._images[int(i)][self.image_column]
        if isinstance(value, dict):
            source = value.get("bytes") or value.get("path")
            if source is None:
                raise DatasetError(f"{what} has neither bytes nor a path: the dataset is incomplete")
            return _image_size(source if isinstance(source, bytes) else Path(source), what)
        if isinstance(value, Image.Image):
            return value.size[1], value.size[0]
        shape = np.shape(value)
        return shape[0], shape[1]

    def load_image(self, i: int) -> np.ndarray:
        what = self._what(i, "image")
        raw = self._raw(self._images, self.image_column, i, what)
        if isinstance(raw, Image.Image):
            return np.asarray(raw.convert("RGB"))
        if raw.dtype != np.uint8 or raw.ndim != 3 or raw.shape[2] != 3:
            raise DatasetError(f"{what} is an array of shape {raw.shape} {raw.dtype}: expected (H, W, 3) uint8")
        return raw

    def load_mask(self, i: int) -> np.ndarray:
        what = self._what(i, "mask")
        raw = self._raw(self._masks, self.mask_column, i, what)
        if isinstance(raw, Image.Image):
            arr = _decode_mask_array(raw, what)
        else:
            if raw.ndim != 2:
                raise DatasetError(
                    f"{what} has shape {raw.shape}: expected a single-channel (H, W) map of class ids"
                )
            if raw.size and (raw.min() < 0 or raw.max() > 255):
                raise DatasetError(f"{what} holds values {raw.min()}..{raw.max()}: class ids must fit in 0..255")
            arr = raw.astype(np.uint8)
        h, w = self._image_hw(i)
        if arr.shape != (h, w):
            raise DatasetError(
                f"{what} is {arr.shape[0]}x{arr.shape[1]} but its image is {h}x{w} (HxW): "
                f"a mask must have its image's size"
            )
        return _map_and_check(arr, self.lut, self.num_classes, what)

    def _content_key(self) -> list[Any]:
        return [self._fp, self.image_column, self.mask_column]


def _open_hf(root: str, split: str, *, image_column: str | None, mask_column: str | None,
             class_names: list[str] | None, reduce_zero_label: bool, id_column: str | None) -> HFSegDataset:
    import datasets

    if Path(root).exists():
        try:
            loaded = datasets.load_from_disk(str(root))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise DatasetError(
                f"{root} is not a Hugging Face dataset saved with save_to_disk ({e}); "
                f"pass such a folder or a hub name"
            ) from e
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DatasetError(f"split '{split}' not in {root}: choose one of {sorted(loaded)}")
            ds = loaded[split]
        elif loaded.split is not None and str(loaded.split) == split:
            ds = loaded
        else:
            raise DatasetError(
                f"{root} holds a single Dataset (split {loaded.split}), not split '{split}': save a "
                f"DatasetDict({{'{split}': ...}}) instead"
            )
        name = Path(root).name
    else:
        try:
            ds = datasets.load_dataset(root, split=split)
        except (OSError, ConnectionError, datasets.exceptions.DatasetsError) as e:
            raise DatasetError(
                f"cannot load Hugging Face dataset '{root}' split '{split}' ({type(e).__name__}: {e}). "
                f"If this machine is offline, run `datasets.load_dataset('{root}')` and `.save_to_disk(DIR)` "
                f"on one that reaches the hub, then pass DIR as the root"
            ) from e
        name = root
    columns = list(ds.column_names)
    image_col = _pick_column(columns, image_column, _HF_IMAGE_COLUMNS, "image", "image_column")
    mask_col = _pick_column(columns, mask_column, _HF_MASK_COLUMNS, "mask", "mask_column")
    if image_col == mask_col:
        raise DatasetError(f"image and mask column are both '{image_col}': pass image_column and mask_column")
    if class_names is None:
        names = _find_class_label(ds.features[mask_col])
        if names is None:
            raise DatasetError(
                f"no class names in the features of mask column '{mask_col}' of {root}: pass class_names"
            )
        class_names = names[1:] if reduce_zero_label else names
    if len(ds) == 0:
        raise DatasetError(f"split '{split}' of {root} is empty: choose another split")
    if id_column is None:
        id_column = next((c for c in _HF_ID_COLUMNS if c in columns), None)
    if id_column is not None:
        if id_column not in columns:
            raise DatasetError(f"id column '{id_column}' not in the dataset's columns {columns}: fix id_column")
        ids = [Path(str(v)).stem for v in ds[id_column]]
        _check_unique(ids, f"column '{id_column}' of {root} split '{split}'")
    else:
        ids = [f"{i:06d}" for i in range(len(ds))]
    return HFSegDataset(
        ds, name=name, root=str(root), split=split, image_column=image_col, mask_column=mask_col,
        class_names=list(class_names), ids=ids, lut=_reduce_zero_lut() if reduce_zero_label else _identity_lut(),
    )


# ----------------------------------------------------------------------------- entry point


def open_dataset(
    kind: str,
    root: str | Path,
    split: str,
    *,
    image_column: str | None = None,
    mask_column: str | None = None,
    class_names: list[str] | None = None,
    reduce_zero_label: bool = False,
    id_column: str | None = None,
) -> SegDataset:
    """Open ``split`` of the dataset of ``kind`` (voc, ade20k, folder, hf) at ``root``.

    ``root`` for ``hf`` is a folder written by ``save_to_disk`` (a DatasetDict) or a hub name. The
    keyword options apply to ``hf`` only: column names (auto-detected among image/img/pixel_values
    and annotation/label/mask/segmentation/...), ``class_names`` (default: the names of a ClassLabel
    in the mask feature), ``reduce_zero_label`` (ADE-style: 0 -> void, k -> k-1; drops the first
    feature class name), ``id_column`` (default: id/image_id/file_name if present, else the row number).
    Default splits per kind: :data:`DEFAULT_SPLITS`.
    """
    if kind not in KINDS:
        raise DatasetError(f"unknown dataset kind '{kind}': choose one of {list(KINDS)}")
    hf_opts = dict(image_column=image_column, mask_column=mask_column, class_names=class_names,
                   reduce_zero_label=reduce_zero_label, id_column=id_column)
    if kind == "hf":
        return _open_hf(str(root), split, **hf_opts)
    if any(v not in (None, False) for v in hf_opts.values()):
        raise DatasetError(f"options {[k for k, v in hf_opts.items() if v not in (None, False)]} apply to kind 'hf' only")
    root = Path(root).expanduser()
    if kind == "voc":
        return _open_voc(root, split)
    if kind == "ade20k":
        return _open_ade20k(root, split)
    return _open_folder(root, split)
