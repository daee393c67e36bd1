"""CUDA SWA forward vs the float64 reference (SPEC.md accuracy rule). Skipped without CUDA.

Rule: error of the kernel <= 2 x error of the same computation in plain PyTorch in that dtype
+ a small floor; NaN never passes. Outputs are poisoned with NaN before each run (the caching
allocator hands the poisoned blocks back), inputs are fresh random draws.
"""
import math

import pytest
import torch

import rattention_ext  # noqa: F401  (registers torch.ops.rattention_ext)
from rattention_ext import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FLOOR = 1e-3


def rope_tables(P, D, device):
    inv = 1.0 / (10000 ** (torch.arange(0, D // 2, dtype=torch.float64) * 2 / D))
    ang = torch.arange(P, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float().to(device), ang.sin().float().to(device)


def poison_allocator(nbytes=256 << 20):
    """Fill soon-to-be-reused cached blocks with NaN so unwritten outputs show up."""
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in (nbytes // 4, 1 << 20, 1 << 14)]
    del blocks


def plain_swa(q, k, v, w, scale, cos=None, sin=None):
    """The same computation with plain PyTorch ops in q's dtype (the accuracy baseline)."""
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    if cos is not None:
        def rope(x):
            c, s = cos[:T, None, :].to(x.dtype), sin[:T, None, :].to(x.dtype)
            x1, x2 = x[..., : D // 2], x[..., D // 2:]
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
        q, k = rope(q), rope(k)
    k, v = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    t = torch.arange(T, device=q.device)
    vis = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] <= w)
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhts,bshd->bthd", p, v)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run_case(B, T, Hq, Hkv, D, w, dtype, rotary, stream=None):
    dev = "cuda"
    q = torch.randn(B, T, Hq, D, device=dev, dtype=dtype)
    k = torch.randn(B, T, Hkv, D, device=dev, dtype=dtype)
    v = torch.randn(B, T, Hkv, D, device=dev, dtype=dtype)
    cos, sin = rope_tables(T + 3, D, dev) if rotary else (None, None)
    scale = 1.0 / math.sqrt(D)
    poison_allocator()
    if stream is None:
        out, lse = torch.ops.rattention_ext.swa_fwd(q, k, v, w, scale, cos, sin)
    else:
        with torch.cuda.stream(stream):
            out, lse = torch.ops.rattention_ext.swa_fwd(q, k, v, w, scale, cos, sin)
        stream.synchronize()
    torch.cuda.synchronize()
    o64, lse64 = ref.sliding_window_attention(
        q.double(), k.double(), v.double(), window_size=w, softmax_scale=scale, return_lse=True,
        rotary_cos=None if cos is None else cos.double(),
        rotary_sin=None if sin is None else sin.double())
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), "NaN/inf in output"
    plain = plain_swa(q, k, v, w, scale, cos, sin)
    err, err_plain = rel(out, o64), rel(plain, o64)
    assert err <= 2 * err_plain + FLOOR, (err, err_plain)
    lse_err = (lse.double() - lse64).abs().max().item()
    assert lse_err <= 1e-2, lse_err
    return err, err_plain


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T,w", [(1, 0), (97, 0), (97, 1), (97, 63), (1025, 64), (1025, 65),
                                 (4099, 511), (97, 200)])
def test_swa_fwd_grid(dtype, D, T, w):
    run_case(1, T, 4, 4, D, w, dtype, rotary=False)


@pytest.mark.parametrize("D", [64, 128])
def test_swa_fwd_gqa8_rotary_batch(D):
    run_case(2, 1025, 16, 2, D, 127, torch.bfloat16, rotary=True)


def test_swa_fwd_non_default_stream():
    run_case(1, 513, 8, 1, 128, 100, torch.bfloat16, rotary=True, stream=torch.cuda.Stream())


def test_swa_fwd_non_contiguous_and_misaligned():
    dev = "cuda"
    base = torch.randn(1, 200, 4, 65, device=dev, dtype=torch.bfloat16)
    q = base[..., 1:]  # row starts not 16-byte aligned: the op copies once
    k = torch.randn(1, 200, 2, 64, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, 200, 2, 64, device=dev, dtype=torch.bfloat16)
    out, _ = torch.ops.rattention_ext.swa_fwd(q, k, v, 50, 0.125, None, None)
    o64 = ref.sliding_window_attention(q.double(), k.double(), v.double(), window_size=50,
                                       softmax_scale=0.125)
    err, err_plain = rel(out, o64), rel(plain_swa(q, k, v, 50, 0.125), o64)
    assert err <= 2 * err_plain + FLOOR


def test_swa_fwd_torch_compile():
    dev = "cuda"
    q = torch.randn(1, 300, 4, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 300, 4, 64, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, 300, 4, 64, device=dev, dtype=torch.bfloat16)

    def f(q, k, v):
        return torch.ops.rattention_ext.swa_fwd(q, k, v, 31, 0.125, None, None)[0]

    out = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, f(q, k, v), rtol=0, atol=0)
