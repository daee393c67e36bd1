"""rattention_ext.forward on CUDA end to end (RLA kernel, then the SWA kernel with the mixing
fused into its epilogue), forward and backward, against the float64 reference.

Accuracy rule (SPEC.md): bf16/fp16 error no more than 2x the error of the same computation
done in plain PyTorch in that dtype, plus a small floor; NaN never passes. The fused op is
also compared with the unfused composition (swa_fwd + mix_fwd kernels): same float32 math,
only the order of the two sums of squares differs.
Skipped without a GPU or without CUDA kernels in the build.
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers import FLOOR, plain_rla, plain_swa, rel_err, requires_cuda

import rattention_ext
from rattention_ext import reference as ref

ops = torch.ops.rattention_ext
pytestmark = requires_cuda


def make_inputs(B, T, Hq, Hkv, D, dtype, seed, rotary):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, Hq, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, T, Hkv, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, T, Hkv, D, device="cuda", generator=g).to(dtype)
    kw = {
        "initial_state": 0.1 * torch.randn(1, Hq, 2 * D, D, device="cuda", generator=g),
        "swa_norm_weight": 1 + 0.5 * torch.randn(Hq, D, device="cuda", generator=g),
        "rla_norm_weight": 1 + 0.5 * torch.randn(Hq, D, device="cuda", generator=g),
    }
    if rotary:
        inv = 1.0 / 10000.0 ** (torch.arange(0, D // 2, device="cuda").double() / (D // 2))
        ang = torch.arange(T + 5, device="cuda").double()[:, None] * inv[None, :]
        kw["rotary_cos"], kw["rotary_sin"] = ang.cos().float(), ang.sin().float()
    return q, k, v, kw


def plain(q, k, v, w, kw):
    """The same computation in plain PyTorch: both branches in q's dtype (the baselines of
    test_swa_cuda / test_rla_cuda), the mixing in float32 as SPEC.md asks."""
    dt = q.dtype
    o_swa, _ = plain_swa(q, k, v, w, 1 / math.sqrt(q.shape[-1]), kw.get("rotary_cos"),
                         kw.get("rotary_sin"))
    o_rla, _ = plain_rla(q, k, v, w, "softmax", kw["initial_state"])
    return ref.rms_mix(o_swa, o_rla, kw["swa_norm_weight"], kw["rla_norm_weight"]).to(dt)


@pytest.mark.parametrize("B,T,Hq,Hkv,D,w,rotary", [
    (2, 200, 4, 2, 64, 37, False),
    (1, 1000, 8, 1, 128, 128, True),
    (1, 77, 2, 2, 64, 0, True),
    (1, 300, 4, 4, 128, 512, False),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_backward_cuda(B, T, Hq, Hkv, D, w, rotary, dtype):
    q, k, v, kw = make_inputs(B, T, Hq, Hkv, D, dtype, seed=T + w, rotary=rotary)
    leaves = [q, k, v, kw["initial_state"], kw["swa_norm_weight"], kw["rla_norm_weight"]]
    for t in leaves:
        t.requires_grad_(True)
    out = rattention_ext.forward(q, k, v, window_size=w, **kw)
    assert out.dtype == dtype and out.shape == q.shape

    d64 = {n: t.detach().double() for n, t in kw.items()}
    l64 = [t.detach().double().requires_grad_(True) for t in leaves]
    d64.update(initial_state=l64[3], swa_norm_weight=l64[4], rla_norm_weight=l64[5])
    exact = ref.forward(l64[0], l64[1], l64[2], window_size=w, **d64)
    pl = plain(q.detach(), k.detach(), v.detach(), w, {n: t.detach() for n, t in kw.items()})
    e, eb = rel_err(out, exact), rel_err(pl, exact)
    assert e <= 2 * eb + FLOOR, f"forward rel err {e:.3e} > 2 x plain {eb:.3e} + {FLOOR}"

    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(exact, l64, g.double())
    # Gradients: the float32-accumulating kernels against float64; bf16/fp16 inputs and
    # rounding of P / phi bound the error well below this.
    for name, a, b in zip(["q", "k", "v", "h0", "g_swa", "g_rla"], got, want):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < 3e-2, f"grad {name}: {rel_err(a, b):.3e}"


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_fused_mix_matches_unfused_kernels(out_dtype, D):
    q, k, v, kw = make_inputs(2, 130, 4, 2, D, torch.bfloat16, seed=5, rotary=True)
    cos, sin = kw["rotary_cos"], kw["rotary_sin"]
    ga, gb = kw["swa_norm_weight"], kw["rla_norm_weight"]
    o_rla = ops.rla_fwd(q, k, v, 17, "softmax", kw["initial_state"], 64, 4)[0]
    o_rla[:, :3] = 0.0  # all-zero RLA rows mix in as zeros, never NaN
    o_swa, lse = ops.swa_fwd(q, k, v, 17, 0.125, cos, sin)
    expect = ops.mix_fwd(o_swa, o_rla, ga, gb, 1e-8, out_dtype)
    for save in (True, False):
        out, o_swa2, lse2 = ops.swa_mix_fwd(q, k, v, 17, 0.125, cos, sin, o_rla, ga, gb, 1e-8,
                                            out_dtype, save)
        torch.cuda.synchronize()
        assert out.dtype == out_dtype
        tol = 1e-6 if out_dtype == torch.float32 else 1e-2  # one rounding step apart at most
        assert (out.float() - expect.float()).abs().max().item() <= tol * expect.float().abs().max().item()
        if save:
            assert torch.equal(o_swa2, o_swa) and torch.equal(lse2, lse)
        else:
            assert o_swa2.numel() == 0 and lse2.numel() == 0


def test_forward_cuda_torch_compile_and_no_grad():
    q, k, v, kw = make_inputs(1, 150, 4, 2, 64, torch.bfloat16, seed=9, rotary=False)
    f = torch.compile(lambda q, k, v: rattention_ext.forward(q, k, v, window_size=20, **kw),
                      fullgraph=True)
    eager = rattention_ext.forward(q, k, v, window_size=20, **kw)
    assert torch.equal(f(q, k, v), eager)
    with torch.no_grad():
        assert torch.equal(rattention_ext.forward(q, k, v, window_size=20, **kw), eager)


# ---- packed batches (cu_seqlens) on CUDA ---------------------------------------------------
# Long-tailed document mixes with an empty document, length 1, exactly w and w + 1, and
# documents longer than a tile / chunk (64): each must come out as if it were alone
# (per-document loop of the float64 reference): the forward output, the RLA final states
# (residual_linear_attention), and every gradient of both.
@pytest.mark.parametrize("lens,Hq,Hkv,D,w,rotary,h0", [
    ([0, 1, 37, 38, 200, 513, 5], 8, 1, 128, 37, True, "batch"),
    ([300, 64, 65, 0, 1, 17, 16], 2, 2, 64, 16, False, "broadcast"),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_packed_cuda_matches_document_loop(lens, Hq, Hkv, D, w, rotary, h0, dtype):
    N, total = len(lens), sum(lens)
    q, k, v, kw = make_inputs(1, total, Hq, Hkv, D, dtype, seed=total, rotary=rotary)
    q, k, v = q[0], k[0], v[0]  # [total, H, D]
    g = torch.Generator(device="cuda").manual_seed(1)
    kw["initial_state"] = 0.1 * torch.randn(N if h0 == "batch" else 1, Hq, 2 * D, D,
                                            device="cuda", generator=g)
    cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(N)], dtype=torch.int32,
                      device="cuda")
    leaves = [t.detach().requires_grad_(True) for t in
              (q, k, v, kw["initial_state"], kw["swa_norm_weight"], kw["rla_norm_weight"])]
    kw_in = dict(kw, initial_state=leaves[3], swa_norm_weight=leaves[4],
                 rla_norm_weight=leaves[5])
    out = rattention_ext.forward(*leaves[:3], window_size=w, cu_seqlens=cu, **kw_in)
    _, states = rattention_ext.residual_linear_attention(
        *leaves[:3], window_size=w, initial_state=leaves[3], return_final_state=True,
        cu_seqlens=cu)
    assert out.shape == q.shape and out.dtype == dtype and states.shape == (N, Hkv, 2 * D, D)

    l64 = [t.detach().double().requires_grad_(True) for t in leaves]
    d64 = {n: t.detach().double() for n, t in kw.items()}
    outs, sts, plains = [], [], []
    c = cu.tolist()
    for b in range(N):
        sl = slice(c[b], c[b + 1])
        if sl.stop == sl.start:
            sts.append(torch.zeros(1, Hkv, 2 * D, D, dtype=torch.float64, device="cuda"))
            continue
        h = l64[3][b:b + 1] if h0 == "batch" else l64[3]
        d64.update(initial_state=h, swa_norm_weight=l64[4], rla_norm_weight=l64[5])
        qb, kb, vb = (x[sl][None] for x in l64[:3])
        outs.append(ref.forward(qb, kb, vb, window_size=w, **d64)[0])
        sts.append(ref.residual_linear_attention(qb, kb, vb, window_size=w, initial_state=h,
                                                 return_final_state=True)[1])
        kw_b = {n: t.detach() for n, t in kw.items()}
        if h0 == "batch":
            kw_b["initial_state"] = kw_b["initial_state"][b:b + 1]
        plains.append(plain(q[sl][None], k[sl][None], v[sl][None], w, kw_b)[0])
    exact, exact_states = torch.cat(outs, 0), torch.cat(sts, 0)
    e, eb = rel_err(out, exact), rel_err(torch.cat(plains, 0), exact)
    assert e <= 2 * eb + FLOOR, f"forward rel err {e:.3e} > 2 x plain {eb:.3e} + {FLOOR}"
    # float32 sums of bf16/fp16 phi(k) v^T products
    assert rel_err(states, exact_states) < 1e-2

    go, gs = torch.randn_like(out), torch.randn_like(states)
    got = torch.autograd.grad((out.double() * go.double()).sum()
                              + (states.double() * gs.double()).sum(), leaves)
    want = torch.autograd.grad((exact * go.double()).sum() + (exact_states * gs.double()).sum(),
                               l64)
    # as in test_forward_backward_cuda: float32-accumulating kernels against float64
    for name, a, b in zip(["q", "k", "v", "h0", "g_swa", "g_rla"], got, want):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < 3e-2, f"grad {name}: {rel_err(a, b):.3e}"
