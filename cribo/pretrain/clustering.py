"""Joint-space clustering of both views' tokens and the object representations built from it.

CrIBo Sec. 3.2.1 and App. B (after CrOC, Stegmüller et al. 2023, Sec. 3.3): the teacher's patch
tokens of the two views of an image are concatenated, ``z_cat (2N, D)``, and partitioned into K
clusters by Sinkhorn-Knopp on the cost

    T = T_sem + lambda_pos * T_pos                                             (App. B, Eq. 16)
    T_sem[n, k] = -cos(z_cat[n], c_k)                                          (Eq. 12)
    T_pos[n, k] = min_{l in S_k, l != n} ||E[n] - E[l]||_2                     (Eq. 17)

with ``S_k`` the tokens of cluster k in the previous assignment and ``E (2N, 2)`` the patch centres in
original-image pixels (:mod:`cribo.pretrain.transforms`). Cluster k of view 1 and cluster k of view 2 form a
cross-view pair for free; a cluster absent from one view is dropped (:func:`valid_objects`).

Two modes (``mode=``, ``--clustering``), measured against the authors' code in docs/fidelity.md:

``paper`` (default; the paper's App. B where it speaks, our choices where it is silent)
- Init: K distinct tokens drawn uniformly without replacement per image are the first centroids and
  the first assignment is one-hot on these seeds: every other token is in no cluster yet, so the
  first positional cost is the distance to each seed.
- T_pos entries left undefined (the cluster is empty, or n is its only member) get the image's mean
  of the DEFINED entries; T_pos is then divided by its per-image maximum. Undefined is marked with
  +inf, so a true 0 distance (two tokens at the same position) is kept as 0.
- The total cost is min-max normalised PER IMAGE to [0, 1] (one image's range never changes another's
  assignment).
- Sinkhorn-Knopp: ``P = exp(-T / eps)``, eps = 0.05 (lambda = 20 in Eq. 13), ``n_sinkhorn`` alternating
  row / column scalings to the UNIFORM marginals of Eq. 14 (rows 1/2N, columns 1/K), rows first and
  columns last, as the authors' code. Since T is in [0, 1] after normalisation, P is in
  [exp(-20), 1]: no under/overflow in fp32, no log-domain needed.
- Hard assignment: row argmax (ties to the lowest cluster id). Centroids: L2-normalised sum of the
  members (Eq. 15); an empty cluster keeps its previous centroid.

``reference`` (the authors' ``Clustering.compute_assignments``, main_cribo.py:725-816, with their
default ``--update_c true``, used by all three released runs)
- Column marginals re-weighted after each outer iteration by the current cluster sizes:
  ``c_k = (|S_k| + 0.01) / sum_j (|S_j| + 0.01)`` (the first iteration is uniform).
- Undefined T_pos entries (including a member at distance exactly 0) get the image's mean over ALL
  (2N, K) entries, undefined ones counted as 0.
- The total cost is min-max normalised over the WHOLE BATCH (one min and one max).
- An empty cluster gets a zero centroid (its semantic cost is 0 for every token).
The seeds, the rows-first / columns-last Sinkhorn and the row argmax are the same in both modes.

Efficiency: the reference materialises a (2N, 2N, K) tensor per image for T_pos, several times per
iteration (~2 GB per call for ViT-S/16, K=32, batch 32). Here the squared token-token distances
(B, 2N, 2N) are computed once per call (positions do not move) and T_pos is a segment-min of their
rows keyed by the assignment (one ``index_reduce_(amin)``), O(B (2N)^2) time and memory whatever K;
the first iteration reads the seeds' rows directly. Centroid sums are one ``index_add_``, Sinkhorn
works on its scaling vectors, the cost normalisation is folded into the kernel's exponent, and the
last iteration skips the unused centroid update. Everything is batched: no Python loop over images.
``index_add_`` is deterministic on CPU; on CUDA it accumulates with atomics (last bits may vary).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "CLUSTERING_MODES",
    "CLUSTERING_RULES",
    "ClusteringRules",
    "joint_space_clustering",
    "positional_cost",
    "sinkhorn_knopp",
    "split_views",
    "object_representations",
    "cluster_counts",
    "valid_objects",
]


@dataclass(frozen=True)
class ClusteringRules:
    """The rules on which the two modes differ (module docstring); each True is the reference's rule.
    Public for ablations (docs/fidelity.md measures each one); training selects a mode by name."""

    size_marginals: bool          # column marginals = cluster sizes + 0.01, normalised (update_c)
    batch_normalisation: bool     # min-max of the cost over the whole batch (else per image)
    fill_mean_over_all: bool      # undefined T_pos -> mean over all entries, undefined as 0 (else defined)
    zero_distance_undefined: bool  # a member at distance exactly 0 counts as no member
    zero_empty_centroid: bool     # an empty cluster gets a zero centroid (else keeps its previous one)


#: ``joint_space_clustering(mode=...)``: the paper's clustering, or the authors' code (see the docstring).
CLUSTERING_RULES = {
    "paper": ClusteringRules(False, False, False, False, False),
    "reference": ClusteringRules(True, True, True, True, True),
}
CLUSTERING_MODES = tuple(CLUSTERING_RULES)
#: The authors' smoothing of the size-weighted column marginals (``--update_c``): c_k ~ |S_k| + 0.01.
REFERENCE_MARGINAL_SMOOTHING = 1e-2


def _pairwise_sq_distances(pos: torch.Tensor, *, zero_is_undefined: bool = False) -> torch.Tensor:
    """Squared Euclidean distances between all tokens of an image, self-distance set to +inf.

    pos: (B, M, 2). Returns (B, M, M) float32, symmetric, ``[b, n, n] = inf`` so that a token is never
    its own nearest cluster member. Squared, because ``min`` commutes with the (correctly rounded,
    monotonic) square root: the root is taken after the segment-min, on (B, K, M) values only.
    Direct differences, not the ``|a|^2 + |b|^2 - 2ab`` expansion, which cancels catastrophically.
    ``zero_is_undefined``: also +inf where two distinct tokens share a position (the reference's rule:
    it marks "no member" with a 0 distance, so it cannot tell a true 0 apart).
    """
    pos = pos.float()
    x, y = pos[..., 0], pos[..., 1]
    sq = (x[:, :, None] - x[:, None, :]).square_()
    dy = y[:, :, None] - y[:, None, :]
    sq.addcmul_(dy, dy)
    sq.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    if zero_is_undefined:
        sq.masked_fill_(sq == 0, float("inf"))
    return sq


def _nearest_member_distances(sq_dist: torch.Tensor, assign: torch.Tensor, K: int) -> torch.Tensor:
    """Eq. 17 before normalisation: (B, K, M) distance from token n to the nearest other member of
    cluster k, +inf where there is none. No input checks (hot path).

    Segment-min over rows: because the distances are symmetric, ``out[b, k, n] = min over the rows m
    of cluster k of dist[b, m, n]``. Flattening (b, m) into one row axis, this is ONE
    ``index_reduce_(amin)`` of the (B*M, M) rows into B*(K+1) bins (bin K of each image collects the
    unassigned tokens and is dropped): every row is reduced as a contiguous vector, O(B M^2) work and
    O(B K M) extra memory (about 3x faster than ``scatter_reduce`` over the same data on CPU).
    """
    B, M, _ = sq_dist.shape
    bins = torch.where(assign < 0, K, assign)  # (B, M): unassigned -> spare bin K
    rows = (torch.arange(B, device=sq_dist.device)[:, None] * (K + 1) + bins).reshape(-1)
    nearest = torch.full((B * (K + 1), M), float("inf"), dtype=sq_dist.dtype, device=sq_dist.device)
    with warnings.catch_warnings():
        # index_reduce_ carries a one-time "is in beta" notice (since torch 1.12); it is tested here.
        warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta")
        nearest.index_reduce_(0, rows, sq_dist.reshape(B * M, M), "amin", include_self=True)
    return nearest.view(B, K + 1, M)[:, :K].sqrt()  # min commutes with the monotonic sqrt


def _seed_distances(sq_dist: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """:func:`_nearest_member_distances` for the first assignment, where cluster k = {seeds[:, k]}:
    row ``seeds[b, k]`` of the (symmetric) distances, +inf at the seed itself. (B, K, M)."""
    B, M, _ = sq_dist.shape
    return sq_dist.gather(1, seeds[:, :, None].expand(B, seeds.shape[1], M)).sqrt()


def _fill_and_scale(nearest: torch.Tensor, *, mean_over_all: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Undefined (+inf) entries -> the image's mean; also 1 / the image's max.

    nearest: (B, ...) with +inf for undefined entries. The mean is over the defined entries
    (``mean_over_all=False``, paper mode) or over all entries with undefined ones counted as 0 (the
    reference). Returns (filled (B, ...), inv_max (B,)); the normalised cost is ``filled * inv_max``,
    left to the caller so that it can fuse the scaling. Either mean never exceeds the max of the
    defined entries, so the max is taken over defined ones.
    """
    B = nearest.shape[0]
    defined = nearest < float("inf")
    zeroed = torch.where(defined, nearest, 0.0)
    dims = tuple(range(1, nearest.ndim))
    total = zeroed.sum(dim=dims)
    mean = total / (zeroed[0].numel() if mean_over_all else defined.sum(dim=dims).clamp_min(1))
    inv_max = 1.0 / zeroed.amax(dim=dims).clamp_min(torch.finfo(nearest.dtype).tiny)
    filled = torch.where(defined, zeroed, mean.view(B, *([1] * len(dims))))
    return filled, inv_max


def positional_cost(pos: torch.Tensor, assign: torch.Tensor, K: int) -> torch.Tensor:
    """Positional transport cost T_pos (App. B, Eq. 17), normalised per image.

    Args:
        pos: (B, M, 2) token positions (x, y) in original-image pixels (M = 2N for the joint view).
        assign: (B, M) long cluster of every token in the previous assignment, in [0, K); -1 marks a
            token in no cluster (the seeds-only first assignment).
        K: number of clusters.

    Returns:
        (B, M, K) float32: distance from token n to the nearest OTHER member of cluster k; entries
        with no such member (empty cluster, or n its only member) take the mean of the image's
        defined entries; then divided by the image's maximum, so values lie in [0, 1].
    """
    if pos.ndim != 3 or pos.shape[-1] != 2:
        raise ValueError(f"pos must be (B, M, 2), got {tuple(pos.shape)}")
    if assign.shape != pos.shape[:2] or assign.dtype != torch.long:
        raise ValueError(f"assign must be a long tensor of shape {tuple(pos.shape[:2])}, "
                         f"got {assign.dtype} {tuple(assign.shape)}")
    _check_labels(assign, K, "assign", allow_unassigned=True)
    filled, inv_max = _fill_and_scale(_nearest_member_distances(_pairwise_sq_distances(pos), assign, K))
    return (filled * inv_max[:, None, None]).transpose(1, 2).contiguous()


def sinkhorn_knopp(cost: torch.Tensor, eps: float = 0.05, n_iter: int = 5,
                   col_marginals: torch.Tensor | None = None) -> torch.Tensor:
    """Entropic optimal transport plan for ``cost`` (B, M, K) (Eq. 13-14).

    ``Q = diag(u) P diag(v)`` with ``P = exp(-cost / eps)``, scaled alternately so that rows sum to
    1/M and columns to ``col_marginals`` (B, K) (default: uniform 1/K), ``n_iter`` times each, rows
    first and columns last (the authors' order), written on the scaling vectors. ``cost`` should be
    bounded (here min-max normalised to [0, 1]) so that ``exp`` stays in fp32 range. Returns Q (B, M, K).
    """
    P = torch.exp(-cost / eps)
    u, v = _sinkhorn_scalings(P, n_iter, col_marginals)
    return u[:, :, None] * P * v[:, None, :]


def _sinkhorn_scalings(P: torch.Tensor, n_iter: int,
                       col_marginals: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token scalings u (B, M) and cluster scalings v (B, K) of the kernel P (B, M, K).

    Rows (tokens) are scaled to 1/M first, then columns (clusters) to ``col_marginals`` (B, K) or 1/K,
    ``n_iter`` times: after the last step the columns meet their marginals exactly and the rows only
    approximately, as in the authors' ``sinkhorn`` (the order changes a non-converged plan).
    Vector-matrix products ``v^T P^T`` and ``u^T P`` (P^T made contiguous once): batched GEMV in this
    orientation is several times faster on CPU than ``P v`` or a broadcast multiply + sum.
    """
    B, M, K = P.shape
    P_t = P.transpose(1, 2).contiguous()  # (B, K, M)
    v = torch.ones(B, 1, K, dtype=P.dtype, device=P.device)
    for _ in range(n_iter):
        u = torch.bmm(v, P_t).mul_(M).reciprocal_()  # (B, 1, M): rows (tokens) sum to 1/M
        v = torch.bmm(u, P)  # (B, 1, K) column sums
        v = v.mul_(K).reciprocal_() if col_marginals is None else torch.div(col_marginals[:, None, :], v)
    return u[:, 0], v[:, 0]


def _unit_tokens(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """L2-normalised fp32 joint tokens (B, 2N, D), written once (no concatenated intermediate)."""
    B, N, D = z1.shape
    z = torch.empty(B, 2 * N, D, dtype=torch.float32, device=z1.device)
    for half, part in ((z[:, :N], z1), (z[:, N:], z2)):
        part = part.float()
        norm = torch.linalg.vector_norm(part, dim=-1, keepdim=True).clamp_min_(1e-12)
        torch.div(part, norm, out=half)
    return z


@torch.no_grad()
def joint_space_clustering(
    z1: torch.Tensor,
    z2: torch.Tensor,
    pos1: torch.Tensor,
    pos2: torch.Tensor,
    K: int,
    lambda_pos: float,
    n_outer: int = 5,
    n_sinkhorn: int = 5,
    eps: float = 0.05,
    generator: torch.Generator | None = None,
    mode: str | ClusteringRules = "paper",
    seeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cluster the 2N tokens of both views of each image into K clusters (App. B).

    Args:
        z1, z2: (B, N, D) teacher patch tokens of view 1 and view 2 (after the final norm, CLS
            dropped; any dtype, computed in fp32 with autocast off, no grad).
        pos1, pos2: (B, N, 2) patch centres (x, y) in original-image pixels.
        K: number of clusters, 1 <= K <= 2N.
        lambda_pos: weight of the positional cost (Eq. 16); 0 disables it (and skips its cost).
        n_outer: outer iterations (cost -> Sinkhorn -> hard assignment -> centroids).
        n_sinkhorn: Sinkhorn-Knopp scaling iterations per outer iteration.
        eps: entropic regularisation, ``P = exp(-T / eps)`` (eps = 1/lambda, lambda = 20).
        generator: RNG for the seed tokens; must live on the tokens' device. None: global RNG.
        mode: ``"paper"`` or ``"reference"`` (:data:`CLUSTERING_MODES`, module docstring), or a
            :class:`ClusteringRules` (ablations).
        seeds: optional (B, K) long, distinct joint-token indices in [0, 2N) per image: the seed token
            of each cluster (then ``generator`` is not used). None: drawn uniformly without replacement.

    Returns:
        (B, 2N) long in [0, K): cluster of every token, view-1 tokens first (see :func:`split_views`).
    """
    _check_clustering_inputs(z1, z2, pos1, pos2, K, lambda_pos, n_outer, n_sinkhorn, eps, mode, seeds)
    rules = mode if isinstance(mode, ClusteringRules) else CLUSTERING_RULES[mode]
    device = z1.device
    with torch.autocast(device_type=device.type, enabled=False):
        z = _unit_tokens(z1, z2)  # (B, M, D), M = 2N
        B, M, D = z.shape
        if seeds is None:
            # K distinct seeds per image, uniform without replacement: the K largest of M random keys.
            keys = torch.rand(B, M, generator=generator, device=device)
            seeds = keys.topk(K, dim=1).indices  # (B, K)
        centroids = z.gather(1, seeds[..., None].expand(B, K, D))  # (B, K, D), unit norm
        assign = torch.full((B, M), -1, dtype=torch.long, device=device)
        assign.scatter_(1, seeds, torch.arange(K, device=device).expand(B, K))
        sq_dist = None
        if lambda_pos > 0:  # positions do not move: the (B, M, M) distances once per call
            sq_dist = _pairwise_sq_distances(torch.cat([pos1, pos2], dim=1),
                                             zero_is_undefined=rules.zero_distance_undefined)
        row_offset = torch.arange(B, device=device)[:, None] * K  # flattened (b, k) rows
        col_marginals = None  # uniform 1/K; the reference re-weights them from the 2nd iteration on
        for it in range(n_outer):
            cost = torch.bmm(z, centroids.transpose(1, 2)).neg_()  # T_sem (B, M, K), Eq. 12
            if sq_dist is not None:  # Eq. 16: cost += lambda_pos * T_pos, T_pos = filled / max
                if it == 0:  # seeds-only assignment: the nearest member of cluster k is its seed
                    nearest = _seed_distances(sq_dist, seeds)
                else:
                    nearest = _nearest_member_distances(sq_dist, assign, K)
                filled, inv_max = _fill_and_scale(nearest, mean_over_all=rules.fill_mean_over_all)
                cost.addcmul_(filled.transpose(1, 2), (lambda_pos * inv_max)[:, None, None])
            # Min-max normalisation to [0, 1] (per image; over the whole batch in the reference),
            # folded into the Sinkhorn kernel exp(-T/eps).
            dims = (0, 1, 2) if rules.batch_normalisation else (1, 2)
            lo = cost.amin(dim=dims, keepdim=True)
            hi = cost.amax(dim=dims, keepdim=True)
            P = cost.sub_(lo).mul_(-1.0 / ((hi - lo).clamp_min(1e-12) * eps)).exp_()
            _, v = _sinkhorn_scalings(P, n_sinkhorn, col_marginals)
            # Row argmax of Q = diag(u) P diag(v): u is constant along a token's row. (max(dim)
            # returns the first maximal index, like argmax, and is faster on CPU for small K.)
            assign = P.mul_(v[:, None, :]).max(dim=2).indices  # (B, M) hard assignment
            if it == n_outer - 1:
                break  # the last centroids and marginals would not be used
            flat = (row_offset + assign).reshape(-1)
            sums = torch.zeros(B * K, D, device=device).index_add_(0, flat, z.reshape(B * M, D))
            counts = torch.bincount(flat, minlength=B * K).view(B, K)
            # Eq. 15 with hard assignments. An empty cluster keeps its previous centroid (paper mode)
            # or gets a zero one (the reference: normalising a zero sum).
            new_centroids = F.normalize(sums.view(B, K, D), dim=-1)
            centroids = (new_centroids if rules.zero_empty_centroid
                         else torch.where(counts[..., None] > 0, new_centroids, centroids))
            if rules.size_marginals:
                weights = counts.float() + REFERENCE_MARGINAL_SMOOTHING
                col_marginals = weights / weights.sum(dim=1, keepdim=True)  # (B, K)
    return assign


def split_views(assign: torch.Tensor, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2N) joint assignment -> view-1 (B, N) and view-2 (B, N) assignments."""
    if assign.ndim != 2 or assign.shape[1] != 2 * N:
        raise ValueError(f"assign must be (B, 2N) = (B, {2 * N}), got {tuple(assign.shape)}")
    return assign[:, :N], assign[:, N:]


def cluster_counts(assign: torch.Tensor, K: int) -> torch.Tensor:
    """Number of tokens per cluster: (B, M) long in [0, K) -> (B, K) long."""
    B = assign.shape[0]
    flat = (torch.arange(B, device=assign.device)[:, None] * K + assign).reshape(-1)
    return torch.bincount(flat, minlength=B * K).view(B, K)


def valid_objects(a1: torch.Tensor, a2: torch.Tensor, K: int) -> torch.Tensor:
    """(B, K) bool: cluster k has at least one token in view 1 AND in view 2 (Sec. 3.2.1)."""
    return (cluster_counts(a1, K) > 0) & (cluster_counts(a2, K) > 0)


def object_representations(tokens: torch.Tensor, assign: torch.Tensor, K: int) -> torch.Tensor:
    """Object representation c^k = mean of the tokens of cluster k (Eq. 1, l1-normalised columns).

    Args:
        tokens: (B, N, D) UNNORMALISED patch tokens of one view (teacher or student).
        assign: (B, N) long in [0, K): the teacher's assignment for that view.
        K: number of clusters.

    Returns:
        (B, K, D) in ``tokens.dtype``; rows of clusters absent from the view are zero. Differentiable
        w.r.t. ``tokens`` (the student's gradient flows through this mean pooling only).
    """
    if tokens.ndim != 3 or assign.shape != tokens.shape[:2]:
        raise ValueError(f"tokens (B, N, D) and assign (B, N) disagree: {tuple(tokens.shape)} vs "
                         f"{tuple(assign.shape)}")
    _check_labels(assign, K, "assign", allow_unassigned=False)
    one_hot = F.one_hot(assign, K).to(tokens.dtype)  # (B, N, K)
    sums = torch.bmm(one_hot.transpose(1, 2), tokens)  # (B, K, D)
    counts = one_hot.sum(dim=1).clamp_min(1)  # (B, K)
    return sums / counts[..., None]


def _check_labels(assign: torch.Tensor, K: int, name: str, *, allow_unassigned: bool) -> None:
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    if assign.numel() == 0:
        return
    lo = -1 if allow_unassigned else 0
    a_min, a_max = int(assign.min()), int(assign.max())
    if a_min < lo or a_max >= K:
        raise ValueError(f"{name} values must lie in [{lo}, {K}), got [{a_min}, {a_max}]")


def _check_clustering_inputs(z1, z2, pos1, pos2, K, lambda_pos, n_outer, n_sinkhorn, eps, mode, seeds) -> None:
    if not isinstance(mode, ClusteringRules) and mode not in CLUSTERING_MODES:
        raise ValueError(f"clustering mode {mode!r} is unknown: choose one of {', '.join(CLUSTERING_MODES)}")
    if z1.ndim != 3 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (B, N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    B, N, _ = z1.shape
    for name, pos in (("pos1", pos1), ("pos2", pos2)):
        if tuple(pos.shape) != (B, N, 2):
            raise ValueError(f"{name} must be (B, N, 2) = {(B, N, 2)}, got {tuple(pos.shape)}")
        if pos.device != z1.device:
            raise ValueError(f"{name} is on {pos.device} but the tokens are on {z1.device}")
    if not 1 <= K <= 2 * N:
        raise ValueError(f"K must be in [1, 2N] = [1, {2 * N}], got {K}")
    if lambda_pos < 0:
        raise ValueError(f"lambda_pos must be >= 0, got {lambda_pos}")
    if n_outer < 1 or n_sinkhorn < 1:
        raise ValueError(f"n_outer and n_sinkhorn must be >= 1, got {n_outer} and {n_sinkhorn}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if seeds is not None:
        if seeds.shape != (B, K) or seeds.dtype != torch.long or seeds.device != z1.device:
            raise ValueError(f"seeds must be a long tensor of shape {(B, K)} on {z1.device}, got "
                             f"{seeds.dtype} {tuple(seeds.shape)} on {seeds.device}")
        _check_labels(seeds, 2 * N, "seeds", allow_unassigned=False)
        if K > 1 and (seeds.sort(dim=1).values.diff(dim=1) == 0).any():
            raise ValueError("seeds must be distinct within each image (one token per cluster)")
