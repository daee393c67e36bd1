"""rattention_ext.jax (the XLA FFI binding of the CPU kernels): values and gradients against
the torch package (same kernels: equal results) and against the pure-JAX reference
(float64 1e-10, float32 1e-5), jit / vmap / export, the custom calls in the lowered program,
and input validation messages."""
import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax", reason="the JAX binding needs jax (make test installs it)")
import jax.numpy as jnp  # noqa: E402

import rattention_ext  # noqa: E402
import rattention_ext.jax as rjax  # noqa: E402  (a build with jax installed must have it)
from rattention_ext import jax_reference as jref  # noqa: E402
from conftest import rotary_tables  # noqa: E402

TOL = {np.float64: 1e-10, np.float32: 1e-5}


@pytest.fixture(autouse=True, scope="module")
def x64():
    """float64 cases need x64; restore the process-wide flag for the other test modules."""
    before = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def rel(a, b):
    """||a - b|| / ||b||, with ||b|| floored at 1: a gradient that is exactly zero (q at
    T = 1, where the softmax has one key) is matched to round-off, not to 0 relative."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1.0)


def make_inputs(B, T, Hq, Hkv, D, dtype, seed, h0_batch=None, weights=False, rotary=False):
    """numpy inputs (drawn in float64, cast) and the keyword arrays of forward()."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, T, H, D)).astype(dtype) for H in (Hq, Hkv, Hkv))
    kw = {}
    if h0_batch:
        kw["initial_state"] = (0.1 * rng.standard_normal((h0_batch, Hq, 2 * D, D))).astype(dtype)
    if weights:
        kw["swa_norm_weight"] = (1 + 0.5 * rng.standard_normal((Hq, D))).astype(dtype)
        kw["rla_norm_weight"] = (1 + 0.5 * rng.standard_normal((Hq, D))).astype(dtype)
    if rotary:
        cos, sin = rotary_tables(T + 3, D, torch.float64)
        kw["rotary_cos"], kw["rotary_sin"] = cos.numpy().astype(dtype), sin.numpy().astype(dtype)
    return q, k, v, kw


CASES = [
    # B, T, Hq, Hkv, D, w, feature_map, h0_batch, weights, rotary
    (1, 1, 2, 2, 16, 0, "softmax", None, False, False),
    (2, 37, 4, 2, 16, 5, "relu", 1, True, True),
    (1, 45, 2, 2, 32, 60, "softmax", 1, True, False),  # window beyond T: RLA is H0 only
    (2, 130, 4, 1, 16, 0, "softmax", 2, False, True),  # several RLA chunks, w = 0
]
DIFF = ("initial_state", "swa_norm_weight", "rla_norm_weight")


def torch_forward_and_grads(q, k, v, kw, w, fm, cot):
    tq, tk, tv = (torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))
    tkw = {n: torch.from_numpy(x) for n, x in kw.items()}
    leaves = [tq, tk, tv] + [tkw[n].requires_grad_(True) for n in DIFF if n in tkw]
    out = rattention_ext.forward(tq, tk, tv, window_size=w, feature_map=fm, **tkw)
    grads = torch.autograd.grad(out, leaves, torch.from_numpy(cot))
    return out.detach().numpy(), [g.numpy() for g in grads]


def jax_forward_and_grads(fn, q, k, v, kw, w, fm, cot):
    names = [n for n in DIFF if n in kw]
    const = {n: x for n, x in kw.items() if n not in names}

    def loss(q, k, v, *diff):
        out = fn(q, k, v, window_size=w, feature_map=fm, **const, **dict(zip(names, diff)))
        return jnp.sum(out * cot), out

    # jitted: one compilation instead of op-by-op dispatch of the reference's many small ops
    grad = jax.jit(jax.grad(loss, argnums=tuple(range(3 + len(names))), has_aux=True))
    grads, out = grad(q, k, v, *[kw[n] for n in names])
    return np.asarray(out), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_forward_and_grads(case, dtype):
    B, T, Hq, Hkv, D, w, fm, h0b, weights, rotary = case
    q, k, v, kw = make_inputs(B, T, Hq, Hkv, D, dtype, seed=T + w, h0_batch=h0b,
                              weights=weights, rotary=rotary)
    cot = np.random.default_rng(1).standard_normal(q.shape).astype(dtype)
    out, grads = jax_forward_and_grads(rjax.forward, q, k, v, kw, w, fm, cot)
    assert out.dtype == dtype and out.shape == q.shape
    # The torch package runs the same kernels on the same inputs: the same numbers.
    t_out, t_grads = torch_forward_and_grads(q, k, v, kw, w, fm, cot)
    assert rel(out, t_out) <= TOL[dtype] * 1e-2
    for g, tg in zip(grads, t_grads):
        assert g.shape == tg.shape and g.dtype == tg.dtype
        assert rel(g, tg) <= TOL[dtype] * 1e-2
    # An independent oracle: the pure-JAX reference (dense SWA, token scan RLA).
    r_out, r_grads = jax_forward_and_grads(jref.forward, q, k, v, kw, w, fm, cot)
    assert rel(out, r_out) < TOL[dtype]
    for g, rg in zip(grads, r_grads):
        assert rel(g, rg) < TOL[dtype]


def test_bfloat16_matches_torch():
    q, k, v, kw = make_inputs(2, 50, 4, 2, 32, np.float32, seed=3, h0_batch=1, weights=True)
    to_bf16 = lambda x: torch.from_numpy(x).to(torch.bfloat16)  # noqa: E731
    t_out = rattention_ext.forward(to_bf16(q), to_bf16(k), to_bf16(v), window_size=7,
                                   **{n: torch.from_numpy(x) for n, x in kw.items()})
    out = rjax.forward(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16),
                       jnp.asarray(v, jnp.bfloat16), window_size=7, **kw)
    assert out.dtype == jnp.bfloat16
    assert rel(out.astype(jnp.float32), t_out.float().numpy()) == 0.0
    ref = jref.forward(q, k, v, window_size=7, **kw)  # float32 reference of the same inputs
    assert rel(out.astype(jnp.float32), ref) < 2e-2


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_branches_with_lse_and_final_state(dtype):
    """The branch functions, their extra outputs, and gradients flowing into those too."""
    q, k, v, kw = make_inputs(2, 70, 4, 2, 16, dtype, seed=9, h0_batch=2, rotary=True)
    w = 9
    rot = dict(rotary_cos=kw["rotary_cos"], rotary_sin=kw["rotary_sin"])
    cots = np.random.default_rng(2)

    def check(fn_ours, fn_ref, argnums, *args):
        outs = jax.jit(fn_ours)(*args)
        refs = jax.jit(fn_ref)(*args)
        cs = [cots.standard_normal(o.shape).astype(o.dtype) for o in outs]
        loss = lambda f: lambda *a: sum(jnp.sum(o * c) for o, c in zip(f(*a), cs))  # noqa: E731
        for o, r in zip(outs, refs):
            assert o.dtype == r.dtype and rel(o, r) < TOL[dtype]
        for g, r in zip(jax.jit(jax.grad(loss(fn_ours), argnums))(*args),
                        jax.jit(jax.grad(loss(fn_ref), argnums))(*args)):
            assert rel(g, r) < TOL[dtype]

    for mod_ours, mod_ref in ((rjax, jref),):
        check(lambda q, k, v: mod_ours.sliding_window_attention(
                  q, k, v, window_size=w, softmax_scale=0.3, return_lse=True, **rot),
              lambda q, k, v: mod_ref.sliding_window_attention(
                  q, k, v, window_size=w, softmax_scale=0.3, return_lse=True, **rot),
              (0, 1, 2), q, k, v)
        check(lambda q, k, v, h: mod_ours.residual_linear_attention(
                  q, k, v, window_size=w, initial_state=h, return_final_state=True),
              lambda q, k, v, h: mod_ref.residual_linear_attention(
                  q, k, v, window_size=w, initial_state=h, return_final_state=True),
              (0, 1, 2, 3), q, k, v, kw["initial_state"])


def test_jit_program_has_the_custom_calls():
    q, k, v, _ = make_inputs(1, 20, 2, 2, 16, np.float32, seed=4)
    fwd = jax.jit(rjax.forward, static_argnames=("window_size",))
    text = fwd.lower(q, k, v, window_size=3).as_text()
    for op in ("rla_fwd", "swa_fwd", "mix_fwd"):
        assert f"custom_call @rattention_{op}" in text
    grad = jax.jit(jax.grad(lambda q, k, v: rjax.forward(q, k, v, window_size=3).sum(), (0, 1, 2)))
    text = grad.lower(q, k, v).as_text()
    for op in ("mix_bwd", "swa_bwd", "rla_bwd"):
        assert f"custom_call @rattention_{op}" in text
    np.testing.assert_allclose(np.asarray(fwd(q, k, v, window_size=3)),
                               np.asarray(rjax.forward(q, k, v, window_size=3)), rtol=0, atol=0)


def test_vmap_folds_into_the_batch_and_loops_for_batched_weights():
    N, w = 3, 4
    q, k, v, kw = make_inputs(N * 2, 33, 4, 2, 16, np.float64, seed=5, weights=True)
    q, k, v = (x.reshape((N, 2) + x.shape[1:]) for x in (q, k, v))
    h0 = make_inputs(1, 1, 4, 2, 16, np.float64, seed=6, h0_batch=1)[3]["initial_state"]
    f = lambda q, k, v: rjax.forward(q, k, v, window_size=w, initial_state=h0)  # noqa: E731
    want = jax.jit(jax.vmap(lambda q, k, v: jref.forward(q, k, v, window_size=w,
                                                          initial_state=h0)))(q, k, v)
    assert rel(jax.vmap(f)(q, k, v), want) < 1e-10
    # Folded: one kernel call over N * B sequences, no loop in the program.
    assert "while" not in jax.jit(jax.vmap(f)).lower(q, k, v).as_text()
    # k, v shared across the vmapped axis (in_axes None) and a vmapped norm weight (loop).
    gw = np.stack([kw["swa_norm_weight"] * (i + 1) for i in range(N)])

    def loss(fn, q, g):
        return jnp.sum(fn(q, k[0], v[0], window_size=w, swa_norm_weight=g,
                          initial_state=h0) ** 2)

    got = jax.jit(jax.vmap(jax.grad(lambda q, g: loss(rjax.forward, q, g), (0, 1))))(q, gw)
    want = jax.jit(jax.vmap(jax.grad(lambda q, g: loss(jref.forward, q, g), (0, 1))))(q, gw)
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-10


def test_export_with_symbolic_batch_and_length():
    from jax import export

    w, Hq, Hkv, D = 3, 4, 2, 8
    b, t = export.symbolic_shape("b, t")
    spec = lambda H: jax.ShapeDtypeStruct((b, t, H, D), jnp.float64)  # noqa: E731
    fn = lambda q, k, v: rjax.forward(q, k, v, window_size=w)  # noqa: E731
    exp_fwd = export.export(jax.jit(fn), disabled_checks=rjax.export_disabled_checks())(
        spec(Hq), spec(Hkv), spec(Hkv))
    exp_grad = export.export(jax.jit(jax.grad(lambda *a: fn(*a).sum())),
                             disabled_checks=rjax.export_disabled_checks())(
        spec(Hq), spec(Hkv), spec(Hkv))
    ref_fwd = jax.jit(lambda q, k, v: jref.forward(q, k, v, window_size=w))
    ref_grad = jax.jit(jax.grad(lambda q, k, v: jref.forward(q, k, v, window_size=w).sum()))
    for B, T in ((1, 7), (2, 70)):
        q, k, v, _ = make_inputs(B, T, Hq, Hkv, D, np.float64, seed=B * T)
        assert rel(exp_fwd.call(q, k, v), ref_fwd(q, k, v)) < 1e-10
        assert rel(exp_grad.call(q, k, v), ref_grad(q, k, v)) < 1e-10


BAD = [
    # (what to change, expected error, message fragment)
    (dict(q=np.zeros((2, 8, 4), np.float32)), ValueError, r"q must be 4-D \[B, T, Hq, D\]"),
    (dict(k=np.zeros((1, 9, 2, 16), np.float32), v=np.zeros((1, 9, 2, 16), np.float32)),
     ValueError, "k must have sequence length 8"),
    (dict(v=np.zeros((1, 8, 1, 16), np.float32)), ValueError, "v must have the shape of k"),
    (dict(k=np.zeros((1, 8, 3, 16), np.float32), v=np.zeros((1, 8, 3, 16), np.float32)),
     ValueError, r"q heads \(4\) must be a multiple of k/v heads \(3\)"),
    (dict(k=np.zeros((1, 8, 2, 16), np.float64)), TypeError, "k must have the dtype of q"),
    (dict(q=np.zeros((1, 8, 4, 16), np.float16), k=np.zeros((1, 8, 2, 16), np.float16),
          v=np.zeros((1, 8, 2, 16), np.float16)), TypeError, "q: the CPU kernels support"),
    (dict(q=np.zeros((1, 8, 4, 16), np.int32)), TypeError, "q must be a floating-point array"),
    (dict(window_size=-1), ValueError, "window_size must be >= 0"),
    (dict(window_size=2.5), TypeError, "window_size must be a Python int"),
    (dict(feature_map="elu"), ValueError, "feature_map must be 'softmax' or 'relu'"),
    (dict(rotary_cos=np.zeros((8, 8), np.float32)), ValueError,
     "rotary_cos and rotary_sin must be given together"),
    (dict(rotary_cos=np.zeros((5, 8), np.float32), rotary_sin=np.zeros((5, 8), np.float32)),
     ValueError, "rotary_cos has 5 positions but 8 are needed"),
    (dict(initial_state=np.zeros((1, 4, 16, 16), np.float32)), ValueError,
     r"initial_state must be \[B or 1, Hq, 2D, D\]"),
    (dict(swa_norm_weight=np.zeros((4, 15), np.float32)), ValueError,
     r"swa_norm_weight must be \[Hq, D\] = \[4, 16\]"),
    (dict(norm_eps=-1.0), ValueError, "norm_eps must be a finite number > 0"),
    (dict(norm_eps=0.0), ValueError, "norm_eps must be a finite number > 0"),
    (dict(norm_eps=float("inf")), ValueError, "norm_eps must be a finite number > 0"),
    (dict(norm_eps="0.5"), TypeError, "norm_eps must be a number"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite number > 0"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale must be a finite number > 0"),
    (dict(softmax_scale="0.5"), TypeError, "softmax_scale must be a number"),
    (dict(window_size=2**63), ValueError,
     r"window_size must be an int in \[0, 9223372036854775807\]"),
    (dict(checkpoint_every=2**63), ValueError,
     r"checkpoint_every must be an int in \[1, 9223372036854775807\]"),
    (dict(chunk_size=0), ValueError, r"chunk_size must be in \[1, 1024\]"),
    (dict(checkpoint_every=0), ValueError, "checkpoint_every must be >= 1"),
]


@pytest.mark.parametrize("bad", BAD, ids=lambda b: "-".join(b[0]))
def test_bad_inputs_raise_clear_errors(bad):
    change, err, match = bad
    args = dict(q=np.zeros((1, 8, 4, 16), np.float32), k=np.zeros((1, 8, 2, 16), np.float32),
                v=np.zeros((1, 8, 2, 16), np.float32), window_size=2)
    args.update(change)
    with pytest.raises(err, match=match):
        rjax.forward(**args)
    with pytest.raises(err, match=match):  # the same check at trace time under jit
        jax.jit(lambda: rjax.forward(**args))()


def test_handler_rejects_inconsistent_buffers_at_run_time():
    """A direct call of the custom call with mismatched buffers gets the handler's own error
    (no crash): the C++ checks behind the Python ones."""
    q = jnp.zeros((1, 8, 4, 16), jnp.float32)
    k = jnp.zeros((1, 9, 2, 16), jnp.float32)
    call = jax.ffi.ffi_call("rattention_swa_fwd",
                            (jax.ShapeDtypeStruct((1, 8, 4, 16), jnp.float32),
                             jax.ShapeDtypeStruct((1, 4, 8), jnp.float32)))
    empty = jnp.zeros((0,), jnp.float32)
    with pytest.raises(Exception, match="k must have sequence length 8"):
        jax.block_until_ready(call(q, k, k, empty, empty, window_size=np.int64(2),
                                   softmax_scale=np.float64(0.25)))
    # the scalars too: a NaN scale, and an eps of 0 (an all-zero row would mix in as NaN)
    with pytest.raises(Exception, match="softmax_scale must be a finite number > 0"):
        jax.block_until_ready(call(q, q[:, :, :2], q[:, :, :2], empty, empty,
                                   window_size=np.int64(2), softmax_scale=np.float64(np.nan)))
    mix = jax.ffi.ffi_call("rattention_mix_fwd", jax.ShapeDtypeStruct(q.shape, jnp.float32))
    w = jnp.ones((4, 16), jnp.float32)
    with pytest.raises(Exception, match="norm_eps must be a finite number > 0"):
        jax.block_until_ready(mix(q, q, w, w, eps=np.float64(0.0)))


def test_benchmark_driver_runs(tmp_path, capsys):
    """benchmarks/jax_cpu.py end to end at a tiny size: every row timed, the binding's output
    within float32 round-off of each implementation's (its own correctness check)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import jax_cpu

    assert jax_cpu.main(["--T", "40", "--w", "7", "--Hq", "4", "--Hkv", "2", "--D", "16",
                         "--budget", "0.05", "--max-reps", "3", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("jax_cpu_*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {(r["op"], r["impl"]) for r in rows} >= {
        ("fwd_bwd", "ours"), ("fwd_bwd", "jax_reference"), ("swa_fwd_bwd", "jax_nn_dpa_band"),
        ("swa_fwd", "jax_nn_dpa_band")}
    for r in rows:
        assert r["ms"] > 0
        if r["rel_err_ours_vs_this"] is not None:
            assert r["rel_err_ours_vs_this"] < 1e-5, r


def test_empty_sequences_under_vmap_keep_their_shapes():
    """T = 0 under vmap: every output has the vmapped and the batch axis (as a loop gives),
    and vmap of grad runs."""
    q = jnp.zeros((3, 2, 0, 4, 8), jnp.float32)
    k = jnp.zeros((3, 2, 0, 2, 8), jnp.float32)
    f = jax.vmap(lambda q, k, v: rjax.forward(q, k, v, window_size=3))
    assert f(q, k, k).shape == (3, 2, 0, 4, 8)
    o, lse = jax.vmap(lambda q, k, v: rjax.sliding_window_attention(
        q, k, v, window_size=3, return_lse=True))(q, k, k)
    assert o.shape == (3, 2, 0, 4, 8) and lse.shape == (3, 2, 4, 0)
    o, st = jax.vmap(lambda q, k, v: rjax.residual_linear_attention(
        q, k, v, window_size=3, return_final_state=True))(q, k, k)
    assert o.shape == (3, 2, 0, 4, 8) and st.shape == (3, 2, 2, 16, 8)
    g = jax.vmap(jax.grad(lambda q, k, v: rjax.forward(q, k, v, window_size=3).sum()))(q, k, k)
    assert g.shape == q.shape
    # k, v not vmapped (empty, yet not an absent optional): broadcast like any other
    f = jax.vmap(lambda q, k, v: rjax.forward(q, k, v, window_size=3), in_axes=(0, None, None))
    assert f(q, k[0], k[0]).shape == (3, 2, 0, 4, 8)


def test_initial_state_gradient_with_an_empty_batch():
    q = jnp.zeros((0, 5, 4, 8), jnp.float32)
    k = jnp.zeros((0, 5, 2, 8), jnp.float32)
    h0 = jnp.zeros((0, 4, 16, 8), jnp.float32)
    for fn in (rjax.forward, rjax.residual_linear_attention):
        g = jax.grad(lambda h: fn(q, k, k, window_size=2, initial_state=h).sum())(h0)
        assert g.shape == h0.shape


def test_rotary_tables_of_different_lengths_as_in_torch():
    """Both tables are read from row 0 on (torch takes any P >= T for each)."""
    q, k, v, _ = make_inputs(1, 5, 2, 1, 8, np.float32, seed=5)
    g = np.random.default_rng(6)
    cos, sin = g.standard_normal((9, 4)).astype(np.float32), g.standard_normal((7, 4)).astype(
        np.float32)
    got = rjax.forward(q, k, v, window_size=2, rotary_cos=cos, rotary_sin=sin)
    want = rattention_ext.forward(*(torch.from_numpy(np.asarray(x)) for x in (q, k, v)),
                                  window_size=2, rotary_cos=torch.from_numpy(cos),
                                  rotary_sin=torch.from_numpy(sin))
    assert rel(got, want.numpy()) < 1e-6
