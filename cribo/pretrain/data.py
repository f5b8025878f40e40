"""Pretraining datasets: any folder of images, ImageNet / COCO / VOC / generic layouts, Hugging Face.

Pretraining needs images only (no labels). :func:`build_pretraining_dataset` turns a ``source`` into a
map-style dataset whose items are the transform's output, ``(view1, view2, coords1, coords2)`` for
:class:`cribo.pretrain.transforms.TwoViewTransform` (plus the item's index with ``return_index=True``).

``source`` is one of

- ``hf:<name>[:<split>]``: a Hugging Face dataset loaded by name (``datasets.load_dataset``; needs
  the hub or its local cache), or ``hf:<dir>[:<split>]`` / a plain ``<dir>`` written by
  ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``). The image column is the only column of type
  ``datasets.Image`` (or the one named ``image``; else pass ``image_column``).
- a folder. Known layouts are recognised and their TRAINING split is used, so that evaluation
  images and label masks never leak into pretraining (``split`` picks another one explicitly):

  ==========================  ============================================  ======================
  layout                      recognised by                                  default split
  ==========================  ============================================  ======================
  VOC                         ``[VOC2012/]JPEGImages`` + ``ImageSets/         ``train_aug`` if listed,
                              Segmentation/<split>.txt``                     else ``train``
  generic / COCO alt / ADE    ``images/<split>/`` (our synthetic layout,     ``train``, ``train2017``,
                              ``images/train2017``, ADE ``images/training``)  ``training``
  ImageNet / COCO             ``<split>/`` (``train/<class>/*.JPEG``,        ``train``, ``train2017``
                              ``train2017/*.jpg``)
  any folder                  none of the above                              the whole folder
  ==========================  ============================================  ======================

  Images are found recursively (symlinks followed, hidden entries skipped), by extension
  (``.jpg .jpeg .png .webp .bmp``, any case), in sorted relative-path order, so the index of an
  image is a pure function of the folder's content.

A corrupt or unreadable image raises :class:`CorruptImageError` naming the file. With
``skip_corrupt=True`` it is logged (``logging`` warning) and the next image in order is used instead,
so a long run does not die on one bad file; the default is to fail loudly.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from PIL import Image
from torch.utils.data import Dataset

from cribo.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "DataSourceError",
    "ImageFolderDataset",
    "HFImageDataset",
    "build_pretraining_dataset",
    "list_images",
    "resolve_image_files",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Default training split names per layout, tried in order (see the module docstring's table).
_VOC_TRAIN_SPLITS = ("train_aug", "train")
_TRAIN_SPLITS = ("train", "train2017", "training")
# Errors PIL raises on unreadable data: UnidentifiedImageError and truncation are OSErrors; some
# plugins raise ValueError / SyntaxError on broken headers; DecompressionBombError is its own class.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DataSourceError(DataError, ValueError):
    """The pretraining source cannot be used (missing, empty, unknown layout or split, hub offline)."""


class CorruptImageError(DataError, RuntimeError):
    """An image file (or dataset row) cannot be decoded; the message names it."""


def _decode(opener: Callable[[], Image.Image], what: str) -> Image.Image:
    """Open and fully decode an image as RGB, or raise CorruptImageError naming ``what``."""
    try:
        with opener() as img:  # closes the file PIL keeps open lazily
            return img.convert("RGB")  # forces the full decode: truncation shows up here
    except _DECODE_ERRORS as exc:
        raise CorruptImageError(
            f"{what}: cannot decode image ({type(exc).__name__}: {exc}). Remove or replace it, or pass "
            "--skip-corrupt (skip_corrupt=True) to skip unreadable images with a warning."
        ) from exc


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All image files under ``folder`` (recursive, symlinks followed, hidden entries skipped), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataSourceError(f"{folder}: not a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(
            Path(dirpath, f) for f in filenames
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _voc_files(root: Path, split: str | None) -> tuple[list[Path], str] | None:
    for base in (root / "VOC2012", root):
        jpeg, sets = base / "JPEGImages", base / "ImageSets" / "Segmentation"
        if not (jpeg.is_dir() and sets.is_dir()):
            continue
        names = (split,) if split is not None else _VOC_TRAIN_SPLITS
        for name in names:
            listing = sets / f"{name}.txt"
            if listing.is_file():
                ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
                files = [jpeg / f"{i}.jpg" for i in ids]
                missing = [f for f in files if not f.is_file()]
                if missing:
                    raise DataSourceError(
                        f"{listing}: {len(missing)} listed images are missing from {jpeg}, e.g. {missing[0]}"
                    )
                return files, f"voc:{name}"
        available = sorted(p.stem for p in sets.glob("*.txt"))
        raise DataSourceError(
            f"{root}: VOC layout: split {' / '.join(map(repr, names))} not found in {sets} "
            f"(available: {available}); pass split=<one of them>"
        )
    return None


def resolve_image_files(root: str | os.PathLike, split: str | None = None) -> tuple[list[Path], str]:
    """Image files of the pretraining split of folder ``root`` and a layout description.

    ``split=None`` picks the layout's training split (module docstring); an explicit ``split`` must
    exist in a recognised layout. Raises :class:`DataSourceError` when nothing usable is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataSourceError(f"{root}: no such directory (expected a folder of images, a dataset root, "
                              "or hf:<name>)")
    voc = _voc_files(root, split)
    if voc is not None:
        files, layout = voc
    else:
        names = (split,) if split is not None else _TRAIN_SPLITS
        sub = next((root / "images" / n for n in names if (root / "images" / n).is_dir()), None)
        layout = f"images/{sub.name}" if sub is not None else ""
        if sub is None and (root / "images").is_dir() and any(
            p.is_dir() for p in (root / "images").iterdir()
        ):
            splits = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
            raise DataSourceError(
                f"{root}: split {' / '.join(map(repr, names))} not found in {root / 'images'} "
                f"(available: {splits}); pass split=<one of them>, or point at a folder of images only"
            )
        if sub is None:
            sub = next((root / n for n in names if (root / n).is_dir()), None)
            layout = f"{sub.name}/" if sub is not None else ""
        if sub is None:
            if split is not None:
                raise DataSourceError(
                    f"{root}: split {split!r} not found (looked for {root / 'images' / split} and "
                    f"{root / split}); omit split to use the whole folder"
                )
            sub, layout = root, "folder"
        files = list_images(sub)
        root = sub
    if not files:
        raise DataSourceError(
            f"{root}: no images found (recursive search for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files, layout


class ImageFolderDataset(Dataset):
    """Images of a folder (see :func:`resolve_image_files` for layouts); items are ``transform(img)``.

    Args:
        root: the folder (or a dataset root with a recognised layout).
        transform: PIL RGB image -> tuple (e.g. ``TwoViewTransform``); None returns the image itself.
        split: layout split (None: the layout's training split, or the whole folder).
        skip_corrupt: log and replace an unreadable image by the next one instead of raising.
        return_index: append the index of the image actually used to every item.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        split: str | None = None,
        skip_corrupt: bool = False,
        return_index: bool = False,
    ) -> None:
        self.root = Path(root)
        self.files, self.layout = resolve_image_files(self.root, split)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.return_index = return_index

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, index: int) -> Image.Image:
        """Decoded RGB image ``index``; raises :class:`CorruptImageError` naming the file."""
        path = self.files[index]
        return _decode(lambda: Image.open(path), str(path))

    def __getitem__(self, index: int) -> Any:
        return _get_item(self, index)

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, layout={self.layout!r}, {len(self)} images)"


class HFImageDataset(Dataset):
    """Rows of a Hugging Face ``datasets.Dataset``; items are ``transform(row[image_column])``.

    Same options as :class:`ImageFolderDataset`; ``name`` is used in messages.
    """

    def __init__(
        self,
        hf_dataset: Any,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        name: str = "hf dataset",
        image_column: str | None = None,
        skip_corrupt: bool = False,
        return_index: bool = False,
    ) -> None:
        self.name = name
        self.image_column = _image_column(hf_dataset, image_column, name)
        # Only decode the image column (other columns may be large or undecodable).
        self.rows = hf_dataset.select_columns([self.image_column])
        self.layout = f"hf:{self.image_column}"
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.return_index = return_index
        if len(self.rows) == 0:
            raise DataSourceError(f"{name}: the dataset has no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def load_image(self, index: int) -> Image.Image:
        what = f"{self.name} row {index} (column {self.image_column!r})"

        def opener() -> Image.Image:
            img = self.rows[index][self.image_column]
            if not isinstance(img, Image.Image):
                raise ValueError(f"expected a PIL image, got {type(img).__name__}")
            return img

        return _decode(opener, what)

    def __getitem__(self, index: int) -> Any:
        return _get_item(self, index)

    def __repr__(self) -> str:
        return f"HFImageDataset({self.name!r}, column={self.image_column!r}, {len(self)} images)"


def _get_item(ds: ImageFolderDataset | HFImageDataset, index: int) -> Any:
    if not -len(ds) <= index < len(ds):
        raise IndexError(f"index {index} out of range for {len(ds)} images")
    index %= len(ds)
    for attempt in range(len(ds)):
        i = (index + attempt) % len(ds)
        try:
            img = ds.load_image(i)
        except CorruptImageError as exc:
            if not ds.skip_corrupt:
                raise
            log.warning("skipping corrupt image (skip_corrupt=True): %s", exc)
            continue
        out = img if ds.transform is None else ds.transform(img)
        if not ds.return_index:
            return out
        return (*out, i) if isinstance(out, tuple) else (out, i)
    raise CorruptImageError(f"{ds!r}: every image is unreadable")


def _image_column(hf_dataset: Any, requested: str | None, name: str) -> str:
    import datasets  # noqa: PLC0415  (optional dependency, imported when a HF source is used)

    features = hf_dataset.features
    if requested is not None:
        if requested not in features:
            raise DataSourceError(f"{name}: no column {requested!r} (columns: {list(features)})")
        return requested
    image_cols = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    if len(image_cols) == 1:
        return image_cols[0]
    if "image" in image_cols:
        return "image"
    if not image_cols:
        raise DataSourceError(f"{name}: no column of type datasets.Image (columns: {dict(features)}); "
                              "pass image_column=<name> if images are stored differently")
    raise DataSourceError(f"{name}: several image columns {image_cols}; pass image_column=<one of them>")


def _is_saved_hf_dir(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def _load_hf(spec: str, split: str | None) -> tuple[Any, str]:
    """``datasets.Dataset`` for a saved directory or a hub name; ``split`` defaults to ``train``."""
    import datasets  # noqa: PLC0415

    path = Path(spec)
    if _is_saved_hf_dir(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            name = split or "train"
            if name not in loaded:
                raise DataSourceError(f"{path}: no split {name!r} (splits: {list(loaded)}); "
                                      "use hf:<dir>:<split>")
            return loaded[name], f"{path}:{name}"
        if split is not None:
            raise DataSourceError(f"{path}: a single saved split; drop ':{split}' from the source")
        return loaded, str(path)
    if path.exists():
        raise DataSourceError(f"{path}: not a dataset written by save_to_disk "
                              "(no dataset_dict.json, or state.json + dataset_info.json)")
    name = split or "train"
    try:
        ds = datasets.load_dataset(spec, split=name)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as exc:
        # Offline hub, unknown name or split: say what failed and how to fix it.
        raise DataSourceError(
            f"hf:{spec}:{name}: could not load the Hugging Face dataset ({type(exc).__name__}: {exc}). "
            "If this machine is offline, download it elsewhere and pass the save_to_disk directory "
            "(hf:<dir>), or pre-populate the datasets cache; check the name and split."
        ) from exc
    return ds, f"hf:{spec}:{name}"


def build_pretraining_dataset(
    source: str | os.PathLike,
    transform: Callable[[Image.Image], Any] | None,
    *,
    split: str | None = None,
    skip_corrupt: bool = False,
    return_index: bool = False,
    image_column: str | None = None,
) -> ImageFolderDataset | HFImageDataset:
    """The pretraining dataset for ``source`` (folder, layout root, ``hf:<name>[:split]``, saved dir).

    Items are ``transform(img)``, e.g. ``(view1, view2, coords1, coords2)`` for TwoViewTransform,
    with the image index appended when ``return_index``. See the module docstring for the sources.
    """
    text = os.fspath(source)
    if text.startswith("hf:"):
        spec, _, hf_split = text[3:].partition(":")
        if not spec:
            raise DataSourceError(f"{text!r}: expected hf:<name>[:<split>] or hf:<dir>[:<split>]")
        if split is not None and hf_split and split != hf_split:
            raise DataSourceError(f"{text!r}: split given twice ({hf_split!r} and split={split!r})")
        hf_ds, name = _load_hf(spec, hf_split or split)
        return HFImageDataset(hf_ds, transform, name=name, image_column=image_column,
                              skip_corrupt=skip_corrupt, return_index=return_index)
    path = Path(text)
    if _is_saved_hf_dir(path):
        hf_ds, name = _load_hf(text, split)
        return HFImageDataset(hf_ds, transform, name=name, image_column=image_column,
                              skip_corrupt=skip_corrupt, return_index=return_index)
    if image_column is not None:
        raise DataSourceError(f"{path}: image_column only applies to Hugging Face datasets")
    return ImageFolderDataset(path, transform, split=split, skip_corrupt=skip_corrupt,
                              return_index=return_index)

