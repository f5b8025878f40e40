"""FAISS support indices: the labelled support patches of the retrieval protocol.

A :class:`SupportIndex` holds ``ntotal`` L2-normalised patch features ``xb (n, D)`` in a FAISS index
(similarity = inner product = cosine, eval-protocol step 2) together with their class labels
``(n,) int64``. Index kinds come from a small registry, :data:`INDEX_KINDS`:

- ``flat``: ``IndexFlatIP``, exact search (the protocol's reference).
- ``ivf``: ``IndexIVFScalarQuantizer`` with fp16 storage, ``nlist ~ 4 sqrt(n)`` inverted lists
  trained on a seeded sample, ``nprobe`` lists visited per query.
- ``hnsw``: ``IndexHNSWSQ`` with fp16 storage, ``M = 32`` links, ``efSearch`` configurable.

On disk an index is one directory (a symlink to a complete versioned sibling, swapped atomically by
:mod:`cribo.dirswap`, so a failure or a kill never clobbers a good index)::

    DIR/index.faiss   faiss.write_index of the CPU index
    DIR/labels.npy    (ntotal,) int64, saved with allow_pickle=False
    DIR/meta.json     backbone identity, dataset, split, ratio, seed, image ids, class names, ...

No pickle anywhere. :meth:`SupportIndex.load` validates the three files and the metadata.

GPU: with ``faiss-gpu`` installed instead of ``faiss-cpu`` (``pip install faiss-gpu``; CI stays on the
CPU package) and a CUDA device visible, ``flat`` and ``ivf`` indices are cloned to the GPU for search
(``gpu=None`` means exactly that rule; ``gpu=True`` makes a missing GPU an error). HNSW has no GPU
implementation in FAISS and always searches on the CPU. :attr:`SupportIndex.search_device` says
where a search runs.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import faiss
import numpy as np

from cribo import dirswap
from cribo.contracts import BackboneProtocol
from cribo.errors import DataError

INDEX_FILE = "index.faiss"
LABELS_FILE = "labels.npy"
META_FILE = "meta.json"
INDEX_FILES = (INDEX_FILE, LABELS_FILE, META_FILE)
FORMAT_VERSION = 1
REQUIRED_META_KEYS = ("format", "kind", "ntotal", "dim", "faiss_version", "created", "params")

def check_k(k: int, n_support: int) -> None:
    """Raise a clear ``ValueError`` unless ``1 <= k <= n_support``: the one check of ``k``, made by
    every index kind's ``search(xq, k)`` and by the runs before their expensive steps."""
    if k < 1:
        raise ValueError(f"k={k} must be at least 1: pass --k 1 or more")
    if k > n_support:
        raise ValueError(
            f"k={k} larger than the index ({n_support} vectors): lower --k or use a larger support ratio"
        )


_ADD_CHUNK = 65536  # rows converted to float32 and added at a time: bounds the float32 copy


def is_index_dir(directory: Path) -> bool:
    """True when ``directory/meta.json`` is the metadata of an index this code wrote."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and all(key in meta for key in REQUIRED_META_KEYS) and meta["kind"] in INDEX_KINDS


def check_index_target(directory: str | os.PathLike, *, label: str = "--out") -> None:
    """Refuse, before any compute, an output that :meth:`SupportIndex.save` would refuse."""
    dirswap.check_target(directory, owned=is_index_dir, expected=INDEX_FILES, label=label)


class IndexLoadError(DataError, ValueError):
    """A saved support index is missing, corrupt or inconsistent."""


class IncompatibleIndexError(DataError, ValueError):
    """A support index was built with another backbone than the one it is queried with."""


@dataclass(frozen=True)
class IndexParams:
    """Knobs of the approximate kinds (ignored by ``flat``).

    nlist: IVF lists; None -> ``4 * sqrt(n)`` (at most ``n // 39`` so each list gets the 39
      training points FAISS asks for, at least 1).
    nprobe: IVF lists visited per query.
    hnsw_m: HNSW links per node. ef_search / ef_construction: HNSW beam widths.
    train_size: IVF training sample, None -> ``min(n, 64 * nlist)`` rows drawn with ``seed``.
    """

    nlist: int | None = None
    nprobe: int = 32
    hnsw_m: int = 32
    ef_search: int = 128
    ef_construction: int = 40
    train_size: int | None = None
    seed: int = 0

    @staticmethod
    def for_run(params: "IndexParams | None", seed: int) -> "IndexParams":
        """The knobs of one protocol run: ``params`` (or the defaults) with the run's ``seed``, so the
        IVF training sample is drawn per run whether or not knobs were given."""
        return dataclasses.replace(params or IndexParams(), seed=seed)


def default_nlist(n: int) -> int:
    """``round(4 sqrt(n))`` clamped to ``[1, n // 39]``."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def _make_flat(dim: int, n: int, params: IndexParams) -> faiss.Index:
    return faiss.IndexFlatIP(dim)


def _make_ivf(dim: int, n: int, params: IndexParams) -> faiss.Index:
    nlist = params.nlist or default_nlist(n)
    # the factory wires a flat inner-product coarse quantizer that the index owns
    index = faiss.index_factory(dim, f"IVF{nlist},SQfp16", faiss.METRIC_INNER_PRODUCT)
    index.nprobe = params.nprobe
    return index


def _make_hnsw(dim: int, n: int, params: IndexParams) -> faiss.Index:
    index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = params.ef_construction
    index.hnsw.efSearch = params.ef_search
    return index


#: kind name -> factory(dim, n, params) returning an empty (maybe untrained) FAISS index
INDEX_KINDS: dict[str, Callable[[int, int, IndexParams], faiss.Index]] = {
    "flat": _make_flat,
    "ivf": _make_ivf,
    "hnsw": _make_hnsw,
}
_GPU_KINDS = ("flat", "ivf")


def faiss_has_gpu() -> bool:
    """True when the installed faiss is built with GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _as_float32_rows(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, D), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]}, the index has {dim}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_labels(labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if n and labels.min() < 0:
        raise ValueError("labels must be >= 0: unlabelled patches (-1) do not belong in a support index")
    return labels.astype(np.int64)


class SupportIndex:
    """Support patch features in a FAISS index plus their labels and metadata.

    Attributes: ``index`` (the CPU faiss index, the source of truth), ``labels (ntotal,) int64``,
    ``kind``, ``params`` (:class:`IndexParams`), ``meta`` (dict, saved as meta.json),
    ``search_device`` ("cpu" or "cuda:0").
    """

    def __init__(self, index: faiss.Index, labels: np.ndarray, kind: str, params: IndexParams,
                 meta: dict | None = None, *, gpu: bool | None = None):
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {sorted(INDEX_KINDS)}")
        self.index = index
        self.labels = _check_labels(labels, index.ntotal)
        self.kind = kind
        self.params = params
        self.meta = dict(meta or {})
        self._gpu_index = None
        self._gpu_resources = None
        want_gpu = faiss_has_gpu() if gpu is None else gpu
        if want_gpu and not faiss_has_gpu():
            raise RuntimeError("gpu=True but faiss has no GPU support or sees no GPU: "
                               "install faiss-gpu instead of faiss-cpu, or pass gpu=None/False")
        self.search_device = "cuda:0" if (want_gpu and kind in _GPU_KINDS) else "cpu"

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, xb: np.ndarray, labels: np.ndarray, kind: str = "flat", *, meta: dict | None = None,
              params: IndexParams | None = None, gpu: bool | None = None) -> "SupportIndex":
        """Index ``xb (n, D)`` (float16 or float32, L2-normalised rows) with ``labels (n,) int``.

        Rows are converted to float32 in chunks, so a float16 memmap can be passed directly.
        """
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {sorted(INDEX_KINDS)}")
        if xb.ndim != 2 or xb.shape[0] == 0:
            raise ValueError(f"xb must be a non-empty (n, D) array, got shape {xb.shape}: "
                             "the support selection has no labelled patch")
        params = params or IndexParams()
        n, dim = xb.shape
        labels = _check_labels(labels, n)
        index = INDEX_KINDS[kind](dim, n, params)
        if not index.is_trained:
            # IVF: k-means on 64 points per list; SQfp16 (hnsw) only needs the dimension, any sample does
            size = params.train_size or (64 * index.nlist if kind == "ivf" else _ADD_CHUNK)
            rng = np.random.default_rng(params.seed)
            rows = np.sort(rng.choice(n, size=min(size, n), replace=False))
            index.train(_as_float32_rows(xb[rows], "xb"))
        for s in range(0, n, _ADD_CHUNK):
            index.add(_as_float32_rows(xb[s:s + _ADD_CHUNK], "xb"))
        return cls(index, labels, kind, params, meta, gpu=gpu)

    def add(self, xb: np.ndarray, labels: np.ndarray) -> None:
        """Append ``xb (m, D)`` with ``labels (m,)`` (the app's in-context labelling)."""
        labels = _check_labels(labels, xb.shape[0])
        for s in range(0, xb.shape[0], _ADD_CHUNK):
            self.index.add(_as_float32_rows(xb[s:s + _ADD_CHUNK], "xb", self.dim))
        self.labels = np.concatenate([self.labels, labels])
        self._gpu_index = None  # stale: cloned again on the next search

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return self.ntotal

    # ------------------------------------------------------------------ search
    def _search_index(self) -> faiss.Index:
        if self.search_device == "cpu":
            return self.index
        if self._gpu_index is None:
            self._gpu_resources = self._gpu_resources or faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index)
        return self._gpu_index

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest support patches of each query row.

        xq: (nq, D) L2-normalised. Returns ``D (nq, k) float32`` inner products, best first, and
        ``I (nq, k) int64`` row ids into :attr:`labels`. ``k > ntotal`` raises ValueError.
        """
        check_k(k, self.ntotal)
        xq = _as_float32_rows(xq, "xq", self.dim)
        D, I = self._search_index().search(xq, k)
        return D, I

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike, *, label: str = "--out",
             on_boundary: dirswap.Hook | None = None) -> Path:
        """Write index.faiss, labels.npy and meta.json to ``directory`` atomically, with no window.

        ``directory`` becomes a symlink to a complete versioned sibling (:mod:`cribo.dirswap`); an
        existing index there is replaced only once the new one is complete and fsynced. Refuses
        (:class:`cribo.dirswap.TargetError`) an existing file or a directory that is not an index
        written by this code. ``on_boundary``: the fault-injection hook (see ``dirswap.BOUNDARIES``).
        """
        directory = Path(directory)
        meta = dict(self.meta)
        meta.update(
            format=FORMAT_VERSION, kind=self.kind, ntotal=self.ntotal, dim=self.dim,
            faiss_version=faiss.__version__, params=asdict(self.params),
            created=meta.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )

        def fill(tmp: Path) -> None:
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            np.save(tmp / LABELS_FILE, self.labels, allow_pickle=False)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

        dirswap.publish(directory, fill, owned=is_index_dir, expected=INDEX_FILES, label=label,
                        on_boundary=on_boundary or (lambda name: None))
        self.meta = meta
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, gpu: bool | None = None) -> "SupportIndex":
        """Read and validate an index directory written by :meth:`save` (after an interrupted
        save that left no ``directory``, the newest complete version beside it)."""
        directory = dirswap.resolve(directory)
        if not directory.is_dir():
            raise IndexLoadError(f"support index directory not found: {directory} "
                                 "(build one with build_index.py --out DIR)")
        missing = [f for f in (INDEX_FILE, LABELS_FILE, META_FILE) if not (directory / f).is_file()]
        if missing:
            raise IndexLoadError(f"support index {directory} is incomplete: missing {', '.join(missing)} "
                                 "(rebuild it with build_index.py)")
        try:
            meta = json.loads((directory / META_FILE).read_text())
        except json.JSONDecodeError as e:
            raise IndexLoadError(f"{directory / META_FILE} is not valid JSON ({e}); rebuild the index") from e
        absent = [key for key in REQUIRED_META_KEYS if key not in meta]
        if absent:
            raise IndexLoadError(f"{directory / META_FILE} lacks keys {absent}; rebuild the index")
        if meta["format"] != FORMAT_VERSION:
            raise IndexLoadError(f"{directory} has index format {meta['format']}, this code reads "
                                 f"format {FORMAT_VERSION}; rebuild the index")
        if meta["kind"] not in INDEX_KINDS:
            raise IndexLoadError(f"{directory / META_FILE}: unknown kind {meta['kind']!r}")
        try:
            labels = np.load(directory / LABELS_FILE, allow_pickle=False)
        except ValueError as e:
            raise IndexLoadError(f"{directory / LABELS_FILE} is not a plain numpy array ({e})") from e
        try:
            index = faiss.read_index(str(directory / INDEX_FILE))
        except RuntimeError as e:
            raise IndexLoadError(f"{directory / INDEX_FILE} is not a readable FAISS index ({e})") from e
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise IndexLoadError(f"{directory / LABELS_FILE} must be a 1-D integer array, "
                                 f"got {labels.dtype} {labels.shape}")
        if index.ntotal != labels.shape[0] or index.ntotal != meta["ntotal"]:
            raise IndexLoadError(f"{directory}: index.faiss holds {index.ntotal} vectors, labels.npy "
                                 f"{labels.shape[0]}, meta.json says {meta['ntotal']}; the files do not "
                                 "belong together, rebuild the index")
        if index.d != meta["dim"]:
            raise IndexLoadError(f"{directory}: index dimension {index.d} != meta.json dim {meta['dim']}")
        params = IndexParams(**meta["params"])
        if meta["kind"] == "ivf":
            faiss.extract_index_ivf(index).nprobe = params.nprobe
        elif meta["kind"] == "hnsw":
            index.hnsw.efSearch = params.ef_search
        return cls(index, labels, meta["kind"], params, meta, gpu=gpu)

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change ``nprobe`` (ivf) or ``efSearch`` (hnsw) of a built or loaded index."""
        if nprobe is not None:
            if self.kind != "ivf":
                raise ValueError(f"nprobe applies to ivf indices, this one is {self.kind}")
            faiss.extract_index_ivf(self.index).nprobe = nprobe
            self.params = IndexParams(**{**asdict(self.params), "nprobe": nprobe})
        if ef_search is not None:
            if self.kind != "hnsw":
                raise ValueError(f"ef_search applies to hnsw indices, this one is {self.kind}")
            self.index.hnsw.efSearch = ef_search
            self.params = IndexParams(**{**asdict(self.params), "ef_search": ef_search})
        self._gpu_index = None

    def check_compatible(self, backbone: BackboneProtocol) -> None:
        """Raise :class:`IncompatibleIndexError` unless ``backbone.identity`` built this index."""
        built_with = self.meta.get("backbone", {}).get("identity")
        if built_with is None:
            raise IncompatibleIndexError("this support index records no backbone identity "
                                         "(meta.json 'backbone.identity'); rebuild it with build_index.py")
        if built_with != backbone.identity:
            raise IncompatibleIndexError(
                f"support index was built with backbone {built_with!r} "
                f"({self.meta['backbone'].get('source', '?')}), but the query backbone is "
                f"{backbone.identity!r} ({getattr(backbone, 'source', '?')}): features of different "
                "backbones are not comparable; load the matching weights or rebuild the index"
            )


def select_support(ids: Sequence[str], ratio: int, seed: int) -> list[str]:
    """Support images of ratio 1/``ratio`` (eval-protocol step 4).

    Keeps ``round(N / ratio)`` ids (half rounds up) drawn uniformly without replacement by
    ``numpy.random.default_rng(seed)``, returned in dataset order. ``ratio == 1`` returns all ids
    (the seed is ignored).
    """
    ratio = int(ratio)
    if ratio < 1:
        raise ValueError(f"ratio must be an integer >= 1 (1/ratio of the images), got {ratio}")
    ids = list(ids)
    if ratio == 1:
        return ids
    n = int(math.floor(len(ids) / ratio + 0.5))
    if n < 1:
        raise ValueError(f"ratio 1/{ratio} of {len(ids)} images keeps no image; use a smaller ratio")
    chosen = np.sort(np.random.default_rng(seed).choice(len(ids), size=n, replace=False))
    return [ids[i] for i in chosen]
