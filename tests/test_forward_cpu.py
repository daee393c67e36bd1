"""End-to-end tests of rattention_ext.forward on CPU (SWA + RLA + mixing) against the
float64 reference: values, gradients of every differentiable input, opcheck of every op,
torch.compile(fullgraph=True), and input validation messages."""
import pytest
import torch

import rattention_ext
from conftest import rel_err, rotary_tables
from rattention_ext import reference as ref

ops = torch.ops.rattention_ext


def make_inputs(B, T, Hq, Hkv, D, dtype, seed, h0_batch=None, weights=False, rotary=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    kw = {}
    if h0_batch:
        kw["initial_state"] = (0.1 * torch.randn(h0_batch, Hq, 2 * D, D, generator=g,
                                                  dtype=torch.float64)).to(acc)
    if weights:
        kw["swa_norm_weight"] = (1 + 0.5 * torch.randn(Hq, D, generator=g, dtype=torch.float64)).to(acc)
        kw["rla_norm_weight"] = (1 + 0.5 * torch.randn(Hq, D, generator=g, dtype=torch.float64)).to(acc)
    if rotary:
        kw["rotary_cos"], kw["rotary_sin"] = rotary_tables(T + 3, D, acc)
    return q, k, v, kw


CASES = [
    # B, T, Hq, Hkv, D, w, feature_map, h0_batch, weights, rotary
    (1, 1, 2, 2, 32, 0, "softmax", None, False, False),
    (2, 97, 8, 1, 32, 5, "relu", 1, True, True),
    (1, 97, 2, 2, 64, 200, "softmax", 1, True, False),
    (2, 130, 4, 2, 32, 0, "softmax", 2, False, True),
    (1, 1025, 8, 1, 64, 64, "softmax", None, True, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_forward_and_grads_float64(case):
    B, T, Hq, Hkv, D, w, fm, h0b, weights, rotary = case
    q, k, v, kw = make_inputs(B, T, Hq, Hkv, D, torch.float64, seed=T + w, h0_batch=h0b,
                              weights=weights, rotary=rotary)
    leaves = [q, k, v] + [kw[n] for n in ("initial_state", "swa_norm_weight", "rla_norm_weight")
                          if n in kw]
    for t in leaves:
        t.requires_grad_(True)
    out = rattention_ext.forward(q, k, v, window_size=w, feature_map=fm, **kw)
    expect = ref.forward(q, k, v, window_size=w, feature_map=fm, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, expect) < 1e-10
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(expect, leaves, g)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("case", CASES[1:4], ids=lambda c: "-".join(map(str, c)))
def test_forward_float32(case):
    B, T, Hq, Hkv, D, w, fm, h0b, weights, rotary = case
    q, k, v, kw = make_inputs(B, T, Hq, Hkv, D, torch.float32, seed=7, h0_batch=h0b,
                              weights=weights, rotary=rotary)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = rattention_ext.forward(q, k, v, window_size=w, feature_map=fm, **kw)
    d = {n: t.double() for n, t in kw.items()}
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    expect = ref.forward(q64, k64, v64, window_size=w, feature_map=fm, **d)
    assert rel_err(out, expect) < 1e-5
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(expect, (q64, k64, v64), g.double())
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


def test_forward_bfloat16_within_twice_plain_pytorch():
    B, T, Hq, Hkv, D, w = 1, 300, 4, 2, 64, 37
    q, k, v, kw = make_inputs(B, T, Hq, Hkv, D, torch.bfloat16, seed=3, h0_batch=1, weights=True)
    out = rattention_ext.forward(q, k, v, window_size=w, **kw)
    assert out.dtype == torch.bfloat16
    d64 = {n: t.double() for n, t in kw.items()}
    exact = ref.forward(q.double(), k.double(), v.double(), window_size=w, **d64)
    # The same computation in plain PyTorch bf16 (branches and mixing in bf16).
    o_swa = ref.sliding_window_attention(q, k, v, window_size=w)
    o_rla = ref.residual_linear_attention(q, k, v, window_size=w, initial_state=kw["initial_state"])
    plain = ref.rms_mix(o_swa.to(torch.bfloat16), o_rla.to(torch.bfloat16),
                        kw["swa_norm_weight"].bfloat16(), kw["rla_norm_weight"].bfloat16())
    plain = plain.to(torch.bfloat16)
    assert torch.isfinite(out).all()
    assert rel_err(out, exact) <= 2 * rel_err(plain, exact) + 1e-3


def test_window_at_least_T_gives_initial_state_only():
    q, k, v, kw = make_inputs(1, 20, 2, 1, 32, torch.float64, seed=1, h0_batch=1)
    o_rla = rattention_ext.residual_linear_attention(q, k, v, window_size=20, **kw)
    phi_q = ref.feature_map(q)
    expect = torch.einsum("bthe,hed->bthd", phi_q, kw["initial_state"][0])
    assert rel_err(o_rla, expect) < 1e-12
    # No initial state: RLA is exactly zero and the mixed output is finite.
    out = rattention_ext.forward(q, k, v, window_size=20)
    assert torch.isfinite(out).all()


def test_torch_compile_fullgraph():
    q, k, v, kw = make_inputs(1, 70, 4, 2, 32, torch.float32, seed=5, h0_batch=1, weights=True,
                              rotary=True)

    def f(q, k, v):
        return rattention_ext.forward(q, k, v, window_size=9, **kw).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    qs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    qc = [t.clone().requires_grad_(True) for t in (q, k, v)]
    eager = f(*qs)
    comp = compiled(*qc)
    assert torch.allclose(eager, comp, rtol=1e-5, atol=1e-5)
    eager.backward()
    comp.backward()
    for a, b in zip(qs, qc):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def _opcheck_samples():
    q, k, v, kw = make_inputs(1, 19, 4, 2, 8, torch.float64, seed=11, h0_batch=1, weights=True,
                              rotary=True)
    for t in (q, k, v):
        t.requires_grad_(True)
    h0 = kw["initial_state"].requires_grad_(True)
    cos, sin = kw["rotary_cos"], kw["rotary_sin"]
    o, lse = ops.swa_fwd(q, k, v, 3, 0.3, cos, sin)
    orl, fs, ck = ops.rla_fwd(q, k, v, 3, "softmax", h0, 4, 2)
    go = torch.randn_like(o)
    ga, gb = kw["swa_norm_weight"], kw["rla_norm_weight"]
    return [
        (ops.swa_fwd.default, (q, k, v, 3, 0.3, cos, sin)),
        (ops.swa_bwd.default, (go, torch.randn_like(lse), q.detach(), k.detach(), v.detach(),
                               o.detach(), lse.detach(), 3, 0.3, cos, sin, False)),
        (ops.rla_fwd.default, (q, k, v, 3, "relu", h0, 4, 2)),
        (ops.rla_bwd.default, (go, torch.randn_like(fs), q.detach(), k.detach(), v.detach(),
                               h0.detach(), ck.detach(), 3, "softmax", 4, 2)),
        (ops.mix_fwd.default, (o.detach().requires_grad_(True), orl.detach().requires_grad_(True),
                               ga.requires_grad_(True), gb.requires_grad_(True), 1e-6,
                               torch.float64)),
        (ops.mix_bwd.default, (go, o.detach(), orl.detach(), ga.detach(), gb.detach(), 1e-6)),
        (ops.swa_mix_fwd.default, (q, k, v, 3, 0.3, cos, sin, orl.detach().requires_grad_(True),
                                   ga, gb, 1e-6, torch.float64, True)),
        (ops.swa_mix_fwd.default, (q.detach(), k.detach(), v.detach(), 3, 0.3, None, None,
                                   orl.detach(), ga.detach(), gb.detach(), 1e-6, torch.float64,
                                   False)),
    ]


@pytest.mark.parametrize("idx", range(8))
def test_opcheck(idx):
    op, args = _opcheck_samples()[idx]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float64, torch.float64),
                                             (torch.float32, torch.float32),
                                             (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)])
def test_swa_mix_fwd_is_swa_then_mix(dtype, out_dtype):
    """The fused op computes exactly swa_fwd followed by mix_fwd (CPU runs those two steps)."""
    q, k, v, kw = make_inputs(2, 45, 4, 2, 16, dtype, seed=21, weights=True, rotary=True)
    cos, sin = kw["rotary_cos"], kw["rotary_sin"]
    ga, gb = kw["swa_norm_weight"], kw["rla_norm_weight"]
    o_rla = ops.rla_fwd(q, k, v, 6, "softmax", None, 8, 2)[0]
    o_swa, lse = ops.swa_fwd(q, k, v, 6, 0.25, cos, sin)
    expect = ops.mix_fwd(o_swa, o_rla, ga, gb, 1e-6, out_dtype)
    out, o_swa2, lse2 = ops.swa_mix_fwd(q, k, v, 6, 0.25, cos, sin, o_rla, ga, gb, 1e-6,
                                        out_dtype, True)
    assert out.dtype == out_dtype
    assert torch.equal(out, expect) and torch.equal(o_swa2, o_swa) and torch.equal(lse2, lse)
    out3, o_swa3, lse3 = ops.swa_mix_fwd(q, k, v, 6, 0.25, cos, sin, o_rla, ga, gb, 1e-6,
                                         out_dtype, False)
    assert torch.equal(out3, expect)
    assert o_swa3.numel() == 0 and lse3.numel() == 0


def test_forward_under_no_grad_matches_and_unsaved_backward_is_refused():
    q, k, v, kw = make_inputs(1, 40, 4, 2, 16, torch.float32, seed=22, weights=True)
    with torch.no_grad():
        quiet = rattention_ext.forward(q, k, v, window_size=5, **kw)
    qg = q.clone().requires_grad_(True)
    loud = rattention_ext.forward(qg, k, v, window_size=5, **kw)
    assert torch.equal(quiet, loud.detach())
    o_rla = ops.rla_fwd(qg, k, v, 5, "softmax", None, 8, 2)[0]
    w = kw["swa_norm_weight"]
    out, _, _ = ops.swa_mix_fwd(qg, k, v, 5, 0.25, None, None, o_rla, w, w, 1e-8, q.dtype, False)
    with pytest.raises(RuntimeError, match="save_for_backward"):
        out.sum().backward()


@pytest.mark.parametrize("bad,msg", [("o_rla_shape", "o_rla must be"),
                                     ("o_rla_dtype", "o_rla must have dtype"),
                                     ("weight", "rla_norm_weight"),
                                     ("eps", "norm_eps"),
                                     ("out_dtype", "out_dtype")])
def test_swa_mix_fwd_bad_input_names_argument(bad, msg):
    q, k, v, _ = make_inputs(1, 12, 4, 2, 8, torch.float32, seed=23)
    o_rla = torch.zeros(1, 12, 4, 8)
    w = torch.ones(4, 8)
    args = dict(o_rla=o_rla, gb=w, eps=1e-8, out_dtype=torch.float32)
    if bad == "o_rla_shape":
        args["o_rla"] = o_rla[:, :5]
    elif bad == "o_rla_dtype":
        args["o_rla"] = o_rla.double()
    elif bad == "weight":
        args["gb"] = torch.ones(3, 8)
    elif bad == "eps":
        args["eps"] = -1.0
    else:
        args["out_dtype"] = torch.float64
    with pytest.raises((ValueError, RuntimeError)) as e:
        ops.swa_mix_fwd(q, k, v, 3, 0.3, None, None, args["o_rla"], w, args["gb"], args["eps"],
                        args["out_dtype"], True)
    assert msg in str(e.value)


def test_build_info():
    info = rattention_ext.build_info()
    for key in ("version", "cuda", "cuda_archs", "cutlass_version", "torch_version"):
        assert key in info
    assert info["version"] == rattention_ext.__version__
    if not info["cuda"]:
        assert info["cuda_archs"] == ""


BAD = [
    (lambda q, k, v: rattention_ext.forward(q[0], k, v, window_size=2), "q must be 4-D"),
    (lambda q, k, v: rattention_ext.forward(q, k.double(), v, window_size=2), "k must have the dtype"),
    (lambda q, k, v: rattention_ext.forward(q.long(), k.long(), v.long(), window_size=2),
     "floating-point"),
    (lambda q, k, v: rattention_ext.forward(q[:, :, :3], k, v, window_size=2), "multiple of"),
    (lambda q, k, v: rattention_ext.forward(q, k, v, window_size=-1), "window_size"),
    (lambda q, k, v: rattention_ext.forward(q, k, v, window_size=2, feature_map="tanh"),
     "feature_map"),
    (lambda q, k, v: rattention_ext.forward(q, k, v, window_size=2,
                                            initial_state=torch.zeros(1, 4, 8, 8)),
     "initial_state must be"),
    (lambda q, k, v: rattention_ext.forward(q, k, v, window_size=2,
                                            swa_norm_weight=torch.ones(4, 7)), "swa_norm_weight"),
    (lambda q, k, v: rattention_ext.forward(q, k, v, window_size=2,
                                            rla_norm_weight=torch.ones(3, 8)), "rla_norm_weight"),
    (lambda q, k, v: rattention_ext.forward(q, k, v, window_size=2,
                                            rotary_cos=torch.ones(5, 4), rotary_sin=torch.ones(5, 4)),
     "positions"),
    (lambda q, k, v: rattention_ext.forward(q, k, v, window_size=2, rotary_cos=torch.ones(12, 4)),
     "together"),
    (lambda q, k, v: rattention_ext.forward(q, k[:, :5], v[:, :5], window_size=2),
     "sequence length"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_names_argument(i):
    fn, msg = BAD[i]
    q = torch.randn(2, 10, 4, 8)
    k = torch.randn(2, 10, 2, 8)
    v = torch.randn(2, 10, 2, 8)
    with pytest.raises((ValueError, RuntimeError, TypeError)) as e:
        fn(q, k, v)
    assert msg in str(e.value)


def test_non_contiguous_inputs():
    q, k, v, _ = make_inputs(2, 33, 4, 2, 16, torch.float64, seed=2)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, batch-major strides
    wide = torch.zeros(*k.shape[:-1], 32, dtype=k.dtype)
    wide[..., ::2] = k
    kt = wide[..., ::2]  # last-dim stride 2
    vt = v.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    out = rattention_ext.forward(qt, kt, vt, window_size=4)
    expect = ref.forward(q, k, v, window_size=4)
    assert rel_err(out, expect) < 1e-10
