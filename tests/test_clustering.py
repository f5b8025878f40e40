"""Joint-space clustering, positional cost and object representations (cribo.pretrain.clustering)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cribo.pretrain.clustering import (
    cluster_counts,
    joint_space_clustering,
    object_representations,
    positional_cost,
    sinkhorn_knopp,
    split_views,
    valid_objects,
)


def _grid(g: int, spacing: float, offset: tuple[float, float]) -> torch.Tensor:
    c = torch.arange(g, dtype=torch.float32) * spacing
    yy, xx = torch.meshgrid(c + offset[1], c + offset[0], indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)  # (g*g, 2) row-major


def _brute_positional_cost(pos: torch.Tensor, assign: torch.Tensor, K: int) -> torch.Tensor:
    """Plain loops over tokens and clusters, float64: the definition written out."""
    B, M, _ = pos.shape
    d = torch.cdist(pos.double(), pos.double())
    out = torch.full((B, M, K), float("nan"), dtype=torch.float64)
    for b in range(B):
        for n in range(M):
            for k in range(K):
                others = [m for m in range(M) if m != n and assign[b, m] == k]
                if others:
                    out[b, n, k] = min(d[b, n, m] for m in others)
        img = out[b]
        img[img.isnan()] = img[~img.isnan()].mean()
        out[b] = img / img.max()
    return out


def test_positional_cost_hand_computation_on_a_line():
    """4 tokens at x = 0, 1, 3, 6; clusters {0, 1}, {2}, {} and token 3 in none (first assignment).

    Nearest OTHER member distances (undefined: '-'):
        token 0: k0 -> 1 (token 1), k1 -> 3, k2 -> -
        token 1: k0 -> 1,           k1 -> 2, k2 -> -
        token 2: k0 -> 2,           k1 -> - (only member), k2 -> -
        token 3: k0 -> 5,           k1 -> 3, k2 -> -
    Undefined entries take the mean of the 7 defined ones, 17/7; then everything is divided by the
    maximum, 5. Image 2 is the same configuration along the direction (0.6, 0.8) at twice the scale:
    per-image normalisation makes its cost identical.
    """
    line = torch.tensor([0.0, 1.0, 3.0, 6.0])
    pos = torch.stack([
        torch.stack([line, torch.zeros(4)], dim=1),
        torch.stack([line * 2 * 0.6 + 10, line * 2 * 0.8 + 20], dim=1),
    ])  # (2, 4, 2)
    assign = torch.tensor([[0, 0, 1, -1], [0, 0, 1, -1]])
    u = 17 / 7
    expected = torch.tensor([[1, 3, u], [1, 2, u], [2, u, u], [5, 3, u]], dtype=torch.float32) / 5
    cost = positional_cost(pos, assign, K=3)
    assert cost.shape == (2, 4, 3) and cost.dtype == torch.float32
    torch.testing.assert_close(cost[0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(cost[1], expected, rtol=0, atol=1e-6)


def test_positional_cost_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    B, M, K = 3, 24, 5
    pos = torch.rand(B, M, 2, generator=g) * 300
    assign = torch.randint(-1, K, (B, M), generator=g)
    assign[0, :] = 2  # one image with a single non-empty cluster
    cost = positional_cost(pos, assign, K)
    torch.testing.assert_close(cost.double(), _brute_positional_cost(pos, assign, K), rtol=1e-5, atol=1e-6)
    assert cost.min() >= 0 and cost.amax(dim=(1, 2)).eq(1).all()


def test_positional_cost_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"assign values must lie in \[-1, 3\)"):
        positional_cost(torch.zeros(1, 4, 2), torch.tensor([[0, 1, 3, 0]]), K=3)
    with pytest.raises(ValueError, match="pos must be"):
        positional_cost(torch.zeros(1, 4, 3), torch.zeros(1, 4, dtype=torch.long), K=3)


def _views(B=4, g=6, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N = g * g
    z1, z2 = torch.randn(B, N, D, generator=gen), torch.randn(B, N, D, generator=gen)
    pos1 = _grid(g, 20.0, (5.0, 5.0)).expand(B, N, 2).contiguous()
    pos2 = _grid(g, 15.0, (40.0, 30.0)).expand(B, N, 2).contiguous()  # overlapping second crop
    return z1, z2, pos1, pos2


def test_every_token_in_exactly_one_cluster_and_kept_clusters_in_both_views():
    z1, z2, pos1, pos2 = _views()
    B, N, _ = z1.shape
    K = 8
    assign = joint_space_clustering(z1, z2, pos1, pos2, K, lambda_pos=1.0,
                                    generator=torch.Generator().manual_seed(0))
    assert assign.shape == (B, 2 * N) and assign.dtype == torch.long
    assert assign.min() >= 0 and assign.max() < K
    a1, a2 = split_views(assign, N)
    assert torch.equal(torch.cat([a1, a2], dim=1), assign)
    counts = cluster_counts(assign, K)
    assert counts.sum(dim=1).eq(2 * N).all()  # every token counted once
    c1, c2 = cluster_counts(a1, K), cluster_counts(a2, K)
    valid = valid_objects(a1, a2, K)
    assert torch.equal(valid, (c1 > 0) & (c2 > 0))
    assert (c1[valid] > 0).all() and (c2[valid] > 0).all()
    for b in range(B):  # independently: kept = clusters seen in view 1 AND in view 2
        both = set(a1[b].tolist()) & set(a2[b].tolist())
        assert set(valid[b].nonzero().flatten().tolist()) == both and both


def test_recovers_well_separated_semantic_groups():
    """4 groups of tokens around 4 orthogonal directions (random positions, lambda_pos = 0): every
    cluster is exactly one group, whatever the seeds (two seeds in one group get pulled apart by the
    equipartition constraint)."""
    gen = torch.Generator().manual_seed(1)
    B, N, D, K = 6, 16, 8, 4
    labels = torch.arange(2 * N) % K  # 8 tokens per group in the joint view
    dirs = torch.eye(D)[:K]
    z = dirs[labels].expand(B, 2 * N, D) + 0.05 * torch.randn(B, 2 * N, D, generator=gen)
    pos = torch.rand(B, 2 * N, 2, generator=gen) * 100
    assign = joint_space_clustering(z[:, :N], z[:, N:], pos[:, :N], pos[:, N:], K, lambda_pos=0.0,
                                    generator=torch.Generator().manual_seed(0))
    for b in range(B):
        pairs = set(zip(labels.tolist(), assign[b].tolist()))
        assert len(pairs) == K and len({k for _, k in pairs}) == K  # a bijection group <-> cluster


def _within_cluster_spatial_variance(pos: torch.Tensor, assign: torch.Tensor, K: int) -> float:
    """Mean over tokens of the squared distance to their cluster's mean position."""
    one_hot = F.one_hot(assign, K).float()  # (B, M, K)
    counts = one_hot.sum(dim=1).clamp_min(1)  # (B, K)
    centres = one_hot.transpose(1, 2) @ pos / counts[..., None]  # (B, K, 2)
    own = centres.gather(1, assign[..., None].expand(*assign.shape, 2))  # (B, M, 2)
    return float((pos - own).square().sum(-1).mean())


def test_large_lambda_pos_gives_spatially_more_compact_clusters():
    z1, z2, pos1, pos2 = _views(B=8, g=8, D=32, seed=3)  # random tokens: no semantic structure
    K = 8
    pos = torch.cat([pos1, pos2], dim=1)
    variances = {}
    for lam in (0.0, 10.0):
        assign = joint_space_clustering(z1, z2, pos1, pos2, K, lambda_pos=lam,
                                        generator=torch.Generator().manual_seed(0))
        variances[lam] = _within_cluster_spatial_variance(pos, assign, K)
    # Measured: 3179 px^2 without positions, 708 px^2 with lambda_pos = 10 (2108 at lambda_pos = 1).
    assert variances[10.0] < 0.5 * variances[0.0], variances


def test_deterministic_with_a_generator_and_seed_dependent():
    z1, z2, pos1, pos2 = _views()
    run = lambda s: joint_space_clustering(z1, z2, pos1, pos2, 8, 1.0,  # noqa: E731
                                           generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_fp32_inside_bf16_autocast_and_low_precision_inputs():
    """Autocast is switched off inside: the result equals the fp32 call on the same values."""
    z1, z2, pos1, pos2 = _views()
    z1b, z2b = z1.bfloat16(), z2.bfloat16()
    ref = joint_space_clustering(z1b.float(), z2b.float(), pos1, pos2, 8, 1.0,
                                 generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = joint_space_clustering(z1b, z2b, pos1, pos2, 8, 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, ref)


def test_clustering_input_errors():
    z1, z2, pos1, pos2 = _views(B=2, g=2, D=4)  # N = 4, 2N = 8
    with pytest.raises(ValueError, match=r"K must be in \[1, 2N\] = \[1, 8\]"):
        joint_space_clustering(z1, z2, pos1, pos2, 9, 1.0)
    with pytest.raises(ValueError, match="pos2 must be"):
        joint_space_clustering(z1, z2, pos1, pos2[:, :3], 4, 1.0)
    with pytest.raises(ValueError, match="lambda_pos"):
        joint_space_clustering(z1, z2, pos1, pos2, 4, -1.0)
    with pytest.raises(ValueError, match="split_views|2N"):
        split_views(torch.zeros(2, 7, dtype=torch.long), 4)


def _plain_sinkhorn(cost: torch.Tensor, n_iter: int, c: torch.Tensor) -> torch.Tensor:
    """The authors' ``sinkhorn`` (main_cribo.py:712-723) written out in float64: normalise the whole
    matrix, then scale rows to 1/M and columns to c (B, 1, K), rows first."""
    M = cost.shape[1]
    R = torch.exp(-cost.double() / 0.05)
    R = R / R.sum(dim=(1, 2), keepdim=True)
    for _ in range(n_iter):
        R = R * (1 / M) / R.sum(dim=2, keepdim=True)
        R = R * c.double() / R.sum(dim=1, keepdim=True)
    return R


def test_sinkhorn_equals_alternating_normalisation_rows_first_and_meets_marginals():
    gen = torch.Generator().manual_seed(0)
    B, M, K = 2, 12, 4
    cost = torch.rand(B, M, K, generator=gen)
    Q = sinkhorn_knopp(cost, eps=0.05, n_iter=5)
    torch.testing.assert_close(Q.double(), _plain_sinkhorn(cost, 5, torch.full((B, 1, K), 1 / K)),
                               rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(Q.sum(dim=1), torch.full((B, K), 1 / K), rtol=1e-5, atol=0)  # columns last
    # Rows converge with more iterations (5 is the method's budget, not convergence).
    Q = sinkhorn_knopp(cost, eps=0.05, n_iter=300)
    torch.testing.assert_close(Q.sum(dim=2), torch.full((B, M), 1 / M), rtol=1e-3, atol=0)


def test_sinkhorn_with_size_weighted_column_marginals():
    gen = torch.Generator().manual_seed(1)
    B, M, K = 3, 10, 5
    cost = torch.rand(B, M, K, generator=gen)
    c = torch.rand(B, K, generator=gen) + 0.1
    c = c / c.sum(dim=1, keepdim=True)
    Q = sinkhorn_knopp(cost, eps=0.05, n_iter=5, col_marginals=c)
    torch.testing.assert_close(Q.double(), _plain_sinkhorn(cost, 5, c[:, None, :]), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(Q.sum(dim=1), c, rtol=1e-5, atol=0)


def test_object_representations_hand_example_and_counts():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]])  # (1, 4, 2)
    assign = torch.tensor([[0, 0, 2, 0]])
    reps = object_representations(tokens, assign, K=3)
    expected = torch.tensor([[[11 / 3, 14 / 3], [0.0, 0.0], [5.0, 6.0]]])
    torch.testing.assert_close(reps, expected)
    assert torch.equal(cluster_counts(assign, 3), torch.tensor([[3, 0, 1]]))
    a1, a2 = torch.tensor([[0, 0, 2, 1]]), torch.tensor([[1, 1, 0, 3]])
    assert torch.equal(valid_objects(a1, a2, 4), torch.tensor([[True, True, False, False]]))
    with pytest.raises(ValueError, match=r"assign values must lie in \[0, 3\)"):
        object_representations(tokens, torch.tensor([[0, -1, 2, 0]]), K=3)


def test_gradient_flows_to_student_tokens_through_the_mean_pooling():
    tokens = torch.randn(2, 5, 3, requires_grad=True)
    assign = torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, 2, 0]])
    weights = torch.randn(2, 3, 3)
    (object_representations(tokens, assign, K=3) * weights).sum().backward()
    counts = cluster_counts(assign, 3).float()  # (2, 3)
    expected = weights.gather(1, assign[..., None].expand(2, 5, 3)) / counts.gather(1, assign)[..., None]
    torch.testing.assert_close(tokens.grad, expected)


def test_first_iteration_shortcut_equals_the_general_positional_cost():
    """The first assignment holds only the seeds; its nearest-member distances are read directly from
    the seeds' rows of the distance matrix. They must equal the general segment-min."""
    from cribo.pretrain.clustering import _nearest_member_distances, _pairwise_sq_distances, _seed_distances

    gen = torch.Generator().manual_seed(0)
    B, M, K = 3, 20, 6
    pos = torch.rand(B, M, 2, generator=gen) * 100
    seeds = torch.rand(B, M, generator=gen).topk(K, dim=1).indices
    assign = torch.full((B, M), -1, dtype=torch.long).scatter_(1, seeds, torch.arange(K).expand(B, K))
    sq = _pairwise_sq_distances(pos)
    assert torch.equal(_seed_distances(sq, seeds), _nearest_member_distances(sq, assign, K))


# ----------------------------------------------------------------------------- modes (paper / reference)
def test_paper_mode_clusters_each_image_independently_of_the_batch():
    """Paper mode: an image's assignment does not depend on the other images of the batch (per-image
    cost range). (Reference mode normalises over the batch, so it may.)"""
    z1, z2, pos1, pos2 = _views(B=3)
    seeds = torch.rand(3, 72, generator=torch.Generator().manual_seed(3)).topk(8, dim=1).indices
    whole = joint_space_clustering(z1, z2, pos1, pos2, 8, 1.0, seeds=seeds)
    alone = [joint_space_clustering(z1[b:b + 1], z2[b:b + 1], pos1[b:b + 1], pos2[b:b + 1], 8, 1.0,
                                    seeds=seeds[b:b + 1]) for b in range(3)]
    assert torch.equal(whole, torch.cat(alone))


def test_seeds_argument_equals_the_generator_draw_and_is_checked():
    z1, z2, pos1, pos2 = _views(B=2)
    seeds = torch.rand(2, 72, generator=torch.Generator().manual_seed(9)).topk(8, dim=1).indices
    drawn = joint_space_clustering(z1, z2, pos1, pos2, 8, 1.0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(joint_space_clustering(z1, z2, pos1, pos2, 8, 1.0, seeds=seeds), drawn)
    with pytest.raises(ValueError, match="seeds must be distinct"):
        joint_space_clustering(z1, z2, pos1, pos2, 8, 1.0, seeds=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"seeds must be a long tensor of shape \(2, 8\)"):
        joint_space_clustering(z1, z2, pos1, pos2, 8, 1.0, seeds=seeds[:, :4])
    with pytest.raises(ValueError, match=r"seeds values must lie in \[0, 72\)"):
        joint_space_clustering(z1, z2, pos1, pos2, 8, 1.0, seeds=seeds + 72)
    with pytest.raises(ValueError, match="clustering mode 'authors' is unknown: choose one of paper, reference"):
        joint_space_clustering(z1, z2, pos1, pos2, 8, 1.0, mode="authors")


def test_fill_rules_hand_example():
    """Undefined entries (+inf): paper -> mean of the defined ones; reference -> mean of all, undefined as 0."""
    from cribo.pretrain.clustering import _fill_and_scale

    nearest = torch.tensor([[[1.0, float("inf")], [3.0, 4.0]]])  # defined: 1, 3, 4
    filled, inv_max = _fill_and_scale(nearest)
    torch.testing.assert_close(filled, torch.tensor([[[1.0, 8 / 3], [3.0, 4.0]]]))
    filled, inv_max_ref = _fill_and_scale(nearest, mean_over_all=True)
    torch.testing.assert_close(filled, torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]))
    assert float(inv_max) == float(inv_max_ref) == 0.25


def test_reference_rules_zero_distances_and_empty_clusters():
    """A member at distance 0 is 'no member' for the reference, a true 0 for the paper mode."""
    from cribo.pretrain.clustering import _nearest_member_distances, _pairwise_sq_distances

    pos = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]]])  # tokens 0 and 1 share a position
    assign = torch.tensor([[0, 0, 1]])
    paper = _nearest_member_distances(_pairwise_sq_distances(pos), assign, 2)
    ref = _nearest_member_distances(_pairwise_sq_distances(pos, zero_is_undefined=True), assign, 2)
    inf = float("inf")
    torch.testing.assert_close(paper, torch.tensor([[[0.0, 0.0, 5.0], [5.0, 5.0, inf]]]))
    torch.testing.assert_close(ref, torch.tensor([[[inf, inf, 5.0], [5.0, 5.0, inf]]]))
