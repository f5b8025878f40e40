"""What the app loads once and shares between requests: the backbone, support indices, object banks.

Nothing is loaded on import or when :class:`AppState` is created: every resource is built on first use
(or by :meth:`AppState.warm_up`, which ``app.py`` calls before serving) and cached in the instance.
Locks make concurrent first requests build a resource once.

The built-in default (``--index`` not given): a support set of generated scenes
(:func:`cribo.synthetic.write_split`, split ``support``, seed :data:`BUILTIN_SUPPORT_SEED`, a seed never
used for training) written to ``cache_dir`` on first start, and its flat index built with
:func:`index.protocol.build_support_index` and saved under ``cache_dir/index-<backbone>``; later starts
load it. Held-out scenes (split ``heldout``, seed 1002) serve as example queries with ground truth and
as the Evaluate tab's default split.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from app.draw import class_palette
from app.inputs import InputError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".cache" / "builtin-support"
BUILTIN_SUPPORT_SPLIT, BUILTIN_SUPPORT_SEED, BUILTIN_SUPPORT_SCENES = "support", 1001, 200
BUILTIN_EXAMPLE_SPLIT, BUILTIN_EXAMPLE_SEED, BUILTIN_EXAMPLE_SCENES = "heldout", 1002, 24

__all__ = ["AppConfig", "AppState", "IndexEntry", "DEFAULT_CACHE"]


@dataclass(frozen=True)
class AppConfig:
    """Everything ``app.py`` passes in (see its ``--help``)."""

    backbone: str | None = "builtin"
    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    index: str | None = None
    cache_dir: Path = DEFAULT_CACHE
    device: str = "cpu"
    precision: str = "auto"
    builtin_scenes: int = BUILTIN_SUPPORT_SCENES
    max_side: int = 1024
    max_pixels: int = 40_000_000
    num_workers: int = 0


@dataclass
class IndexEntry:
    """A loaded support index and what the UI shows about it."""

    index: object  # index.store.SupportIndex
    source: str  # "built-in" or the directory
    class_names: list[str]
    palette: np.ndarray  # (C, 3) uint8
    added: dict[str, int] = field(default_factory=dict)  # patches added by in-context labelling, per class

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:
        meta = self.index.meta
        ds = meta.get("dataset", {})
        where = f"{ds.get('kind', '?')} `{ds.get('root', '?')}` split `{meta.get('split', ds.get('split', '?'))}`"
        ratio = meta.get("ratio")
        images = len(meta.get("image_ids", []))
        text = (f"**{self.source}**: {self.index.ntotal:,} labelled patches ({self.index.kind}) from {images} "
                f"images of {where}" + (f" at ratio 1/{ratio}" if ratio else "")
                + f"; {self.num_classes} classes; backbone {meta.get('backbone', {}).get('source', '?')}")
        if self.added:
            text += "; **plus your labels**: " + ", ".join(f"{c} +{n}" for c, n in self.added.items())
        return text

    def with_added(self, xb: np.ndarray, labels: np.ndarray) -> "IndexEntry":
        """A copy of this entry whose index also holds ``xb (m, D)`` with ``labels (m,)``.

        The FAISS index is cloned (the shared one is never modified), then
        :meth:`index.store.SupportIndex.add` appends the new patches.
        """
        from index.store import SupportIndex

        base = self.index
        clone = SupportIndex(faiss.clone_index(base.index), base.labels.copy(), base.kind, base.params,
                             dict(base.meta), gpu=base.search_device != "cpu")
        clone.add(xb, labels)
        added = dict(self.added)
        for c, n in zip(*np.unique(labels, return_counts=True)):
            added[self.class_names[int(c)]] = added.get(self.class_names[int(c)], 0) + int(n)
        return IndexEntry(clone, self.source, self.class_names, self.palette, added)


class AppState:
    """Lazily loaded, cached resources of one app process (no globals)."""

    def __init__(self, config: AppConfig):
        self.config = config
        self._lock = threading.RLock()
        self._backbone = None
        self._indices: dict[str, IndexEntry] = {}
        self._banks: dict[tuple, object] = {}
        self._examples: list[list[str]] | None = None

    # ------------------------------------------------------------------ backbone
    def backbone(self):
        """The :class:`cribo.backbones.Backbone` of the config (loaded once, eval mode)."""
        with self._lock:
            if self._backbone is None:
                from cribo.backbones import load_backbone

                c = self.config
                self._backbone = load_backbone(c.backbone, c.weights, random_init=c.random_init, seed=c.seed,
                                               device=c.device)
            return self._backbone

    # ------------------------------------------------------------------ indices
    def index_key(self, source: str | None) -> str:
        """Normalised name of an index choice: "" (or None, "default") -> the default index."""
        source = (source or "").strip()
        if source in ("", "default", "built-in"):
            return str(Path(self.config.index).resolve()) if self.config.index else "built-in"
        return str(Path(source).expanduser().resolve())

    def index(self, source: str | None = "") -> IndexEntry:
        """The support index for a UI choice: blank -> the default (``--index`` or built-in), else a
        directory written by ``build_index.py``. Checked against the backbone, cached."""
        key = self.index_key(source)
        with self._lock:
            if key not in self._indices:
                if key == "built-in":
                    index = self._builtin_index()
                else:
                    from index.store import SupportIndex

                    index = SupportIndex.load(key)
                index.check_compatible(self.backbone())
                names = index.meta.get("class_names")
                if not names:
                    raise InputError(f"support index {key} records no class names (meta.json "
                                     "'class_names'); rebuild it with build_index.py")
                if index.ntotal == 0:
                    raise InputError(f"support index {key} is empty: rebuild it with build_index.py")
                self._indices[key] = IndexEntry(index, key, list(names), class_palette(len(names)))
            return self._indices[key]

    def builtin_root(self) -> Path:
        return Path(self.config.cache_dir)

    def _builtin_index(self):
        from cribo.synthetic import write_split
        from index.datasets import open_dataset
        from index.protocol import build_support_index
        from index.store import SupportIndex

        backbone = self.backbone()
        root = self.builtin_root()
        tag = hashlib.sha256(backbone.identity.encode()).hexdigest()[:16]
        directory = root / f"index-{tag}"
        if (directory / "meta.json").is_file():
            return SupportIndex.load(directory)
        images = root / "images" / BUILTIN_SUPPORT_SPLIT
        if len(list(images.glob("*.png"))) < self.config.builtin_scenes:
            write_split(root, BUILTIN_SUPPORT_SPLIT, self.config.builtin_scenes, BUILTIN_SUPPORT_SEED)
        dataset = open_dataset("folder", root, BUILTIN_SUPPORT_SPLIT)
        return build_support_index(backbone, dataset, ratio=1, kind="flat", cache_dir=root / "features",
                                   device=self.config.device, precision=self.config.precision,
                                   num_workers=self.config.num_workers, out=directory)

    # ------------------------------------------------------------------ datasets behind an index
    def support_dataset(self, entry: IndexEntry):
        """The dataset split an index was built from (its meta.json ``dataset``), for the Matches bank."""
        from index.datasets import open_dataset

        ds = entry.index.meta.get("dataset", {})
        kind, root, split = ds.get("kind"), ds.get("root"), ds.get("split", entry.index.meta.get("split"))
        if not (kind and root and split):
            raise InputError(f"support index {entry.source} does not record its dataset (meta.json 'dataset' "
                             "kind/root/split): rebuild it with build_index.py")
        return open_dataset(kind, root, split)

    # ------------------------------------------------------------------ examples
    def examples(self) -> list[list[str]]:
        """``[[image, mask], ...]`` example queries with ground truth for the default index.

        Built-in index: held-out generated scenes (split ``heldout``, seed 1002, written once; also the
        Evaluate tab's default split). Otherwise the first images of the query split of the index's
        dataset (e.g. VOC val), or none if that split cannot be opened."""
        with self._lock:
            if self._examples is None:
                self._examples = self._find_examples()
            return self._examples

    def _find_examples(self) -> list[list[str]]:
        from cribo.synthetic import write_split
        from index.datasets import DEFAULT_SPLITS, DatasetError, open_dataset

        if not self.config.index:
            root = self.builtin_root()
            folder = root / "images" / BUILTIN_EXAMPLE_SPLIT
            if len(list(folder.glob("*.png"))) < BUILTIN_EXAMPLE_SCENES:
                write_split(root, BUILTIN_EXAMPLE_SPLIT, BUILTIN_EXAMPLE_SCENES, BUILTIN_EXAMPLE_SEED)
            images = sorted(folder.glob("*.png"))[:BUILTIN_EXAMPLE_SCENES]
            return [[str(p), str(root / "masks" / BUILTIN_EXAMPLE_SPLIT / p.name)] for p in images]
        ds = self.index("").index.meta.get("dataset", {})
        kind = ds.get("kind")
        if kind not in ("voc", "ade20k", "folder") or not ds.get("root"):
            return []
        try:
            query = open_dataset(kind, ds["root"], DEFAULT_SPLITS[kind][1])
        except DatasetError:
            return []  # the index's dataset has no query split here: the UI shows no examples
        n = min(3, len(query.ids))
        return [[str(query.image_path(i)), str(query.mask_path(i))] for i in range(n)]

    # ------------------------------------------------------------------ object banks (Matches tab)
    def bank(self, key: tuple, build):
        """The object bank cached under ``key``, built by ``build()`` on first use (a few kept)."""
        with self._lock:
            if key not in self._banks:
                if len(self._banks) >= 4:
                    self._banks.pop(next(iter(self._banks)))
                self._banks[key] = build()
            return self._banks[key]

    def warm_up(self) -> IndexEntry:
        """Load the backbone and the default index now (``app.py`` calls this before serving)."""
        self.backbone()
        entry = self.index("")
        self.examples()
        return entry
