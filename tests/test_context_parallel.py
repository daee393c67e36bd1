"""Context parallelism (rattention_ext.distributed) and chunked prefill against one process.

The distributed tests spawn four gloo processes once (a file store) and run every case in
sub-groups: two groups of 2 ranks side by side ([0, 1] and [2, 3], so group ranks differ
from global ones), one of 3 ([1, 2, 3]) and all 4. Each rank compares its rows of the output and of the q/k/v gradients, and
the all-reduced gradients of the shared tensors, with ``rattention_ext.forward`` on the
whole sequence in one process (float64, 1e-10). Traffic is counted by wrapping the
torch.distributed calls, at two shard lengths.
"""
from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rattention_ext
from rattention_ext import continuation
from rattention_ext import distributed as cp
from rattention_ext.nn import RAttention, rotary_tables

TOL = 1e-10

# (name, shard lengths, window, Hq, Hkv, feature map, with H0, with rotary)
CASES = {
    2: [
        ("equal_w_short", [24, 24], 5, 4, 2, "softmax", True, True),
        ("uneven_w_longer_than_shard", [9, 30], 12, 2, 2, "relu", True, False),
        ("w_longer_than_both", [7, 6], 20, 4, 1, "softmax", False, True),
        ("w0", [11, 13], 0, 4, 2, "relu", True, True),
    ],
    3: [
        ("uneven_one_shorter_than_w", [20, 4, 17], 9, 4, 2, "softmax", True, True),
        ("halo_spans_two_ranks", [6, 5, 25], 12, 6, 2, "relu", True, True),
        ("equal_mha", [16, 16, 16], 7, 3, 3, "softmax", False, False),
    ],
    4: [
        ("equal_gqa", [16, 16, 16, 16], 6, 4, 2, "softmax", True, True),
        ("uneven_relu", [13, 21, 5, 19], 8, 4, 2, "relu", True, True),
        ("w_over_two_shards", [10, 5, 7, 20], 13, 8, 2, "softmax", True, True),
        ("w_over_three_shards", [4, 6, 5, 12], 17, 2, 1, "relu", False, True),
        ("empty_shard", [9, 0, 8, 10], 4, 4, 2, "softmax", True, True),
    ],
}
B, D = 2, 8


def _inputs(total, Hq, Hkv, with_h0, with_rotary, seed):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    t = dict(
        q=torch.randn(B, total, Hq, D, **f64), k=torch.randn(B, total, Hkv, D, **f64),
        v=torch.randn(B, total, Hkv, D, **f64),
        g_swa=1 + 0.3 * torch.randn(Hq, D, **f64), g_rla=1 + 0.3 * torch.randn(Hq, D, **f64),
        h0=0.5 * torch.randn(1, Hq, 2 * D, D, **f64) if with_h0 else None,
        grad=torch.randn(B, total, Hq, D, **f64),
    )
    if with_rotary:
        t["cos"], t["sin"] = rotary_tables(total + 3, D, 10000.0, dtype=torch.float64)
    return t


def _kwargs(t, fm, leaves):
    kw = dict(feature_map=fm, swa_norm_weight=leaves["g_swa"], rla_norm_weight=leaves["g_rla"],
              initial_state=leaves.get("h0"), norm_eps=1e-6)
    if "cos" in t:
        kw.update(rotary_cos=t["cos"], rotary_sin=t["sin"])
    return kw


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _check_case(rank, world, group, case, seed, dtype=torch.float64):
    """Relative errors of this rank's output and gradients (``dtype`` run) against one
    process's float64 forward on the same inputs."""
    name, lengths, w, Hq, Hkv, fm, with_h0, with_rotary = case
    total = sum(lengths)
    t = _inputs(total, Hq, Hkv, with_h0, with_rotary, seed)
    shared = ["g_swa", "g_rla"] + (["h0"] if with_h0 else [])
    cast = {x: (t[x].to(dtype) if x in ("q", "k", "v", "cos", "sin") or x in shared else t[x])
            for x in t if t[x] is not None}

    # One process, the whole sequence.
    full = {n: t[n].clone().requires_grad_() for n in ["q", "k", "v"] + shared}
    out_full = rattention_ext.forward(full["q"], full["k"], full["v"], window_size=w,
                                      **_kwargs(t, fm, full))
    out_full.backward(t["grad"])

    # This rank's shard.
    a = sum(lengths[:rank])
    n = lengths[rank]
    mine = {x: cast[x][:, a:a + n].clone().requires_grad_() for x in ["q", "k", "v"]}
    mine.update({x: cast[x].clone().requires_grad_() for x in shared})
    out = cp.context_parallel_forward(mine["q"], mine["k"], mine["v"], window_size=w,
                                      group=group, **_kwargs(cast, fm, mine))
    out.backward(t["grad"][:, a:a + n].to(dtype))

    errs = {"out": _rel(out, out_full[:, a:a + n]) if n else 0.0}
    for x in ["q", "k", "v"]:
        errs["d" + x] = _rel(mine[x].grad, full[x].grad[:, a:a + n]) if n else 0.0
    for x in shared:
        gsum = mine[x].grad.clone()
        dist.all_reduce(gsum, group=group)  # each rank holds its contribution; sum = gradient
        errs["d" + x] = _rel(gsum, full[x].grad)
    return errs


def _traffic(rank, world, group, shard, w):
    """Bytes this rank sends in one forward + backward, counted by wrapping the calls."""
    sent = {"p2p": 0, "all_gather": 0}
    orig_p2p, orig_ag = dist.batch_isend_irecv, dist.all_gather

    def p2p(ops):
        sent["p2p"] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops
                           if op.op is dist.isend)
        return orig_p2p(ops)

    def ag(out, inp, *a, **k):
        sent["all_gather"] += inp.numel() * inp.element_size()
        return orig_ag(out, inp, *a, **k)

    dist.batch_isend_irecv, dist.all_gather = p2p, ag
    try:
        t = _inputs(shard * world, 4, 2, True, True, seed=7)
        sl = slice(rank * shard, (rank + 1) * shard)
        q, k, v = (t[x][:, sl].clone().requires_grad_() for x in "qkv")
        with cp.count_traffic() as counted:
            out = cp.context_parallel_forward(q, k, v, window_size=w, group=group,
                                              **_kwargs(t, "softmax", t))
            out.backward(t["grad"][:, sl])
    finally:
        dist.batch_isend_irecv, dist.all_gather = orig_p2p, orig_ag
    return dict(sent, counted=counted["total"])


def _check_module(rank, world, group):
    """nn.RAttention with a context-parallel group equals the unsharded layer."""
    torch.manual_seed(3)
    lengths = [11, 7, 14, 9][:world]
    total = sum(lengths)
    kw = dict(num_heads=4, num_kv_heads=2, window_size=9, learned_init_state=True,
              rope_theta=1000.0, dtype=torch.float64)
    ref = RAttention(32, **kw)
    with torch.no_grad():
        ref.initial_state.normal_()
    sharded = RAttention(32, context_parallel_group=group, **kw)
    sharded.load_state_dict(ref.state_dict())
    x = torch.randn(B, total, 32, dtype=torch.float64)
    gy = torch.randn(B, total, 32, dtype=torch.float64)
    ref(x).backward(gy)
    a, n = sum(lengths[:rank]), lengths[rank]
    xs = x[:, a:a + n].clone().requires_grad_()
    y = sharded(xs)
    y.backward(gy[:, a:a + n])
    errs = {"out": _rel(y, ref(x)[:, a:a + n].detach())}
    for (name, p), (_, pr) in zip(sharded.named_parameters(), ref.named_parameters()):
        g = p.grad.clone()
        dist.all_reduce(g, group=group)
        errs["d" + name] = _rel(g, pr.grad)
    return errs


def _check_mismatch(rank, world, group):
    """A rank with a different batch size: every rank raises the same clear error."""
    q = torch.randn(3 if rank == 1 else 2, 5, 2, 8, dtype=torch.float64)
    try:
        cp.context_parallel_forward(q, q, q, window_size=3, group=group)
    except ValueError as e:
        return "same batch size" in str(e)
    return False


# world size -> the groups (global ranks) that run its cases, side by side
GROUPS = {2: [[0, 1], [2, 3]], 3: [[1, 2, 3]], 4: [[0, 1, 2, 3]]}
NPROCS = 4


def _worker(rank, init_file, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=NPROCS)
    results = {}
    try:
        for world, members in GROUPS.items():
            groups = [dist.new_group(m) for m in members]  # collective: every rank makes all
            for m, group in zip(members, groups):
                if rank not in m:
                    continue
                r = m.index(rank)
                res = results[str(world)] = {}
                for i, case in enumerate(CASES[world]):
                    res[case[0]] = _check_case(r, world, group, case, seed=100 * world + i)
                # float32 against the float64 single-process run (SPEC: relative 1e-5).
                res_f32 = results[str(world) + "_float32"] = {}
                res_f32["float32"] = _check_case(r, world, group, CASES[world][-1], seed=6,
                                                 dtype=torch.float32)
                # The copying path (ops without halo kernels, CUDA today) on one case.
                continuation._NO_HALO_KERNELS.add("cpu")
                try:
                    res["copying_path"] = _check_case(r, world, group, CASES[world][0], seed=5)
                finally:
                    continuation._NO_HALO_KERNELS.discard("cpu")
                res["module"] = _check_module(r, world, group)
                res["mismatch_raises"] = _check_mismatch(r, world, group)
                res["traffic"] = [_traffic(r, world, group, shard, w=6) for shard in (16, 48)]
            dist.barrier()
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned_all():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(os.path.join(d, "store"), d), nprocs=NPROCS, join=True)
        res = []
        for r in range(NPROCS):
            with open(os.path.join(d, f"rank{r}.json")) as f:
                res.append(json.load(f))
    return res


@pytest.fixture(params=sorted(CASES))
def spawned(request, spawned_all):
    """(world size, the per-rank results of every group of that size)."""
    world = request.param
    per_rank = [spawned_all[g][str(world)] for m in GROUPS[world] for g in m]
    assert len(per_rank) == world * len(GROUPS[world])
    return world, per_rank


def test_matches_one_process(spawned):
    world, res = spawned
    names = [c[0] for c in CASES[world]] + ["module", "copying_path"]
    for r, per_rank in enumerate(res):
        for name in names:
            for what, err in per_rank[name].items():
                assert err < TOL, f"world {world} rank {r} case {name}: {what} rel err {err:.3g}"


def test_float32_matches_one_process(spawned_all):
    for world, members in GROUPS.items():
        for g in (g for m in members for g in m):
            for what, err in spawned_all[g][f"{world}_float32"]["float32"].items():
                assert err < 1e-5, f"world {world} rank {g} float32: {what} rel err {err:.3g}"


def test_mismatched_ranks_raise_everywhere(spawned):
    world, res = spawned
    assert all(per_rank["mismatch_raises"] for per_rank in res)


def test_traffic_independent_of_shard_length(spawned):
    world, res = spawned
    for r, per_rank in enumerate(res):
        short, long = per_rank["traffic"]
        assert short["p2p"] > 0 or world == 1
        assert short == long, f"rank {r}: bytes sent grow with the shard: {short} vs {long}"
        # The module's own count (an all-gather counts once per receiving rank) agrees with
        # what the wrapped calls saw.
        assert short["counted"] == short["p2p"] + short["all_gather"] * (world - 1)


# ---- chunked prefill ----------------------------------------------------------------------
def _prefill_kwargs(B, Hq, D, P, fm, seed):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    cos, sin = rotary_tables(P, D, 10000.0, dtype=torch.float64)
    return dict(feature_map=fm, swa_norm_weight=1 + 0.3 * torch.randn(Hq, D, **f64),
                rla_norm_weight=1 + 0.3 * torch.randn(Hq, D, **f64), norm_eps=1e-6,
                initial_state=0.5 * torch.randn(B, Hq, 2 * D, D, **f64), rotary_cos=cos,
                rotary_sin=sin)


def _randn(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _same_cache(a, b):
    for x in ("keys", "values", "state", "positions"):
        ta, tb = getattr(a, x), getattr(b, x)
        assert ta.shape == tb.shape, x
        assert (ta - tb).abs().max().item() <= TOL * max(1.0, tb.abs().max().item()), x


@pytest.fixture(params=["halo_kernels", "copying"])
def continuation_path(request, monkeypatch):
    """Both ways the ops can be given a halo: the kernels' own (when the ops take it) and the
    copying one (halo rows padded into q; what devices without those kernels use)."""
    if request.param == "copying":
        monkeypatch.setattr(continuation, "_NO_HALO_KERNELS", {"cpu"})
    return request.param


@pytest.mark.parametrize("w", [0, 5, 19])
@pytest.mark.parametrize("fm", ["softmax", "relu"])
def test_chunked_prefill_equals_one_prefill(w, fm, continuation_path):
    B, Hq, Hkv, D = 2, 4, 2, 8
    chunks = [7, 1, 12, 30, 3]
    total = sum(chunks)
    q, k, v = (_randn(B, total, H, D, seed=s) for s, H in ((1, Hq), (2, Hkv), (3, Hkv)))
    kw = _prefill_kwargs(B, Hq, D, total + 1, fm, seed=4)
    one = rattention_ext.RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float64)
    o_one = rattention_ext.prefill(q, k, v, one, **kw)
    assert _rel(o_one, rattention_ext.forward(q, k, v, window_size=w, **kw)) < TOL
    chunked = rattention_ext.RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float64)
    outs, a = [], 0
    for n in chunks:
        outs.append(rattention_ext.prefill(q[:, a:a + n], k[:, a:a + n], v[:, a:a + n], chunked,
                                           **kw))
        a += n
    assert _rel(torch.cat(outs, dim=1), o_one) < TOL
    _same_cache(chunked, one)
    # Decoding continues identically.
    q1, k1, v1 = (_randn(B, 1, H, D, seed=s) for s, H in ((5, Hq), (6, Hkv), (7, Hkv)))
    d_one = rattention_ext.decode_step(q1, k1, v1, one, **kw)
    d_chunked = rattention_ext.decode_step(q1, k1, v1, chunked, **kw)
    assert _rel(d_chunked, d_one) < TOL


def test_chunked_prefill_sequences_at_different_positions_and_ragged(continuation_path):
    """Each sequence continues from its own position; ragged chunks (seq_lens) too."""
    B, Hq, Hkv, D, w = 3, 4, 2, 8, 6
    stages = [(12, [5, 12, 0]), (9, None), (10, [3, 10, 1]), (4, None)]
    P = sum(n for n, _ in stages) + 1
    kw = _prefill_kwargs(B, Hq, D, P, "softmax", seed=11)
    cache = rattention_ext.RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float64)
    seqs = [([], [], [], []) for _ in range(B)]  # per sequence: q, k, v, outputs
    for i, (n, lens) in enumerate(stages):
        q, k, v = (_randn(B, n, H, D, seed=20 + 3 * i + j)
                   for j, H in enumerate((Hq, Hkv, Hkv)))
        o = rattention_ext.prefill(q, k, v, cache, **kw,
                                   seq_lens=None if lens is None else torch.tensor(lens))
        for b in range(B):
            L = n if lens is None else lens[b]
            for lst, x in zip(seqs[b], (q, k, v, o)):
                lst.append(x[b:b + 1, :L])
    for b in range(B):
        q, k, v, o = (torch.cat(x, dim=1) for x in seqs[b])
        kwb = dict(kw, initial_state=kw["initial_state"][b:b + 1])
        assert _rel(o, rattention_ext.forward(q, k, v, window_size=w, **kwb)) < TOL
        one = rattention_ext.RAttentionCache.empty(1, w, Hkv, D, dtype=torch.float64)
        rattention_ext.prefill(q, k, v, one, **kwb)
        mine = rattention_ext.RAttentionCache(cache.keys[b:b + 1], cache.values[b:b + 1],
                                              cache.state[b:b + 1], cache.positions[b:b + 1])
        _same_cache(mine, one)


def test_chunked_prefill_module_float32():
    """nn.RAttention.prefill in chunks equals forward on the whole prompt (float32)."""
    torch.manual_seed(0)
    layer = RAttention(64, num_heads=4, num_kv_heads=2, window_size=16, learned_init_state=True)
    with torch.no_grad():
        layer.initial_state.normal_(std=0.1)
    x = torch.randn(2, 100, 64)
    full = layer(x)
    cache = layer.new_cache(2)
    outs = [layer.prefill(x[:, a:b], cache) for a, b in ((0, 10), (10, 13), (13, 64), (64, 100))]
    assert _rel(torch.cat(outs, dim=1), full) < 1e-5


def test_context_parallel_needs_a_process_group():
    q = torch.randn(1, 4, 2, 8)
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        cp.context_parallel_forward(q, q, q, window_size=2)


def test_shard_layout_pieces():
    """The halo of each rank is exactly the w + 1 tokens before it, from their owners."""
    lengths = (10, 5, 0, 7, 20, 3)
    for w in (0, 3, 6, 13, 40):
        for r in range(len(lengths)):
            lay = cp.ShardLayout(lengths, r)
            got = []
            for src, lo, hi in lay.halo_sources(w):
                src_lay = cp.ShardLayout(lengths, src)
                # the source agrees to send exactly these rows to r
                sent = [(d, slo, shi) for d, slo, shi in src_lay.halo_targets(w) if d == r]
                assert len(sent) == 1 and sent[0][2] - sent[0][1] == hi - lo
                got += list(range(lay.starts[src] + sent[0][1], lay.starts[src] + sent[0][2]))
            a = lay.start
            assert got == list(range(max(0, a - w - 1), a)), (w, r)
