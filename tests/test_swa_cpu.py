"""CPU sliding-window attention kernels (torch.ops.rattention_ext.swa_fwd / swa_bwd and the
public rattention_ext.sliding_window_attention) against the float64 reference
(rattention_ext.reference.sliding_window_attention): values, lse and gradients (incl. a
grad_lse), float64 / float32 / bfloat16, ragged T, window edge cases, GQA, rotary, strided
inputs; opcheck; determinism across thread counts; bad-input messages."""
import math

import pytest
import torch
from conftest import make_qkv, rel_err, rotary_tables

import rattention_ext
from rattention_ext import reference as ref

ops = torch.ops.rattention_ext


def _run_public(q, k, v, w, rot, grad_lse=True, seed=0):
    """Kernel and float64-reference values, lse, and grads of <o, go> + <lse, gl>."""
    D = q.shape[-1]
    T = q.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    cos, sin = rotary_tables(T + 5, D, acc) if rot else (None, None)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    o, lse = rattention_ext.sliding_window_attention(*leaves, window_size=w, return_lse=True,
                                                     rotary_cos=cos, rotary_sin=sin)
    g = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(o.shape, generator=g, dtype=torch.float64)
    gl = torch.randn(lse.shape, generator=g, dtype=torch.float64) if grad_lse else None
    loss = (o.double() * go).sum() + ((lse.double() * gl).sum() if grad_lse else 0)
    grads = torch.autograd.grad(loss, leaves)

    rleaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ro, rlse = ref.sliding_window_attention(
        *rleaves, window_size=w, return_lse=True,
        rotary_cos=None if cos is None else cos.double(),
        rotary_sin=None if sin is None else sin.double())
    rloss = (ro * go).sum() + ((rlse * gl).sum() if grad_lse else 0)
    rgrads = torch.autograd.grad(rloss, rleaves)
    return (o, lse, *grads), (ro, rlse, *rgrads)


# A sample of the grid T x window x (Hq, Hkv) x D x rotary x layout (not the full product:
# the suite has to stay fast on a loaded 2-core box).
# B, T, Hq, Hkv, D, w, rotary, layout
GRID = [
    (1, 1, 1, 1, 32, 0, False, "contiguous"),
    (2, 1, 8, 1, 64, 5, True, "perm"),
    (1, 97, 8, 1, 32, 0, True, "contiguous"),
    (2, 97, 2, 2, 64, 5, False, "perm"),
    (1, 97, 8, 1, 128, 97, True, "strided"),
    (1, 97, 2, 2, 32, 300, False, "contiguous"),
    (1, 1025, 2, 2, 32, 0, True, "perm"),
    (1, 1025, 8, 1, 32, 5, False, "contiguous"),
    (1, 1025, 2, 2, 64, 1025, True, "contiguous"),
    (1, 1025, 8, 1, 32, 200, True, "strided"),
    # enough (b, kv head, key chunk) tasks for the single-pass backward (chunked dQ buffers),
    # with the window reaching across chunk boundaries
    (2, 1025, 4, 2, 32, 300, True, "perm"),
]


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(map(str, c)))
def test_float64_matches_reference(case):
    B, T, Hq, Hkv, D, w, rot, layout = case
    q, k, v = make_qkv(B, T, Hq, Hkv, D, torch.float64, seed=T * 7 + w, layout=layout)
    got, want = _run_public(q, k, v, w, rot, grad_lse=(T % 2 == 1), seed=T)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float64, name
        assert rel_err(a, b) < 1e-10, (name, rel_err(a, b))


@pytest.mark.parametrize("case", GRID[1::2] + [(2, 200, 4, 2, 128, 70, True, "perm"),
                                              (1, 70, 16, 1, 32, 10, False, "contiguous"),
                                              (2, 1025, 2, 2, 64, 100, False, "contiguous")],
                         ids=lambda c: "-".join(map(str, c)))
def test_float32_matches_reference(case):
    B, T, Hq, Hkv, D, w, rot, layout = case
    q, k, v = make_qkv(B, T, Hq, Hkv, D, torch.float32, seed=T * 5 + w + 1, layout=layout)
    got, want = _run_public(q, k, v, w, rot, grad_lse=True, seed=T + 3)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32, name
        assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))


def _torch_bf16_swa(q, k, v, w, cos, sin):
    """The same computation in plain PyTorch bfloat16 ops (band mask over the full T x T)."""
    if cos is not None:
        q = ref.apply_rotary(q, cos.to(q.dtype), sin.to(q.dtype))
        k = ref.apply_rotary(k, cos.to(q.dtype), sin.to(q.dtype))
    G = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    T = q.shape[1]
    t = torch.arange(T)
    visible = (t[:, None] - t[None, :] >= 0) & (t[:, None] - t[None, :] <= w)
    s = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    return (p @ v.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("case", [(1, 97, 8, 1, 64, 5, True), (2, 130, 2, 2, 32, 200, False),
                                  (1, 200, 4, 2, 128, 64, True)],
                         ids=lambda c: "-".join(map(str, c)))
def test_bfloat16_error_within_twice_torch_bf16(case):
    B, T, Hq, Hkv, D, w, rot = case
    q, k, v = make_qkv(B, T, Hq, Hkv, D, torch.bfloat16, seed=T + w)
    cos, sin = rotary_tables(T, D, torch.float32) if rot else (None, None)
    g = torch.Generator().manual_seed(T)
    go = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64)

    def grads_of(fn, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        o = fn(*leaves)
        return (o, *torch.autograd.grad((o.double() * go).sum(), leaves))

    got = grads_of(lambda a, b, c: rattention_ext.sliding_window_attention(
        a, b, c, window_size=w, rotary_cos=cos, rotary_sin=sin), torch.bfloat16)
    plain = grads_of(lambda a, b, c: _torch_bf16_swa(a, b, c, w, cos, sin), torch.bfloat16)
    want = grads_of(lambda a, b, c: ref.sliding_window_attention(
        a, b, c, window_size=w, rotary_cos=None if cos is None else cos.double(),
        rotary_sin=None if sin is None else sin.double()), torch.float64)
    for name, a, p, r in zip(("out", "dq", "dk", "dv"), got, plain, want):
        assert a.dtype == torch.bfloat16, name
        err, base = rel_err(a, r), rel_err(p, r)
        assert err <= 2 * base + 2e-3, (name, err, base)


def test_ops_direct_with_grad_lse_float64():
    """swa_fwd / swa_bwd called directly (non-default scale, grad_lse given and absent)."""
    B, T, Hq, Hkv, D, w = 2, 150, 4, 2, 64, 40
    q, k, v = make_qkv(B, T, Hq, Hkv, D, torch.float64, seed=11, layout="perm")
    cos, sin = rotary_tables(T, D)
    scale = 0.3
    out, lse = ops.swa_fwd(q, k, v, w, scale, cos, sin)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    ro, rlse = ref.sliding_window_attention(*leaves, window_size=w, softmax_scale=scale,
                                            return_lse=True, rotary_cos=cos, rotary_sin=sin)
    assert rel_err(out, ro) < 1e-10 and rel_err(lse, rlse) < 1e-10
    g = torch.Generator().manual_seed(3)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    gl = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    for grad_lse in (gl, None):
        dq, dk, dv = ops.swa_bwd(go, grad_lse, q, k, v, out, lse, w, scale, cos, sin, False)
        loss = (ro * go).sum() + ((rlse * grad_lse).sum() if grad_lse is not None else 0)
        rq, rk, rv = torch.autograd.grad(loss, leaves, retain_graph=True)
        for a, b in ((dq, rq), (dk, rk), (dv, rv)):
            assert a.is_contiguous() and rel_err(a, b) < 1e-10


@pytest.mark.parametrize("shape", [(1, 300, 4, 1, 70), (2, 600, 4, 2, 70)],
                         ids=["two-pass-bwd", "single-pass-bwd"])
def test_deterministic_across_thread_counts(shape):
    B, T, Hq, Hkv, w = shape
    q, k, v = make_qkv(B, T, Hq, Hkv, 32, torch.float32, seed=5)
    go = torch.randn(B, T, Hq, 32)
    n = torch.get_num_threads()
    res = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            out, lse = ops.swa_fwd(q, k, v, w, 0.2, None, None)
            res.append((out, lse, *ops.swa_bwd(go, lse, q, k, v, out, lse, w, 0.2, None, None,
                                               True)))
    finally:
        torch.set_num_threads(n)
    for other in res[1:]:
        for a, b in zip(res[0], other):
            assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rot", [False, True])
def test_opcheck(dtype, rot):
    q, k, v = make_qkv(1, 19, 4, 2, 16, dtype, seed=2)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cos, sin = rotary_tables(19, 16, acc) if rot else (None, None)
    torch.library.opcheck(ops.swa_fwd, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                                        3, 0.25, cos, sin))
    out, lse = ops.swa_fwd(q, k, v, 3, 0.25, cos, sin)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(ops.swa_bwd, (go, gl, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), 3,
                                        0.25, cos, sin, False))


def test_bad_inputs_name_the_argument():
    q, k, v = make_qkv(1, 8, 4, 2, 16, torch.float32, seed=1)
    swa = rattention_ext.sliding_window_attention
    with pytest.raises(ValueError, match=r"q must be 4-D"):
        swa(q[0], k, v, window_size=2)
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k/v heads \(3\)"):
        k3 = torch.randn(1, 8, 3, 16)
        swa(q, k3, k3, window_size=2)
    with pytest.raises(ValueError, match=r"window_size must be an int in \[0, "):
        swa(q, k, v, window_size=-1)
    cos, sin = rotary_tables(5, 16, torch.float32)
    with pytest.raises(ValueError, match=r"rotary_cos has 5 positions but 8"):
        swa(q, k, v, window_size=2, rotary_cos=cos, rotary_sin=sin)
    with pytest.raises(ValueError, match=r"rotary_cos and rotary_sin must be given together"):
        swa(q, k, v, window_size=2, rotary_cos=cos)
    with pytest.raises(RuntimeError, match=r"k must have the dtype of q"):
        swa(q, k.double(), v, window_size=2)
    out, lse = ops.swa_fwd(q, k, v, 2, 0.25, None, None)
    with pytest.raises(RuntimeError, match=r"lse must have shape"):
        ops.swa_bwd(out, None, q, k, v, out, lse[:, :, :4], 2, 0.25, None, None, False)
    with pytest.raises(RuntimeError, match=r"grad_out must have dtype"):
        ops.swa_bwd(out.double(), None, q, k, v, out, lse, 2, 0.25, None, None, False)


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_narrower_cpu_paths_match_reference(isa):
    """The float paths for CPUs without AVX-512 (the AVX2 + FMA micro-kernels, and the
    portable code), forced with RATTENTION_CPU_ISA in a fresh process (the ISA choice is
    made once per process): SWA + RLA + mixing, values and gradients, ragged sizes so the
    GEMM and softmax tails run. (On a CPU without AVX2 the "avx2" run takes the portable
    path, which is then what it checks.)"""
    import os
    import subprocess
    import sys

    code = (
        "import torch, rattention_ext as R\n"
        "from rattention_ext import reference as ref\n"
        "from conftest import make_qkv, rel_err\n"
        "errs = []\n"
        "for T, D, w in [(77, 32, 20), (45, 8, 3), (130, 64, 17)]:\n"
        "    q, k, v = make_qkv(1, T, 4, 2, D, torch.float32, seed=T)\n"
        "    ls = [x.requires_grad_() for x in (q, k, v)]\n"
        "    o = R.forward(*ls, window_size=w)\n"
        "    g = torch.autograd.grad(o.square().sum(), ls)\n"
        "    rl = [x.detach().double().requires_grad_() for x in (q, k, v)]\n"
        "    ro = ref.forward(*rl, window_size=w)\n"
        "    rg = torch.autograd.grad(ro.square().sum(), rl)\n"
        "    errs += [rel_err(a, b) for a, b in zip((o,) + g, (ro,) + rg)]\n"
        "print(max(errs))\n")
    env = dict(os.environ, RATTENTION_CPU_ISA=isa)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(rattention_ext.__path__[0]),
                                         os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-5


@pytest.mark.parametrize("B,T", [(1, 0), (0, 5)])
def test_empty_inputs(B, T):
    q, k, v = (torch.randn(B, T, H, 16, requires_grad=True) for H in (4, 2, 2))
    o, lse = rattention_ext.sliding_window_attention(q, k, v, window_size=3, return_lse=True)
    assert o.shape == q.shape and lse.shape == (B, 4, T)
    grads = torch.autograd.grad(o.sum(), (q, k, v))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
