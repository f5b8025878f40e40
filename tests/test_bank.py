import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cribo.pretrain.bank import BankQuery, ObjectMemoryBank

REPO = Path(__file__).resolve().parents[1]


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def ones(*shape):
    return torch.ones(*shape, dtype=torch.bool)


X, Y, Z = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]


def bank_with(m1, m2, valid=None, dtype=torch.float32, size=4):
    """A bank holding one pushed batch: m1, m2 (n, K, 3)."""
    m1, m2 = t(m1), t(m2)
    b = ObjectMemoryBank(size, m1.shape[1], 3, dtype=dtype)
    b.push(m1, m2, ones(*m1.shape[:2]) if valid is None else torch.tensor(valid))
    return b


# ----------------------------------------------------------------------------- cycle consistency (Eq. 2-4)


def test_cycle_consistent_when_the_back_search_lands_on_the_same_object():
    # Bank image: objects x and y in both views (scaled: the bank keeps raw vectors).
    bank = bank_with([[[3.0, 0, 0], [0, 2.0, 0]]], [[[2.0, 0, 0.2], [0, 4.0, 0.1]]])
    c1 = t([[[1.0, 0.1, 0.0], [0.1, 1.0, 0.0]]])
    c2 = t([[[1.0, 0.0, 0.1], [0.0, 1.0, 0.1]]])
    r = bank.query(c1, c2, ones(1, 2))
    assert isinstance(r, BankQuery)
    assert r.idx1.tolist() == [[0, 1]] and r.idx2.tolist() == [[0, 1]]
    assert r.ok1.tolist() == [[True, True]] and r.ok2.tolist() == [[True, True]]
    # targets are the RAW bank vectors: direction 1 from M1, direction 2 from M2
    torch.testing.assert_close(r.nn1, t([[[3.0, 0, 0], [0, 2.0, 0]]]))
    torch.testing.assert_close(r.nn2, t([[[2.0, 0, 0.2], [0, 4.0, 0.1]]]))
    assert r.nn1.dtype == torch.float32


def test_cycle_fails_when_the_back_search_lands_on_another_object():
    # The bank image's view-2 objects are crossed: M2[slot of x] looks like y.
    bank = bank_with([[X, Y]], [[Y, X]])
    c1 = t([[[1.0, 0.1, 0.0], [0.1, 1.0, 0.0]]])
    c2 = t([[[1.0, 0.0, 0.1], [0.0, 1.0, 0.1]]])
    r = bank.query(c1, c2, ones(1, 2))
    assert r.idx1.tolist() == [[0, 1]]  # the forward search itself succeeds...
    assert r.ok1.tolist() == [[False, False]]  # ...but jump + back-search lands on the other object
    # direction 2: c2^0 ~ x -> M2 slot 1 (x) -> jump M1[1] = y -> back in view 1 lands on object 1
    assert r.idx2.tolist() == [[1, 0]] and r.ok2.tolist() == [[False, False]]
    torch.testing.assert_close(r.nn1, t([[X, Y]]))  # targets are returned even when the cycle fails


def test_back_search_spans_the_whole_batch_and_can_land_on_another_image():
    # bank: object x in view 1, z in view 2. Batch of 2 images, K = 2.
    bank = bank_with([[X, [0.0, -1.0, 0.0]]], [[Z, [0.0, 0.0, -1.0]]])
    c1 = t([[[1.0, 0.2, 0.0], [0.0, -1.0, 0.1]],
            [[1.0, 0.0, 0.3], [0.0, -1.0, 0.2]]])
    # view 2 of image 1 object 0 is closer to z than image 0's object 0
    c2 = t([[[0.6, 0.0, 0.8], [0.0, 0.1, -1.0]],
            [[0.1, 0.0, 1.0], [0.1, 0.0, -0.5]]])
    r = bank.query(c1, c2, ones(2, 2))
    assert r.idx1.tolist() == [[0, 1], [0, 1]]
    # (0,0) and (1,0) both jump to z, whose nearest batch view-2 object is (1,0): only (1,0) is consistent
    assert r.ok1[:, 0].tolist() == [False, True]


def test_top1_is_by_cosine_not_dot_product():
    # Slot 0 has the larger dot product with the query, slot 1 the larger cosine.
    bank = bank_with([[[5.0, 5.0, 0.0], [3.0, 0.0, 0.0]]], [[Z, X]])
    r = bank.query(t([[[1.0, 0.1, 0.0], [0.0, 0.0, 1.0]]]), t([[X, Z]]), ones(1, 2))
    assert r.idx1[0, 0].item() == 1


def test_invalid_bank_slots_are_never_retrieved():
    # Slot 0 is an exact copy of the query but invalid; slot 1 is a weaker match.
    bank = bank_with([[[1.0, 0.1, 0.0], [0.7, 0.7, 0.0]]], [[X, X]], valid=[[False, True]])
    r = bank.query(t([[[1.0, 0.1, 0.0], Z]]), t([[X, Z]]), ones(1, 2))
    assert r.idx1[0, 0].item() == 1
    assert bank.counts().tolist() == [1]
    assert torch.equal(bank.ordered()[0][0, 0], torch.zeros(3))  # invalid slots are stored as zeros


def test_invalid_batch_objects_are_neither_queried_nor_back_search_candidates():
    bank = bank_with([[X, Y]], [[X, Y]])
    nan = [float("nan")] * 3
    c1 = t([[[1.0, 0.1, 0.0], nan]])  # the invalid query holds NaN: it must never be read
    # the invalid view-2 object is an exact copy of the jumped vector x: without the mask the
    # back-search from (0, 0) would land on it and fail
    c2 = t([[[0.6, 0.4, 0.0], X]])
    valid = torch.tensor([[True, False]])
    r = bank.query(c1, c2, valid)
    assert r.idx1.tolist() == [[0, -1]] and r.idx2.tolist() == [[0, -1]]
    assert r.ok1.tolist() == [[True, False]] and r.ok2.tolist() == [[True, False]]
    assert torch.equal(r.nn1[0, 1], torch.zeros(3)) and torch.equal(r.nn2[0, 1], torch.zeros(3))
    assert torch.isfinite(r.nn1).all() and torch.isfinite(r.nn2).all()
    c2[0, 0] = t([0.9, 0.0, 0.1])
    # same batch with both objects valid (c1's NaN replaced): now the back-search from (0, 0) hits (0, 1)
    both = bank.query(t([[[1.0, 0.1, 0.0], Y]]), c2, ones(1, 2))
    assert both.ok1[0, 0].item() is False


def test_empty_bank_gives_no_match():
    bank = ObjectMemoryBank(4, 2, 3)
    r = bank.query(t([[X, Y]]), t([[X, Y]]), ones(1, 2))
    assert r.idx1.tolist() == [[-1, -1]] and r.idx2.tolist() == [[-1, -1]]
    assert not r.ok1.any() and not r.ok2.any()
    assert torch.equal(r.nn1, torch.zeros(1, 2, 3))


def test_an_image_never_retrieves_itself_query_before_push():
    bank = bank_with([[Y, Z]], [[Y, Z]])
    c1, c2 = t([[X, [1.0, 0.0, 0.5]]]), t([[X, [1.0, 0.0, 0.5]]])
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in bank.state_dict().items()}
    r = bank.query(c1, c2, ones(1, 2))
    assert set(r.idx1.flatten().tolist()) <= {0, 1}  # only the previously pushed image
    after = bank.state_dict()
    assert all(torch.equal(before[k], after[k]) if torch.is_tensor(before[k]) else before[k] == after[k]
               for k in before)  # query never modifies the bank
    bank.push(c1, c2, ones(1, 2))  # the step's push comes after its query...
    r2 = bank.query(c1, c2, ones(1, 2))  # ...so only the NEXT step could find it
    assert r2.idx1.tolist() == [[0, 1]] and r2.ok1.all()  # newest image now sits at rows 0..K-1


# ----------------------------------------------------------------------------- FIFO


def image(i, K=2, D=3):
    """(1, K, D) with every entry of object k equal to 10 * i + k: identifiable after storage."""
    return (10.0 * i + torch.arange(K, dtype=torch.float32)).view(1, K, 1).expand(1, K, D).clone()


def ids(bank):
    m1, m2, _ = bank.ordered()
    assert torch.equal(m1, m2)  # pushed identically in these tests
    return [round(v) // 10 for v in m1[:, 0, 0].tolist()]


def push_images(bank, idx):
    c = torch.cat([image(i) for i in idx])
    bank.push(c, c.clone(), ones(len(idx), 2))


def test_fifo_newest_first_and_wrap_around():
    bank = ObjectMemoryBank(3, 2, 3, dtype=torch.float32)
    push_images(bank, [1, 2])
    assert ids(bank) == [1, 2] and len(bank) == 2
    push_images(bank, [3, 4])  # 3 images fit: the oldest (2) is overwritten
    assert ids(bank) == [3, 4, 1]
    push_images(bank, [5])
    assert ids(bank) == [5, 3, 4]
    push_images(bank, [6, 7, 8, 9])  # more than S at once: keep the first S, as cat(new, old)[:S]
    assert ids(bank) == [6, 7, 8]
    assert bank.pushed == 9 and len(bank) == 3


def test_evicted_images_are_no_longer_retrieved():
    bank = ObjectMemoryBank(2, 1, 3, dtype=torch.float32)
    bank.push(t([[X]]), t([[X]]), ones(1, 1))
    bank.push(t([[[0.6, 0.8, 0.0]]]), t([[[0.6, 0.8, 0.0]]]), ones(1, 1))
    q = t([[[1.0, 0.05, 0.0]]])
    first = bank.query(q, q, ones(1, 1))
    assert torch.equal(first.nn1[0, 0], t(X))
    bank.push(t([[Z]]), t([[Z]]), ones(1, 1))  # evicts x (the oldest)
    second = bank.query(q, q, ones(1, 1))
    torch.testing.assert_close(second.nn1[0, 0], t([0.6, 0.8, 0.0]))


def test_per_image_counts():
    bank = ObjectMemoryBank(3, 3, 2)
    c = torch.randn(2, 3, 2)
    bank.push(c, c, torch.tensor([[True, False, True], [False, False, False]]))
    bank.push(c[:1], c[:1], torch.tensor([[True, True, True]]))
    assert bank.counts().tolist() == [3, 2, 0]


# ----------------------------------------------------------------------------- against brute force


def brute_force(bank, c1, c2, valid):
    """Loop implementation of Eq. 2-4 over the newest-first queue (fp32)."""
    B, K, D = c1.shape
    q1, q2, qvalid = bank.ordered()
    M = {1: q1.float().reshape(-1, D), 2: q2.float().reshape(-1, D)}
    C = {1: c1, 2: c2}
    qvalid = qvalid.reshape(-1)
    slots = [j for j in range(qvalid.numel()) if qvalid[j]]
    cand = [(b, k) for b in range(B) for k in range(K) if valid[b, k]]
    out = {}
    for a, other in ((1, 2), (2, 1)):
        idx = torch.full((B, K), -1, dtype=torch.long)
        ok = torch.zeros(B, K, dtype=torch.bool)
        for b, k in cand:
            if not slots:
                continue
            cos = [F.cosine_similarity(C[a][b, k], M[a][j], dim=0).item() for j in slots]
            j = slots[max(range(len(slots)), key=cos.__getitem__)]
            idx[b, k] = j
            back = [F.cosine_similarity(M[other][j], C[other][bb, kk], dim=0).item() for bb, kk in cand]
            ok[b, k] = cand[max(range(len(cand)), key=back.__getitem__)] == (b, k)
        out[a] = (idx, ok)
    return out


@pytest.mark.parametrize("chunk_size", [1, 5, 1 << 14])
def test_query_matches_brute_force_with_partial_ring_and_invalid_slots(chunk_size):
    g = torch.Generator().manual_seed(chunk_size)
    K, D = 3, 6
    bank = ObjectMemoryBank(7, K, D, dtype=torch.float32, chunk_size=chunk_size)
    for n in (2, 3):  # 5 of 7 rows filled, not yet wrapped
        base = torch.randn(n, K, D, generator=g)
        bank.push(base, base + 0.3 * torch.randn(n, K, D, generator=g), torch.rand(n, K, generator=g) < 0.8)
    base = torch.randn(4, K, D, generator=g)
    c1, c2 = base, base + 0.3 * torch.randn(4, K, D, generator=g)
    valid = torch.rand(4, K, generator=g) < 0.8
    r = bank.query(c1, c2, valid)
    ref = brute_force(bank, c1, c2, valid)
    assert torch.equal(r.idx1, ref[1][0]) and torch.equal(r.ok1, ref[1][1])
    assert torch.equal(r.idx2, ref[2][0]) and torch.equal(r.ok2, ref[2][1])
    has = r.idx1 >= 0
    assert torch.equal(r.nn1[has], bank.ordered()[0].reshape(-1, D)[r.idx1[has]].float())
    # after wrap-around too
    for _ in range(2):
        b = torch.randn(3, K, D, generator=g)
        bank.push(b, b + 0.1, torch.rand(3, K, generator=g) < 0.8)
    r = bank.query(c1, c2, valid)
    ref = brute_force(bank, c1, c2, valid)
    assert torch.equal(r.idx1, ref[1][0]) and torch.equal(r.ok2, ref[2][1])


def test_bf16_search_agrees_on_separated_data():
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(40, 32, generator=g), dim=1) * 5
    bank32 = ObjectMemoryBank(10, 4, 32, dtype=torch.bfloat16)
    bank16 = ObjectMemoryBank(10, 4, 32, dtype=torch.bfloat16, search_dtype=torch.bfloat16)
    for b in (bank32, bank16):
        b.push(protos.view(10, 4, 32), protos.view(10, 4, 32), ones(10, 4))
    q = (protos[:8] + 0.05 * torch.randn(8, 32, generator=g)).view(2, 4, 32)
    assert torch.equal(bank32.query(q, q, ones(2, 4)).idx1, bank16.query(q, q, ones(2, 4)).idx1)


# ----------------------------------------------------------------------------- storage, memory, state


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_storage_dtype_and_memory_bytes(dtype):
    S, K, D = 5, 4, 8
    bank = ObjectMemoryBank(S, K, D, dtype=dtype)
    c = torch.randn(2, K, D)
    bank.push(c, 2 * c, ones(2, K))
    assert bank.unit1.dtype == dtype and bank.unit2.dtype == dtype and bank.norm1.dtype == torch.float32
    torch.testing.assert_close(bank.unit1.float().norm(dim=1)[-2 * K:], torch.ones(2 * K), rtol=0, atol=4e-3)
    # unit vector in `dtype` times an fp32 norm: the relative precision of `dtype` itself
    eps = torch.finfo(dtype).eps
    m1, m2, _ = bank.ordered()
    torch.testing.assert_close(m1, c, rtol=2 * eps, atol=2 * eps * c.abs().max().item())
    torch.testing.assert_close(m2, 2 * c, rtol=2 * eps, atol=4 * eps * c.abs().max().item())
    r = bank.query(c, 2 * c, ones(2, K))
    assert r.nn1.dtype == torch.float32 and torch.equal(r.nn1, m1)  # self-retrieval after push, raw vectors
    itemsize = torch.tensor([], dtype=dtype).element_size()
    assert bank.memory_bytes() == 2 * S * K * D * itemsize + 2 * S * K * 4 + S * K


def test_paper_bank_fits_the_memory_goal_in_fp16():
    # S = 25k images, K = 32, ViT-S (D = 384): must stay under 1.2 GiB (computed, not allocated)
    S, K, D = 25_000, 32, 384
    expected = 2 * S * K * D * 2 + 2 * S * K * 4 + S * K
    assert expected < 1.2 * 2**30
    small = ObjectMemoryBank(25, K, D, dtype=torch.float16)
    assert small.memory_bytes() * 1000 == expected


def test_fp16_storage_keeps_large_vectors_and_rejects_non_finite_ones():
    bank = ObjectMemoryBank(2, 1, 3, dtype=torch.float16)
    big = t([[[1e6, 2e6, 0.0]]])  # beyond the fp16 range: the norm is kept in fp32
    bank.push(big, big, ones(1, 1))
    torch.testing.assert_close(bank.ordered()[0], big, rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="non-finite values in valid object vectors"):
        bank.push(t([[[float("nan"), 0.0, 0.0]]]), t([[X]]), ones(1, 1))
    bank.push(t([[[float("nan"), 0.0, 0.0]]]), t([[X]]), torch.zeros(1, 1, dtype=torch.bool))  # invalid: fine


def test_state_round_trip_is_exact(tmp_path):
    g = torch.Generator().manual_seed(1)
    K, D = 3, 5
    a = ObjectMemoryBank(4, K, D, dtype=torch.bfloat16)
    for n in (3, 2):  # wraps around
        x = torch.randn(n, K, D, generator=g)
        a.push(x, x + 0.1, torch.rand(n, K, generator=g) < 0.7)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = ObjectMemoryBank(4, K, D, dtype=torch.bfloat16)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert (b.head, b.filled, b.pushed) == (a.head, a.filled, a.pushed)
    for x, y in zip(a.ordered(), b.ordered()):
        assert torch.equal(x, y)
    q1, q2 = torch.randn(2, K, D, generator=g), torch.randn(2, K, D, generator=g)
    valid = ones(2, K)
    for _ in range(2):  # identical after further steps too
        ra, rb = a.query(q1, q2, valid), b.query(q1, q2, valid)
        assert all(torch.equal(getattr(ra, f), getattr(rb, f)) for f in ("nn1", "nn2", "ok1", "ok2", "idx1", "idx2"))
        a.push(q1, q2, valid)
        b.push(q1, q2, valid)


@pytest.mark.parametrize("kwargs,edit,match", [
    (dict(dtype=torch.float32), None, "bank has dtype='bfloat16' but this bank has dtype='float32'"),
    (dict(num_objects=4), None, "bank has num_objects=3 but this bank has num_objects=4"),
    (dict(size_images=5), None, "bank has size=4 but this bank has size=5"),
    ({}, lambda s: s.pop("valid"), r"missing \['valid'\]"),
    ({}, lambda s: s.update(extra=1), r"unexpected \['extra'\]"),
    ({}, lambda s: s.update(unit1=s["unit1"].float()), r"'unit1' is torch.float32 \(12, 5\), expected torch.bfloat16"),
    ({}, lambda s: s.update(head=7), "inconsistent counters head=7"),
])
def test_load_state_dict_is_strict(kwargs, edit, match):
    a = ObjectMemoryBank(4, 3, 5, dtype=torch.bfloat16)
    state = dict(a.state_dict())
    if edit is not None:
        edit(state)
    args = dict(size_images=4, num_objects=3, dim=5, dtype=torch.bfloat16) | kwargs
    with pytest.raises(ValueError, match=match):
        ObjectMemoryBank(**args).load_state_dict(state)


def test_bad_construction_and_inputs_are_rejected():
    with pytest.raises(ValueError, match="size_images must be a positive integer"):
        ObjectMemoryBank(0, 2, 3)
    with pytest.raises(ValueError, match="dtype=torch.int8 is not supported"):
        ObjectMemoryBank(2, 2, 3, dtype=torch.int8)
    bank = ObjectMemoryBank(2, 2, 3)
    with pytest.raises(ValueError, match=r"c1 and c2 must both be \(B, 2, 3\)"):
        bank.query(torch.randn(1, 3, 3), torch.randn(1, 3, 3), ones(1, 3))
    with pytest.raises(ValueError, match=r"valid must be a bool tensor of shape \(1, 2\)"):
        bank.push(torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.ones(1, 2))


# ----------------------------------------------------------------------------- two gloo ranks

WORKER = textwrap.dedent("""
    import sys, torch
    from cribo import dist
    from cribo.pretrain.bank import ObjectMemoryBank
    from cribo.pretrain.losses import ObjectLoss

    rank, world, device = dist.init_distributed("cpu")
    assert (rank, world, device.type) == (dist.rank(), 2, "cpu") and dist.is_main() == (rank == 0)
    out = sys.argv[1]
    # all_gather_cat: rank order; all_reduce_mean; broadcast_object
    x = torch.full((2, 3), float(rank))
    assert dist.all_gather_cat(x).tolist() == [[0.0] * 3] * 2 + [[1.0] * 3] * 2
    assert dist.all_reduce_mean(torch.tensor([float(rank)])).item() == 0.5
    assert dist.broadcast_object({"seed": 123} if rank == 0 else None) == {"seed": 123}
    # banks stay identical: local queries, gathered pushes
    g = torch.Generator().manual_seed(rank)
    bank = ObjectMemoryBank(5, 3, 4, dtype=torch.float16)
    for step in range(4):
        c1 = torch.randn(2, 3, 4, generator=g)
        c2 = c1 + 0.1 * torch.randn(2, 3, 4, generator=g)
        valid_last = torch.rand(2, 3, generator=g) < 0.8
        bank.query(c1, c2, valid_last)
        bank.push(dist.all_gather_cat(c1), dist.all_gather_cat(c2), dist.all_gather_cat(valid_last))
    # the object centre is the mean over ALL valid objects of all ranks (unequal counts per rank)
    loss = ObjectLoss(out_dim=2, center_momentum=0.0)
    t = torch.full((1, 3, 2), float(rank + 1))
    valid = torch.tensor([[True, False, False]]) if rank == 0 else torch.tensor([[True, True, True]])
    loss.update_center(t, t, valid)  # (2 * 1 * 1 + 6 * 2) / 8 = 1.75
    assert loss.center.tolist() == [[1.75, 1.75]], loss.center
    last = dist.all_gather_cat(torch.where(valid_last.unsqueeze(-1), c1, 0.0))
    torch.save({"bank": bank.state_dict(), "last": last}, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy()
""")


def test_two_gloo_ranks_keep_identical_banks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)["bank"]
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)["bank"]
    assert s0["filled"] == 5 and s0["pushed"] == 16
    for k in s0:
        assert torch.equal(s0[k], s1[k]) if torch.is_tensor(s0[k]) else s0[k] == s1[k], k
    # newest first: the last push holds rank 0's images then rank 1's, in rank order
    b = ObjectMemoryBank(5, 3, 4, dtype=torch.float16)
    b.load_state_dict(s0)
    last = torch.load(tmp_path / "rank0.pt", weights_only=True)["last"]
    assert last.shape == (4, 3, 4)
    torch.testing.assert_close(b.ordered()[0][:4], last, rtol=1e-3, atol=1e-3)


def test_search_dtype_defaults_to_float32_on_cpu():
    assert ObjectMemoryBank(2, 2, 3, dtype=torch.float16).search_dtype == torch.float32
    assert ObjectMemoryBank(2, 2, 3, dtype=torch.float16, search_dtype=torch.bfloat16).search_dtype == torch.bfloat16


# ----------------------------------------------------------------------------- dist fallbacks (one process)


def test_dist_helpers_fall_back_to_one_process(monkeypatch):
    from cribo import dist

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert dist.init_distributed("cpu") == (0, 1, torch.device("cpu"))
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    x = torch.randn(3, 2)
    assert dist.all_gather_cat(x) is x
    mean = dist.all_reduce_mean(x)
    assert torch.equal(mean, x) and mean is not x
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    dist.barrier()
    with pytest.raises(TypeError, match="needs a floating-point tensor"):
        dist.all_reduce_mean(torch.ones(2, dtype=torch.long))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not; launch with `torchrun"):
        dist.init_distributed("cpu")
    with pytest.raises(ValueError, match="device=meta is not supported"):
        dist.init_distributed("meta")
