"""Validation at the public boundary: every bad argument is refused with an error naming the
package and the argument (never taken silently, never a crash, never an internal op's name)."""
import math

import pytest
import torch

import rattention_ext
from helpers import make_qkv, rotary_tables
from rattention_ext import RAttentionCache

F64 = torch.float64


def _qkv(T=6, D=8, dtype=F64):
    return make_qkv(1, T, 2, 1, D, dtype, 0)


def _entry_points():
    """name -> fn(q, k, v, **kw) for every public function taking the common keywords."""
    def pre(q, k, v, **kw):
        w = kw.pop("window_size", 2)
        cache = RAttentionCache.empty(1, w if isinstance(w, int) and 0 <= w < 100 else 2, 1,
                                      q.shape[-1], dtype=q.dtype)
        return rattention_ext.prefill(q, k, v, cache, window_size=w, **kw)

    def dec(q, k, v, **kw):
        w = kw.pop("window_size", 2)
        cache = RAttentionCache.empty(1, w if isinstance(w, int) and 0 <= w < 100 else 2, 1,
                                      q.shape[-1], dtype=q.dtype)
        return rattention_ext.decode_step(q[:, :1], k[:, :1], v[:, :1], cache, window_size=w,
                                          **kw)

    return {
        "forward": lambda q, k, v, **kw: rattention_ext.forward(q, k, v, **{"window_size": 2, **kw}),
        "sliding_window_attention": lambda q, k, v, **kw: rattention_ext.sliding_window_attention(
            q, k, v, **{"window_size": 2, **kw}),
        "residual_linear_attention": lambda q, k, v, **kw: rattention_ext.residual_linear_attention(
            q, k, v, **{"window_size": 2, **kw}),
        "prefill": pre,
        "decode_step": dec,
    }


ENTRY = list(_entry_points())
BAD_WINDOWS = [True, False, 2.0, None, "3", -1, 2**63, torch.tensor(2)]


@pytest.mark.parametrize("w", BAD_WINDOWS, ids=[repr(w) for w in BAD_WINDOWS])
@pytest.mark.parametrize("entry", ENTRY)
def test_bad_window_named(entry, w):
    if entry in ("prefill", "decode_step") and w is None:
        pytest.skip("window_size=None means 'the cache's window' for the decoding functions")
    q, k, v = _qkv()
    with pytest.raises((TypeError, ValueError), match="rattention_ext.*window_size"):
        _entry_points()[entry](q, k, v, window_size=w)


def test_bad_window_layer():
    for w in (True, 1.5, None, -2):
        with pytest.raises((TypeError, ValueError), match="rattention_ext.*window_size"):
            rattention_ext.nn.RAttention(16, 2, 1, w)


BAD_SCALES = ["0.5", 0.0, -1.0, math.nan, math.inf, -math.inf, True, torch.tensor(0.5),
              torch.tensor(0.5, requires_grad=True), [0.5]]
SCALE_ENTRY = ["forward", "sliding_window_attention", "prefill", "decode_step"]


@pytest.mark.parametrize("scale", BAD_SCALES, ids=[repr(s) for s in BAD_SCALES])
@pytest.mark.parametrize("entry", SCALE_ENTRY)
def test_bad_softmax_scale_named(entry, scale):
    q, k, v = _qkv()
    with torch.no_grad() if entry == "decode_step" else torch.enable_grad():
        with pytest.raises((TypeError, ValueError), match="rattention_ext.*softmax_scale"):
            _entry_points()[entry](q, k, v, softmax_scale=scale)


def test_numeric_scales_accepted():
    q, k, v = _qkv()
    import numpy as np
    a = rattention_ext.forward(q, k, v, window_size=2, softmax_scale=np.float32(0.25))
    b = rattention_ext.forward(q, k, v, window_size=2, softmax_scale=0.25)
    c = rattention_ext.forward(q, k, v, window_size=2, softmax_scale=1)
    assert torch.allclose(a, b) and torch.isfinite(c).all()


BAD_EPS = [0.0, -1e-6, math.nan, math.inf, "1e-6", torch.tensor(1e-6), None]
EPS_ENTRY = ["forward", "prefill", "decode_step"]


@pytest.mark.parametrize("eps", BAD_EPS, ids=[repr(e) for e in BAD_EPS])
@pytest.mark.parametrize("entry", EPS_ENTRY)
def test_bad_norm_eps_named(entry, eps):
    q, k, v = _qkv()
    with torch.no_grad():
        with pytest.raises((TypeError, ValueError), match="rattention_ext.*norm_eps"):
            _entry_points()[entry](q, k, v, norm_eps=eps)


def test_bad_norm_eps_layer_and_raw_ops():
    with pytest.raises(ValueError, match="rattention_ext.*norm_eps"):
        rattention_ext.nn.RAttention(16, 2, 1, 2, norm_eps=0.0)
    o = torch.randn(1, 3, 2, 8)
    w = torch.ones(2, 8)
    with pytest.raises(ValueError, match="rattention_ext.*norm_eps"):
        torch.ops.rattention_ext.mix_fwd(o, o, w, w, 0.0, torch.float32)


def test_small_positive_eps_mixes_zero_branch_as_zero():
    """norm_eps > 0 (the only values accepted): t <= w has an all-zero RLA branch, which
    mixes in as exactly zero, never NaN."""
    q, k, v = _qkv(T=5)
    out = rattention_ext.forward(q, k, v, window_size=10, norm_eps=1e-30)
    swa = rattention_ext.sliding_window_attention(q, k, v, window_size=10)
    from rattention_ext import reference as ref
    want = ref.rms_mix(swa, torch.zeros_like(swa), None, None, 1e-30)
    assert torch.isfinite(out).all() and (out - want).abs().max() < 1e-12


@pytest.mark.parametrize("entry", ["forward", "sliding_window_attention", "prefill"])
def test_rotary_requiring_grad_refused(entry):
    q, k, v = _qkv()
    cos, sin = rotary_tables(6, 8)
    with pytest.raises(ValueError, match="rattention_ext.*rotary_cos.*requires grad"):
        _entry_points()[entry](q, k, v, rotary_cos=cos.requires_grad_(), rotary_sin=sin)
    with torch.no_grad():  # no gradient is asked for: fine
        _entry_points()[entry](q, k, v, rotary_cos=cos, rotary_sin=sin)


@pytest.mark.parametrize("fm", ["elu", None, 1, "Softmax"])
@pytest.mark.parametrize("entry", ["forward", "residual_linear_attention", "prefill",
                                   "decode_step"])
def test_bad_feature_map_named(entry, fm):
    q, k, v = _qkv()
    with torch.no_grad():
        with pytest.raises(ValueError, match="rattention_ext.*feature_map"):
            _entry_points()[entry](q, k, v, feature_map=fm)


@pytest.mark.parametrize("other", ["k", "v", "q"])
@pytest.mark.parametrize("entry", ["forward", "sliding_window_attention",
                                   "residual_linear_attention"])
def test_meta_mixed_with_cpu_refused(entry, other):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    args[other] = args[other].to("meta")
    with pytest.raises(RuntimeError, match="rattention_ext.*same device"):
        _entry_points()[entry](args["q"], args["k"], args["v"])


def test_meta_everywhere_gives_meta_shapes():
    q, k, v = [x.to("meta") for x in _qkv()]
    assert rattention_ext.forward(q, k, v, window_size=2).device.type == "meta"


def test_meta_weight_or_h0_refused():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="rattention_ext.*same device"):
        rattention_ext.forward(q, k, v, window_size=2,
                               swa_norm_weight=torch.ones(2, 8, dtype=F64, device="meta"))
    with pytest.raises(RuntimeError, match="rattention_ext.*same device"):
        rattention_ext.forward(q, k, v, window_size=2,
                               initial_state=torch.zeros(1, 2, 16, 8, dtype=F64, device="meta"))


@pytest.mark.parametrize("bad", [
    dict(dtype=torch.int64), dict(dtype=torch.float16), dict(dtype=torch.complex64),
    dict(head_dim=7), dict(head_dim=512), dict(head_dim=0), dict(head_dim=True),
    dict(num_kv_heads=0), dict(window_size=-1), dict(window_size=2**62), dict(batch_size=1.0),
    dict(dtype="float32"),
], ids=lambda d: repr(d))
def test_cache_empty_validates(bad):
    args = dict(batch_size=2, window_size=3, num_kv_heads=2, head_dim=8, dtype=torch.float32)
    args.update(bad)
    name = next(iter(bad))
    with pytest.raises((TypeError, ValueError), match=f"rattention_ext.*{name}"):
        RAttentionCache.empty(args.pop("batch_size"), args.pop("window_size"),
                              args.pop("num_kv_heads"), args.pop("head_dim"), **args)


def test_cache_empty_cuda_dtypes_and_head_dims_checked_without_a_gpu():
    # The check runs before any allocation, so it needs no GPU.
    with pytest.raises(ValueError, match="rattention_ext.*float32.*cuda"):
        RAttentionCache.empty(1, 3, 1, 64, dtype=torch.float32, device="cuda")
    with pytest.raises(ValueError, match="rattention_ext.*head_dim 32.*cuda"):
        RAttentionCache.empty(1, 3, 1, 32, dtype=torch.bfloat16, device="cuda")


def test_decode_step_with_grad_raises_and_no_grad_works():
    q, k, v = [x[:, :1] for x in _qkv()]
    cache = RAttentionCache.empty(1, 2, 1, 8, dtype=F64)
    for name in ("q", "k", "v"):
        args = dict(q=q, k=k, v=v)
        args[name] = args[name].clone().requires_grad_()
        with pytest.raises(RuntimeError, match=f"rattention_ext.decode_step: {name} requires grad"):
            rattention_ext.decode_step(args["q"], args["k"], args["v"], cache)
    g = torch.ones(2, 8, dtype=F64, requires_grad=True)
    with pytest.raises(RuntimeError, match="rattention_ext.*swa_norm_weight requires grad"):
        rattention_ext.decode_step(q, k, v, cache, swa_norm_weight=g)
    assert cache.positions.tolist() == [0]  # refused before touching the cache
    with torch.no_grad():
        out = rattention_ext.decode_step(q.requires_grad_(), k, v, cache, swa_norm_weight=g)
    assert not out.requires_grad and cache.positions.tolist() == [1]
    with torch.inference_mode():
        rattention_ext.decode_step(q, k, v, cache, swa_norm_weight=g)


def test_raw_decode_op_with_grad_raises():
    q, k, v = [x[:, :1] for x in _qkv()]
    cache = RAttentionCache.empty(1, 2, 1, 8, dtype=F64)
    w = torch.ones(2, 8, dtype=F64)
    with pytest.raises(RuntimeError, match="rattention_ext.decode_step"):
        torch.ops.rattention_ext.decode_step(q.requires_grad_(), k, v, cache.keys, cache.values,
                                             cache.state, cache.positions, "softmax", 0.3, None,
                                             None, None, w, w, 1e-6)


def test_layer_step_with_grad_raises():
    layer = rattention_ext.nn.RAttention(16, 2, 1, 2, dtype=F64)
    cache = layer.new_cache(1)
    with pytest.raises(RuntimeError, match="rattention_ext.decode_step.*requires grad"):
        layer.step(torch.randn(1, 1, 16, dtype=F64), cache)
    with torch.no_grad():
        assert layer.step(torch.randn(1, 1, 16, dtype=F64), cache).shape == (1, 1, 16)


@pytest.mark.parametrize("which", ["k", "v", "kv"])
@pytest.mark.parametrize("entry", [e for e in ENTRY if e != "decode_step"])
def test_kv_of_another_length_refused(entry, which):
    """k / v longer than q are not read as earlier context (the ops' halo form) by a public
    call, nor shorter ones padded: the error names the tensor and q's length."""
    q, k, v = _qkv(T=6)
    k2, v2 = _qkv(T=8)[1:]
    bad = {"k": (k2, v), "v": (k, v2), "kv": (k2, v2)}[which]
    name = "v" if which == "v" else "k"
    with pytest.raises(ValueError, match=rf"rattention_ext\.{entry}: {name} must have q's "
                       r"sequence length T = 6 \(dim 1\), got shape \[1, 8, 1, 8\]"):
        _entry_points()[entry](q, *bad)
    with pytest.raises(ValueError, match=rf"rattention_ext\.{entry}: k must have q's sequence"):
        _entry_points()[entry](q, k[:, :4], v[:, :4])


def test_decode_step_kv_of_another_length_refused():
    q, k, v = _qkv(T=2)
    cache = RAttentionCache.empty(1, 2, 1, 8, dtype=F64)
    with pytest.raises(ValueError, match=r"rattention_ext\.decode_step: k must have q's "
                       r"sequence length T = 1"):
        rattention_ext.decode_step(q[:, :1], k, v, cache)


@pytest.mark.parametrize("op_args", [
    ("swa_fwd", lambda q, k, v: (q, k, v, -1, 0.3, None, None), "window_size"),
    ("swa_fwd", lambda q, k, v: (q, k, v, 1, float("nan"), None, None), "softmax_scale"),
    ("swa_fwd", lambda q, k, v: (q, k, v, 1, 0.0, None, None), "softmax_scale"),
    ("rla_fwd", lambda q, k, v: (q, k, v, 1, "elu", None, 64, 4), "feature_map"),
    ("rla_fwd", lambda q, k, v: (q, k, v, 1, "relu", None, 0, 4), "chunk_size"),
    ("rla_fwd", lambda q, k, v: (q[:, :, :1], k, v[:, :3], 1, "relu", None, 64, 4), "shape"),
], ids=lambda a: a if isinstance(a, str) else "")
def test_raw_op_errors_name_the_package(op_args):
    op, make, word = op_args
    q, k, v = _qkv()
    with pytest.raises((ValueError, RuntimeError), match=f"^rattention_ext.*{word}"):
        getattr(torch.ops.rattention_ext, op)(*make(q, k, v))


def test_cache_on_meta_needs_a_floating_dtype():
    with pytest.raises(ValueError, match=r"rattention_ext\.RAttentionCache.*dtype torch\.int64"):
        rattention_ext.RAttentionCache.empty(1, 3, 1, 8, dtype=torch.int64, device="meta")
    c = rattention_ext.RAttentionCache.empty(1, 3, 1, 8, dtype=torch.float16, device="meta")
    assert c.keys.is_meta


@pytest.mark.parametrize("cu", [torch.tensor([0], dtype=torch.int32), torch.tensor([0, 5])])
def test_bad_cu_seqlens_errors_name_the_package(cu):
    n = 0 if cu.numel() == 1 else 5
    q, k, v = torch.randn(n, 2, 8), torch.randn(n, 1, 8), torch.randn(n, 1, 8)
    with pytest.raises((TypeError, ValueError), match=r"^rattention_ext\.\w+: cu_seqlens"):
        rattention_ext.forward(q, k, v, window_size=3, cu_seqlens=cu)
