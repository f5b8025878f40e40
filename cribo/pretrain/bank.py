"""Paired FIFO memory banks of teacher object vectors and cycle-consistent retrieval (section 3.2.2).

Two banks M1 and M2 hold the object vectors c_1^k and c_2^k (teacher, before the head) of the last S
images, paired slot by slot: storage slot ``j = row*K + k`` of M1 and of M2 hold object k of the same
image in views 1 and 2. A validity mask per slot (objects present in both views) gives the per-image counts.

Retrieval for this step's batch (before the batch is pushed, so an image never retrieves itself):

    j1        = nn(c_1^k, M1)                   top-1 cosine over the valid slots of M1 (Eq. 2)
    jump      = M2[j1]                          same slot, other view (Eq. 3)
    back      = nn(M2[j1], B_2)                 top-1 cosine among the VALID view-2 objects of the
                                                current local batch (all images, all k)
    ok1[b,k]  = back == (b, k)                  cycle consistency O(c_1^k) (Eq. 4)
    nn1[b,k]  = M1[j1]                          the target of direction 1: its teacher projection
                                                p~_{1,t}^k (Eq. 7) is paired with the STUDENT's
                                                c_2^k in Eq. 8

and symmetrically ``j2 = nn(c_2^k, M2)``, jump to ``M1[j2]``, back-search among the batch's view-1
objects, ``ok2``, ``nn2 = M2[j2]`` (paired with the student's c_1^k). Invalid queries, an empty bank
and invalid slots never produce a match (``ok`` False, ``idx`` -1, ``nn`` zeros).

Memory. The targets are projected by the CURRENT teacher head, whose MLP is not scale invariant, so
the raw vectors must be recoverable. Each slot stores the vector's direction (unit vector, in the
storage dtype) and its norm (fp32): ``raw = unit * norm``. Rounding is relative, so this is as precise
as storing the raw vector in that dtype, cannot overflow fp16, and the search is a plain matrix
product on the stored tensor: no normalised copy is ever made, no per-step normalisation pass.
S=25k, K=32, D=384 in fp16: 2 x 614 MB + 2 x 3.2 MB norms + 0.8 MB mask = 1.15 GiB (the reference:
2.29 GiB fp32 plus a 2.29 GiB normalised copy per query). The search runs over ``chunk_size`` slots
at a time: the transient memory is one (queries, chunk) score block (plus a (chunk, D) fp32 copy of
the block when the search dtype differs from the storage dtype).

Storage is a ring of S image rows that grows downwards: a push of n images moves the head back by n
and writes image i of the batch to row ``head + i``, so reading rows from the head onwards gives the
"newest first, batch order" queue of the reference (``cat(new, old)[:S]``) without moving data.
Every rank pushes the same all-gathered tensors, so the banks stay identical across ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cribo.precision import DTYPES

_STATE_TENSORS = ("unit1", "unit2", "norm1", "norm2", "valid")
_STATE_META = ("size", "num_objects", "dim", "dtype", "head", "filled", "pushed")


@dataclass
class BankQuery:
    """Result of ``ObjectMemoryBank.query`` for a batch of B images with K object slots.

    Attributes:
        nn1: (B, K, D) float32, raw M1 vector nn(c_1^k, M1): target for the student's c_2^k.
        nn2: (B, K, D) float32, raw M2 vector nn(c_2^k, M2): target for the student's c_1^k.
        ok1: (B, K) bool, cycle consistency O(c_1^k) (Eq. 4).
        ok2: (B, K) bool, cycle consistency O(c_2^k).
        idx1: (B, K) long, position of nn1 in the queue at query time, newest first: row ``i*K + k`` of
            ``ordered()`` flattened to (filled*K, D) (image i from the newest, object k); -1 where none.
        idx2: (B, K) long, likewise for nn2.
    """

    nn1: torch.Tensor
    nn2: torch.Tensor
    ok1: torch.Tensor
    ok2: torch.Tensor
    idx1: torch.Tensor
    idx2: torch.Tensor


class ObjectMemoryBank:
    """Paired FIFO banks M1, M2 of S images x K object vectors of dim D.

    Args:
        size_images: S, number of images kept (25k in the paper).
        num_objects: K, object slots per image (number of clusters).
        dim: D, teacher embedding dim.
        dtype: storage dtype, torch.float16 / torch.bfloat16 / torch.float32.
        device: where the banks live (the training device).
        chunk_size: slots scored per block in the cosine search; the transient score block is
            ``Q * chunk_size`` elements for Q queries.
        search_dtype: dtype of the similarity matmul. None (default): the storage dtype on CUDA (tensor
            cores; scores rounded to that precision, so near-ties within ~1e-3 may resolve differently)
            and float32 elsewhere (CPUs have no fast half-precision matmul). float32 scores the stored
            unit vectors exactly.
    """

    def __init__(self, size_images: int, num_objects: int, dim: int, dtype: torch.dtype = torch.float16,
                 device: str | torch.device = "cpu", chunk_size: int = 65536,
                 search_dtype: torch.dtype | None = None):
        for name, v in (("size_images", size_images), ("num_objects", num_objects), ("dim", dim),
                        ("chunk_size", chunk_size)):
            if int(v) != v or v <= 0:
                raise ValueError(f"ObjectMemoryBank: {name} must be a positive integer, got {v!r}")
        for name, dt in (("dtype", dtype), ("search_dtype", search_dtype or torch.float32)):
            if dt not in DTYPES.values():
                raise ValueError(f"ObjectMemoryBank: {name}={dt} is not supported; use torch.float16, "
                                 "torch.bfloat16 or torch.float32")
        self.size, self.num_objects, self.dim = int(size_images), int(num_objects), int(dim)
        self.dtype, self.device = dtype, torch.device(device)
        n = self.size * self.num_objects
        # unit_i[j], norm_i[j]: direction and norm of slot j of bank M_i (zeros where not valid)
        self.unit1 = torch.zeros(n, self.dim, dtype=dtype, device=self.device)
        self.unit2 = torch.zeros(n, self.dim, dtype=dtype, device=self.device)
        self.norm1 = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.norm2 = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.valid = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.device = self.valid.device  # resolved: "cuda" -> "cuda:0", so device checks compare equal
        self.chunk_size = int(chunk_size)
        if search_dtype is None:
            search_dtype = dtype if self.device.type == "cuda" else torch.float32
        self.search_dtype = search_dtype
        self.head = 0  # storage row of the newest image
        self.filled = 0  # number of image rows holding data (<= S)
        self.pushed = 0  # images offered to push() since creation (bookkeeping)

    # ------------------------------------------------------------------ inspection
    def __len__(self) -> int:
        """Number of images currently stored."""
        return self.filled

    def memory_bytes(self) -> int:
        """Bytes held by the banks (both views, norms, mask); the search's transient blocks excluded."""
        return sum(t.numel() * t.element_size() for t in (self.unit1, self.unit2, self.norm1, self.norm2,
                                                           self.valid))

    def _rows_newest_first(self) -> torch.Tensor:
        return (self.head + torch.arange(self.filled, device=self.device)) % self.size

    def _raw(self, unit: torch.Tensor, norm: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Raw fp32 vectors (unit * norm) of the given storage slots: (...,) long -> (..., D)."""
        return unit[slots].float() * norm[slots].unsqueeze(-1)

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queue newest first: raw fp32 m1 (filled, K, D), m2 (filled, K, D), and valid (filled, K)."""
        K = self.num_objects
        slots = self._rows_newest_first().unsqueeze(1) * K + torch.arange(K, device=self.device)
        return (self._raw(self.unit1, self.norm1, slots), self._raw(self.unit2, self.norm2, slots),
                self.valid[slots])

    def counts(self) -> torch.Tensor:
        """Number of valid objects per stored image, newest first: (filled,) long."""
        return self.ordered()[2].sum(dim=1)

    # ------------------------------------------------------------------ retrieval
    def _check_batch(self, where: str, c1: torch.Tensor, c2: torch.Tensor, valid: torch.Tensor) -> None:
        want = (self.num_objects, self.dim)
        if c1.dim() != 3 or tuple(c1.shape[1:]) != want or c1.shape != c2.shape:
            raise ValueError(f"ObjectMemoryBank.{where}: c1 and c2 must both be (B, {want[0]}, {want[1]}), "
                             f"got {tuple(c1.shape)} and {tuple(c2.shape)}")
        if valid.dtype != torch.bool or valid.shape != c1.shape[:2]:
            raise ValueError(f"ObjectMemoryBank.{where}: valid must be a bool tensor of shape "
                             f"{tuple(c1.shape[:2])}, got {valid.dtype} {tuple(valid.shape)}")
        for name, t in (("c1", c1), ("c2", c2), ("valid", valid)):
            if t.device != self.device:
                raise ValueError(f"ObjectMemoryBank.{where}: {name} is on {t.device} but the bank is on "
                                 f"{self.device}; move the tensor or build the bank with device={t.device}")

    def _top1(self, unit: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Storage slot of the top-1 cosine neighbour among the valid slots of ``unit``, for each row of
        q (Q, D) fp32; -1 when the bank holds no valid slot."""
        best_val = torch.full((q.shape[0],), float("-inf"), device=self.device)
        best_idx = torch.full((q.shape[0],), -1, dtype=torch.long, device=self.device)
        if self.filled == 0 or q.shape[0] == 0:
            return best_idx
        qn = F.normalize(q, dim=1).to(self.search_dtype)
        K = self.num_objects
        # Filled rows are contiguous in storage: [S - filled, S) until the ring is full.
        for start in range((self.size - self.filled) * K, self.size * K, self.chunk_size):
            end = min(start + self.chunk_size, self.size * K)
            sims = qn @ unit[start:end].to(self.search_dtype).T  # (Q, C) cosines; no copy if same dtype
            sims.masked_fill_(~self.valid[start:end], float("-inf"))
            val, idx = sims.max(dim=1)
            val = val.float()
            better = val > best_val  # strict: ties keep the lower slot index
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + start, best_idx)
        return best_idx

    def _direction(self, unit_a: torch.Tensor, unit_b: torch.Tensor, qa: torch.Tensor,
                   cb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One direction of the cycle for the n valid objects: qa, cb (n, D) fp32 (views a and b).

        Returns (idx (n,) long, ok (n,) bool): idx = nn(qa, M_a), ok = nn(M_b[idx], batch_b) is the query.
        """
        idx = self._top1(unit_a, qa)
        if qa.shape[0] == 0:
            return idx, torch.zeros(0, dtype=torch.bool, device=self.device)
        found = idx >= 0
        jumped = unit_b[idx.clamp_min(0)].float()  # (n, D) unit vectors of the same slots, other view (Eq. 3)
        sims = jumped @ F.normalize(cb, dim=1).T  # (n, n) cosines to the batch's view-b objects
        back = sims.argmax(dim=1)
        ok = found & (back == torch.arange(qa.shape[0], device=self.device))
        return idx, ok

    @torch.no_grad()
    def query(self, c1: torch.Tensor, c2: torch.Tensor, valid: torch.Tensor) -> BankQuery:
        """Cycle-consistent nearest neighbours of this step's teacher objects (Eq. 2-4).

        Call BEFORE ``push`` of the same step. The back-search runs over the valid objects of this
        (local) batch, as the authors' code does.

        Args:
            c1, c2: (B, K, D) teacher object vectors of views 1 and 2 (any float dtype; cast to fp32, then
                scored in ``search_dtype``).
            valid: (B, K) bool, objects present in both views.

        Returns:
            BankQuery (see there); all outputs are zeros / False / -1 where ``valid`` is False.
        """
        self._check_batch("query", c1, c2, valid)
        B, K, D = c1.shape
        flat_valid = valid.reshape(-1)
        q1 = c1.reshape(-1, D)[flat_valid].float()  # (n, D)
        q2 = c2.reshape(-1, D)[flat_valid].float()
        idx1_v, ok1_v = self._direction(self.unit1, self.unit2, q1, q2)
        idx2_v, ok2_v = self._direction(self.unit2, self.unit1, q2, q1)

        def scatter(values: torch.Tensor, fill: Any) -> torch.Tensor:
            out = torch.full((B * K, *values.shape[1:]), fill, dtype=values.dtype, device=self.device)
            out[flat_valid] = values
            return out.view(B, K, *values.shape[1:])

        slot1, slot2 = scatter(idx1_v, -1), scatter(idx2_v, -1)  # storage slots
        nn1 = torch.where((slot1 >= 0).unsqueeze(-1), self._raw(self.unit1, self.norm1, slot1.clamp_min(0)), 0.0)
        nn2 = torch.where((slot2 >= 0).unsqueeze(-1), self._raw(self.unit2, self.norm2, slot2.clamp_min(0)), 0.0)
        return BankQuery(nn1=nn1, nn2=nn2, ok1=scatter(ok1_v, False), ok2=scatter(ok2_v, False),
                         idx1=self._queue_position(slot1), idx2=self._queue_position(slot2))

    def _queue_position(self, slot: torch.Tensor) -> torch.Tensor:
        """Storage slot -> position in the newest-first queue (``ordered()`` flattened); -1 stays -1."""
        K = self.num_objects
        pos = ((slot // K - self.head) % self.size) * K + slot % K
        return torch.where(slot >= 0, pos, -1)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def push(self, c1: torch.Tensor, c2: torch.Tensor, valid: torch.Tensor) -> None:
        """Enqueue n images (newest first, in batch order), overwriting the oldest.

        Call AFTER ``query``, with this step's objects all-gathered across ranks (``dist.all_gather_cat``)
        so that every rank keeps the same banks. If n > S only the first S images are kept (as
        ``cat(new, old)[:S]``). Invalid slots are stored as zeros (they may hold anything, even NaN, in
        the input) and are never retrieved.

        Args:
            c1, c2: (n, K, D) teacher object vectors (any float dtype; stored as unit vector in the
                storage dtype and fp32 norm).
            valid: (n, K) bool.
        """
        self._check_batch("push", c1, c2, valid)
        offered = c1.shape[0]
        c1, c2, valid = c1[: self.size], c2[: self.size], valid[: self.size]
        n, K, D = c1.shape
        if n == 0:
            return
        keep = valid.reshape(-1)
        flat1, flat2 = c1.reshape(-1, D).float(), c2.reshape(-1, D).float()
        raw1, raw2 = flat1.norm(dim=1), flat2.norm(dim=1)  # NaN/inf in a row make its norm non-finite
        if not bool(torch.isfinite(torch.where(keep, raw1 + raw2, 0.0)).all()):  # a sync point
            raise ValueError("ObjectMemoryBank.push: non-finite values in valid object vectors (NaN or inf "
                             "upstream: check the teacher's outputs and the loss scale)")
        norm1, norm2 = torch.where(keep, raw1, 0.0), torch.where(keep, raw2, 0.0)
        unit1 = (flat1 / norm1.clamp_min(1e-12).unsqueeze(1)).where(keep.unsqueeze(1), 0.0).to(self.dtype)
        unit2 = (flat2 / norm2.clamp_min(1e-12).unsqueeze(1)).where(keep.unsqueeze(1), 0.0).to(self.dtype)
        self.head = (self.head - n) % self.size
        rows = (self.head + torch.arange(n, device=self.device)) % self.size
        slots = (rows.unsqueeze(1) * K + torch.arange(K, device=self.device)).reshape(-1)
        self.unit1.index_copy_(0, slots, unit1)
        self.unit2.index_copy_(0, slots, unit2)
        self.norm1.index_copy_(0, slots, norm1)
        self.norm2.index_copy_(0, slots, norm2)
        self.valid.index_copy_(0, slots, keep)
        self.filled = min(self.size, self.filled + n)
        self.pushed += offered

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume (tensors on the bank's device; plain ints and strings)."""
        dtype_name = str(self.dtype).removeprefix("torch.")  # float32 / float16 / bfloat16 (checkpoint format)
        return {"unit1": self.unit1, "unit2": self.unit2, "norm1": self.norm1, "norm2": self.norm2,
                "valid": self.valid, "size": self.size, "num_objects": self.num_objects,
                "dim": self.dim, "dtype": dtype_name, "head": self.head, "filled": self.filled,
                "pushed": self.pushed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output exactly. Any key, shape or dtype mismatch raises ValueError."""
        where = "ObjectMemoryBank.load_state_dict"
        expected = set(_STATE_TENSORS) | set(_STATE_META)
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"{where}: keys do not match (missing {missing}, unexpected {unexpected}); "
                             "the checkpoint was not written by ObjectMemoryBank.state_dict()")
        mine = self.state_dict()
        for key in ("size", "num_objects", "dim", "dtype"):
            if state[key] != mine[key]:
                raise ValueError(f"{where}: the checkpoint's bank has {key}={state[key]!r} but this bank has "
                                 f"{key}={mine[key]!r}; build the bank with the checkpoint's settings "
                                 "(bank size, number of clusters, backbone, bank dtype)")
        for key in _STATE_TENSORS:
            t, ref = state[key], mine[key]
            if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.dtype != ref.dtype:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{where}: {key!r} is {got}, expected {ref.dtype} {tuple(ref.shape)}")
        head, filled, pushed = (int(state[k]) for k in ("head", "filled", "pushed"))
        if not (0 <= head < self.size and 0 <= filled <= self.size and pushed >= filled):
            raise ValueError(f"{where}: inconsistent counters head={head}, filled={filled}, pushed={pushed} "
                             f"for a bank of {self.size} images")
        for key in _STATE_TENSORS:
            getattr(self, key).copy_(state[key])
        self.head, self.filled, self.pushed = head, filled, pushed
