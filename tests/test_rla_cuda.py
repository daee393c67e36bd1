"""CUDA RLA forward/backward and mixing kernels against the float64 reference (SPEC.md).

Accuracy rule (SPEC.md): bf16/fp16 error no more than 2x the error of the same computation
done with plain PyTorch operations in that dtype, plus a small floor; NaN never passes.
Outputs are poisoned: the CUDA caching allocator is filled with NaN before every op call,
so an output element the kernel forgets to write shows up as NaN.
Skipped without a GPU or without CUDA kernels in the build.
"""
from __future__ import annotations

import pytest
import torch

import rattention_ext
from rattention_ext import reference as ref

ops = torch.ops.rattention_ext

_HAS_CUDA = torch.cuda.is_available() and bool(rattention_ext.build_info().get("cuda", False))
requires_cuda = pytest.mark.skipif(
    not _HAS_CUDA, reason="needs a CUDA device and a build with the CUDA kernels"
)

FLOOR = 5e-4  # relative floor added to the 2x-baseline bound
CHUNK = 64


def poison():
    """Fill the caching allocator's free blocks with NaN (next allocations reuse them)."""
    blocks = [torch.full((1 << 22,), float("nan"), device="cuda") for _ in range(16)]
    del blocks


def rel_err(x: torch.Tensor, r: torch.Tensor) -> float:
    x, r = x.double(), r.double()
    assert not torch.isnan(x).any(), "NaN in kernel output"
    return ((x - r).norm() / r.norm().clamp_min(1e-30)).item()


def check(x, r64, baseline, name):
    e, eb = rel_err(x, r64), rel_err(baseline, r64)
    assert e <= 2.0 * eb + FLOOR, f"{name}: kernel rel err {e:.3e} > 2 x plain {eb:.3e} + {FLOOR}"


def make_inputs(B, T, Hq, Hkv, D, dtype, h0_batch, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, Hq, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, T, Hkv, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, T, Hkv, D, device="cuda", generator=g).to(dtype)
    h0 = None
    if h0_batch is not None:
        h0 = 0.1 * torch.randn(h0_batch, Hq, 2 * D, D, device="cuda", generator=g)
    return q, k, v, h0


def plain_rla(q, k, v, w, fm, h0):
    """The RLA in plain PyTorch, every tensor in q's dtype (the accuracy baseline)."""
    dt = q.dtype
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    if fm == "softmax":
        phi = lambda x: torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1)  # noqa: E731
    else:
        phi = lambda x: torch.cat([torch.relu(x), torch.relu(-x)], -1)  # noqa: E731
    pq = phi(q).transpose(1, 2)  # [B, Hq, T, 2D]
    pk = phi(k).repeat_interleave(G, 2).transpose(1, 2)
    vv = v.repeat_interleave(G, 2).transpose(1, 2)
    t = torch.arange(T, device=q.device)
    mask = (t[:, None] - t[None, :]) >= w + 1
    a = (pq @ pk.transpose(-1, -2)) * mask.to(dt)
    o = a @ vv
    if h0 is not None:
        o = o + pq @ h0.to(dt)
    n = max(0, T - w - 1)
    pk1 = phi(k).transpose(1, 2)[:, :, :n]  # [B, Hkv, n, 2D]
    st = pk1.transpose(-1, -2) @ v.transpose(1, 2)[:, :, :n]
    return o.transpose(1, 2), st


GRID = [
    # B, T, Hq, Hkv, D, window
    (2, 97, 2, 2, 64, 5),
    (1, 1, 8, 1, 128, 0),
    (1, 1025, 8, 1, 128, 100),
    (2, 130, 4, 4, 128, 0),
    (1, 97, 8, 1, 64, 200),  # w >= T: RLA gives H0 only
]


@requires_cuda
@pytest.mark.parametrize("B,T,Hq,Hkv,D,w", GRID)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fm", ["softmax", "relu"])
@pytest.mark.parametrize("h0_mode", [None, "batch", "broadcast"])
def test_rla_fwd_bwd(B, T, Hq, Hkv, D, w, dtype, fm, h0_mode):
    if dtype == torch.float16 and (fm == "relu" or h0_mode == "broadcast"):
        pytest.skip("grid trimmed: fp16 runs the softmax map with no or per-batch H0")
    h0_batch = {None: None, "batch": B, "broadcast": 1}[h0_mode]
    q, k, v, h0 = make_inputs(B, T, Hq, Hkv, D, dtype, h0_batch, seed=T + D)
    every = 2
    poison()
    out, fin, ckpt = ops.rla_fwd(q, k, v, w, fm, h0, CHUNK, every)
    torch.cuda.synchronize()

    # float64 reference (autograd for the gradients) and the plain low-precision baseline
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    h064 = h0.double().requires_grad_() if h0 is not None else None
    o64, s64 = ref._rla(q64, k64, v64, w, fm, h064)
    qb, kb, vb = (x.detach().clone().requires_grad_() for x in (q, k, v))
    hb = h0.detach().clone().requires_grad_() if h0 is not None else None
    ob, sb = plain_rla(qb, kb, vb, w, fm, hb)

    check(out, o64, ob, "out")
    if T - w - 1 > 0:
        check(fin, s64, sb, "final_state")
    else:
        assert torch.count_nonzero(fin) == 0
    assert not torch.isnan(ckpt).any()

    g = torch.Generator(device="cuda").manual_seed(7)
    go = torch.randn(B, T, Hq, D, device="cuda", generator=g)
    gfs = 0.1 * torch.randn(B, Hkv, 2 * D, D, device="cuda", generator=g)
    poison()
    dq, dk, dv, dh0, _ = ops.rla_bwd(go, gfs, q, k, v, h0, ckpt, w, fm, CHUNK, every)
    torch.cuda.synchronize()
    leaves64 = [q64, k64, v64] + ([h064] if h0 is not None else [])
    grads64 = torch.autograd.grad((o64 * go.double()).sum() + (s64 * gfs.double()).sum(), leaves64,
                                  allow_unused=True)
    leavesb = [qb, kb, vb] + ([hb] if h0 is not None else [])
    gradsb = torch.autograd.grad((ob * go.to(dtype)).sum() + (sb * gfs.to(dtype)).sum(), leavesb,
                                 allow_unused=True)
    names = ["dq", "dk", "dv", "dh0"]
    mine = [dq, dk, dv] + ([dh0] if h0 is not None else [])
    for name, x, r64, rb in zip(names, mine, grads64, gradsb):
        if r64 is None or r64.norm() == 0:
            assert torch.count_nonzero(x) == 0, name
            continue
        assert x.dtype == (torch.float32 if name == "dh0" else dtype), name
        check(x, r64, rb, name)
    if h0 is not None:
        assert dh0.shape == h0.shape


@requires_cuda
@pytest.mark.parametrize("every", [1, 3, 100])
def test_rla_checkpoint_every_does_not_change_results(every):
    q, k, v, h0 = make_inputs(1, 300, 4, 2, 64, torch.bfloat16, 1, seed=3)
    o1, f1, c1 = ops.rla_fwd(q, k, v, 7, "softmax", h0, CHUNK, 1)
    o2, f2, c2 = ops.rla_fwd(q, k, v, 7, "softmax", h0, CHUNK, every)
    # segment sums + prefix: the same state up to fp32 summation order
    assert rel_err(o2, o1) < 1e-5 and rel_err(f2, f1) < 1e-5
    assert rel_err(c2, c1[:, :, ::every]) < 1e-5
    go = torch.randn_like(o1)
    g1 = ops.rla_bwd(go, None, q, k, v, h0, c1, 7, "softmax", CHUNK, 1)
    g2 = ops.rla_bwd(go, None, q, k, v, h0, c2, 7, "softmax", CHUNK, every)
    for a, b in zip(g1, g2):
        # dq restarts from a checkpoint instead of the running state: same state bits in
        # exact arithmetic; allow rounding of the input-dtype gradient
        if a.numel():
            assert rel_err(a, b) < (1e-5 if a.dtype == torch.float32 else 1e-2)


@requires_cuda
def test_rla_non_default_stream_and_determinism():
    q, k, v, h0 = make_inputs(2, 257, 8, 1, 128, torch.bfloat16, 2, seed=11)
    o_ref, f_ref, c_ref = ops.rla_fwd(q, k, v, 16, "softmax", h0, CHUNK, 4)
    go = torch.randn_like(o_ref)
    g_ref = ops.rla_bwd(go, None, q, k, v, h0, c_ref, 16, "softmax", CHUNK, 4)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        poison()
        o, f, c = ops.rla_fwd(q, k, v, 16, "softmax", h0, CHUNK, 4)
        g = ops.rla_bwd(go, None, q, k, v, h0, c, 16, "softmax", CHUNK, 4)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(o, o_ref) and torch.equal(f, f_ref) and torch.equal(c, c_ref)
    for a, b in zip(g, g_ref):
        assert torch.equal(a, b)


@requires_cuda
def test_rla_strided_inputs():
    q, k, v, _ = make_inputs(1, 150, 4, 2, 64, torch.bfloat16, None, seed=5)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, H, D] with head-major storage
    o1, _, _ = ops.rla_fwd(q, k, v, 3, "relu", None, CHUNK, 4)
    o2, _, _ = ops.rla_fwd(qt, k, v, 3, "relu", None, CHUNK, 4)
    assert torch.equal(o1, o2)


@requires_cuda
def test_rla_bad_chunk_size():
    q, k, v, _ = make_inputs(1, 8, 2, 2, 64, torch.bfloat16, None)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.rla_fwd(q, k, v, 1, "softmax", None, 32, 4)


@requires_cuda
def test_rla_bad_dtype_and_head_dim():
    q, k, v, _ = make_inputs(1, 8, 2, 2, 64, torch.float32, None)
    with pytest.raises(RuntimeError, match="bfloat16 and float16"):
        ops.rla_fwd(q, k, v, 1, "softmax", None, CHUNK, 4)
    q, k, v, _ = make_inputs(1, 8, 2, 2, 32, torch.bfloat16, None)
    with pytest.raises(ValueError, match="head dim 64 and 128"):
        ops.rla_fwd(q, k, v, 1, "softmax", None, CHUNK, 4)


@requires_cuda
# ---- mixing -------------------------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 97, 8, 64), (1, 5, 3, 128)])
def test_mix_fwd_bwd(out_dtype, shape):
    B, T, H, D = shape
    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(shape, device="cuda", generator=g)
    b = torch.randn(shape, device="cuda", generator=g)
    b[:, :3] = 0.0  # an all-zero RLA row mixes in as zero, never NaN
    wa = torch.randn(H, D, device="cuda", generator=g)
    wb = torch.randn(H, D, device="cuda", generator=g)
    poison()
    out = ops.mix_fwd(a, b, wa, wb, 1e-8, out_dtype)
    torch.cuda.synchronize()
    a64, b64, wa64, wb64 = (x.double().requires_grad_() for x in (a, b, wa, wb))
    r64 = ref.rms_mix(a64, b64, wa64, wb64, 1e-8)
    base = ref.rms_mix(a, b, wa, wb, 1e-8).to(out_dtype)  # float32 math, rounded like ours
    assert out.dtype == out_dtype
    if out_dtype == torch.float32:
        assert rel_err(out, r64) < 1e-5
    else:
        check(out, r64, base, "mix out")

    go = torch.randn(shape, device="cuda", generator=g).to(out_dtype)
    poison()
    ga, gb, gwa, gwb = ops.mix_bwd(go, a, b, wa, wb, 1e-8)
    torch.cuda.synchronize()
    r = torch.autograd.grad((r64 * go.double()).sum(), [a64, b64, wa64, wb64])
    for name, x, rr in zip(["d_swa", "d_rla", "d_gswa", "d_grla"], [ga, gb, gwa, gwb], r):
        assert rel_err(x, rr) < 1e-5, name
    # deterministic weight gradient
    again = ops.mix_bwd(go, a, b, wa, wb, 1e-8)
    assert torch.equal(again[2], gwa) and torch.equal(again[3], gwb)


@requires_cuda
def test_mix_non_default_stream():
    a = torch.randn(2, 33, 4, 64, device="cuda")
    b = torch.randn(2, 33, 4, 64, device="cuda")
    w = torch.ones(4, 64, device="cuda")
    expected = ops.mix_fwd(a, b, w, w, 1e-8, torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = ops.mix_fwd(a, b, w, w, 1e-8, torch.bfloat16)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(got, expected)


# ---- the kernels' chunk algorithm, emulated in float64 (runs without a GPU) -----------------
# A line-by-line mirror of the CUDA RLA kernels' tiling: chunks of 64, value slices of 64,
# shifted key rows by index arithmetic, the three forward passes (segment sums, prefix,
# outputs from checkpoints), the dq pass from checkpoints, the reverse dk/dv/dH0 pass with the
# dphi(k) workspace slots, and the feature-map backward. It catches algorithm and index errors
# in the design; it does not exercise the CuTe code (the GPU tests above do).
_EC, _EBV = 64, 64


def _rows(X, base, valid, n):
    out = torch.zeros(n, X.shape[-1], dtype=X.dtype)
    for j in range(n):
        if valid(j):
            out[j] = X[base + j]
    return out


def _keys(c, T, w):
    t0 = c * _EC
    t1 = min(T, t0 + _EC)
    return max(0, t0 - w - 1), max(0, t1 - w - 1)


def _emu_fwd(q, k, v, w, fm, h0, every):
    B, T, Hq, D = q.shape
    Hkv, F = k.shape[2], 2 * q.shape[3]
    G = Hq // Hkv
    nch = -(-T // _EC)
    nck = -(-nch // every)
    nan = float("nan")
    out = torch.full((B, T, Hq, D), nan, dtype=q.dtype)
    fin = torch.full((B, Hkv, F, D), nan, dtype=q.dtype)
    ck = torch.full((B, Hkv, nck, F, D), nan, dtype=q.dtype)
    tril = torch.tril(torch.ones(_EC, _EC, dtype=q.dtype))
    pk_all, pq_all = ref.feature_map(k, fm), ref.feature_map(q, fm)
    for b in range(B):
        for hk in range(Hkv):
            for vb in range(D // _EBV):
                cols = slice(vb * _EBV, (vb + 1) * _EBV)
                for z in range(nck):  # pass 1: local segment sums
                    S = torch.zeros(F, _EBV, dtype=q.dtype)
                    if z == 0:
                        ck[b, hk, 0, :, cols] = 0
                    for c in range(z * every, min(nch, (z + 1) * every)):
                        kb, ke = _keys(c, T, w)
                        sb = c * _EC - w - 1
                        kv = lambda j: kb <= sb + j < ke  # noqa: E731
                        S = S + _rows(pk_all[b, :, hk], sb, kv, _EC).T @ _rows(v[b, :, hk, cols], sb, kv, _EC)
                    if z + 1 < nck:
                        ck[b, hk, z + 1, :, cols] = S
                    else:
                        fin[b, hk, :, cols] = S
    run = torch.zeros(B, Hkv, F, D, dtype=q.dtype)  # pass 2: prefix
    for z in range(1, nck):
        run = run + ck[:, :, z]
        ck[:, :, z] = run
    fin = fin + run
    for b in range(B):  # pass 3: outputs from the checkpoints
        for hk in range(Hkv):
            for vb in range(D // _EBV):
                cols = slice(vb * _EBV, (vb + 1) * _EBV)
                for z in range(nck):
                    S = ck[b, hk, z, :, cols].clone()
                    for c in range(z * every, min(nch, (z + 1) * every)):
                        t0 = c * _EC
                        rows = min(_EC, T - t0)
                        kb, ke = _keys(c, T, w)
                        sb = t0 - w - 1
                        kv = lambda j: kb <= sb + j < ke  # noqa: E731
                        pK = _rows(pk_all[b, :, hk], sb, kv, _EC)
                        V = _rows(v[b, :, hk, cols], sb, kv, _EC)
                        for g in range(G):
                            h = hk * G + g
                            pQ = _rows(pq_all[b, :, h], t0, lambda i: i < rows, _EC)
                            X = S + (h0[b if h0.shape[0] > 1 else 0, h, :, cols] if h0 is not None else 0)
                            out[b, t0:t0 + rows, h, cols] = ((pQ @ pK.T) * tril @ V + pQ @ X)[:rows]
                        S = S + pK.T @ V
    return out, fin, ck


def _emu_phi_bwd(x, dy, fm):
    D = x.shape[-1]
    if fm == "relu":
        return dy[..., :D] * (x > 0) - dy[..., D:] * (x < 0)
    y = ref.feature_map(x, fm)
    y1, y2, d1, d2 = y[..., :D], y[..., D:], dy[..., :D], dy[..., D:]
    return y1 * (d1 - (d1 * y1).sum(-1, keepdim=True)) - y2 * (d2 - (d2 * y2).sum(-1, keepdim=True))


def _emu_bwd(go, gfs, q, k, v, w, fm, h0, ck, every):
    B, T, Hq, D = q.shape
    Hkv, F = k.shape[2], 2 * D
    G = Hq // Hkv
    nch = -(-T // _EC)
    nck = -(-nch // every)
    wsQ = torch.zeros(B, T, Hq, F, dtype=q.dtype)
    slots = 1 if G == 1 else D // _EBV  # rla_dk_slots: per value slice when G > 1
    wsK = torch.zeros(slots, B, T, Hkv, F, dtype=q.dtype)
    dv = torch.zeros_like(v)
    dh0 = torch.zeros(B, Hq, F, D, dtype=q.dtype) if h0 is not None else None
    tril = torch.tril(torch.ones(_EC, _EC, dtype=q.dtype))
    pk_all, pq_all = ref.feature_map(k, fm), ref.feature_map(q, fm)
    for b in range(B):
        for hk in range(Hkv):
            for vb in range(D // _EBV):
                cols = slice(vb * _EBV, (vb + 1) * _EBV)
                for z in range(nck):  # rla_bwd_dq_kernel
                    S = ck[b, hk, z, :, cols].clone()
                    for c in range(z * every, min(nch, (z + 1) * every)):
                        t0 = c * _EC
                        rows = min(_EC, T - t0)
                        kb, ke = _keys(c, T, w)
                        sb = t0 - w - 1
                        kv = lambda j: kb <= sb + j < ke  # noqa: E731
                        pK = _rows(pk_all[b, :, hk], sb, kv, _EC)
                        V = _rows(v[b, :, hk, cols], sb, kv, _EC)
                        for g in range(G):
                            h = hk * G + g
                            dO = _rows(go[b, :, h, cols], t0, lambda i: i < rows, _EC)
                            X = S + (h0[b if h0.shape[0] > 1 else 0, h, :, cols] if h0 is not None else 0)
                            wsQ[b, t0:t0 + rows, h] += (((dO @ V.T) * tril) @ pK + dO @ X.T)[:rows]
                        S = S + pK.T @ V
                dS = gfs[b, hk, :, cols].clone()  # rla_bwd_dkv_kernel
                for c in reversed(range(nch)):
                    t0 = c * _EC
                    rows = min(_EC, T - t0)
                    kb, ke = _keys(c, T, w)
                    sb = t0 - w - 1
                    kv = lambda j: kb <= sb + j < ke  # noqa: E731
                    pK = _rows(pk_all[b, :, hk], sb, kv, _EC)
                    V = _rows(v[b, :, hk, cols], sb, kv, _EC)
                    acc_dv = pK @ dS
                    for g in range(G):
                        h = hk * G + g
                        pQ = _rows(pq_all[b, :, h], t0, lambda i: i < rows, _EC)
                        dO = _rows(go[b, :, h, cols], t0, lambda i: i < rows, _EC)
                        dpk = ((dO @ V.T) * tril).T @ pQ + (V @ dS.T if g == 0 else 0)
                        for j in range(_EC):
                            if kv(j):
                                wsK[vb if G > 1 else 0, b, sb + j, hk] += dpk[j]
                        acc_dv = acc_dv + ((pQ @ pK.T) * tril).T @ dO
                        u = pQ.T @ dO
                        dS = dS + u
                        if dh0 is not None:
                            dh0[b, h, :, cols] += u
                    for j in range(_EC):
                        if kv(j):
                            dv[b, sb + j, hk, cols] = acc_dv[j]
    dq = _emu_phi_bwd(q, wsQ, fm)
    dk = _emu_phi_bwd(k, wsK.sum(0), fm)
    if dh0 is not None and h0.shape[0] == 1:
        dh0 = dh0.sum(0, keepdim=True)
    return dq, dk, dv, dh0


@pytest.mark.parametrize(
    "B,T,Hq,Hkv,D,w,fm,h0b,every",
    [
        (1, 150, 2, 1, 128, 5, "softmax", 1, 2),
        (2, 97, 2, 2, 64, 0, "relu", 2, 1),
        (1, 70, 4, 2, 64, 100, "softmax", 1, 3),  # w >= T
        (1, 1, 2, 1, 64, 0, "softmax", None, 2),
        (1, 200, 4, 1, 64, 63, "softmax", None, 100),
        (1, 100, 2, 2, 128, 3, "relu", None, 2),  # G == 1, two value slices share a dk slot
    ],
)
def test_cuda_rla_algorithm_emulated(B, T, Hq, Hkv, D, w, fm, h0b, every):
    g = torch.Generator().manual_seed(T + D)
    q = torch.randn(B, T, Hq, D, dtype=torch.float64, generator=g)
    k = torch.randn(B, T, Hkv, D, dtype=torch.float64, generator=g)
    v = torch.randn(B, T, Hkv, D, dtype=torch.float64, generator=g)
    h0 = 0.1 * torch.randn(h0b, Hq, 2 * D, D, dtype=torch.float64, generator=g) if h0b else None
    out, fin, ck = _emu_fwd(q, k, v, w, fm, h0, every)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    hl = h0.clone().requires_grad_() if h0 is not None else None
    o64, s64 = ref._rla(*leaves, w, fm, hl)
    go = torch.randn(o64.shape, dtype=torch.float64, generator=g)
    gfs = torch.randn(s64.shape, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad((o64 * go).sum() + (s64 * gfs).sum(),
                                leaves + ([hl] if hl is not None else []), allow_unused=True)
    mine = _emu_bwd(go, gfs, q, k, v, w, fm, h0, ck, every)
    pairs = [(out, o64), (fin, s64)] + [(m, r if r is not None else torch.zeros_like(m))
                                        for m, r in zip(mine, grads)]
    for x, r in pairs:
        assert not torch.isnan(x).any()
        torch.testing.assert_close(x, r.detach(), rtol=1e-10, atol=1e-12)
