"""JAX binding of the package's compiled kernels (XLA FFI custom calls).

The same three functions as the torch API (:mod:`rattention_ext.api`), with the same
semantics, on JAX arrays ``[B, T, H, D]``::

    import rattention_ext.jax as rjax
    o = rjax.forward(q, k, v, window_size=512)               # [B, T, Hq, D]
    g = jax.grad(lambda q: rjax.forward(q, k, v, window_size=512).sum())(q)

Each kernel (SWA, RLA and the RMS mixing, forward and backward) is an XLA FFI handler in
``_jax_ffi.so`` (csrc/jax), which fills the same params structs and calls the same C++ CPU
kernels as the torch ops; the handlers are registered for the CPU platform when this module
is imported. Gradients come from the registered backward kernels through ``jax.custom_vjp``;
the functions work under ``jax.jit``, ``jax.grad``, ``jax.vmap`` (a vmapped axis is folded
into the batch axis the kernels already loop over, or looped when the per-call tables --
norm weights, rotary tables -- are vmapped too) and ``jax.export`` (symbolic batch and
sequence lengths).

Differences from the torch API that JAX imposes: ``window_size``, ``softmax_scale``,
``feature_map``, ``norm_eps``, ``chunk_size`` and ``checkpoint_every`` are static Python
values (``static_argnames`` under ``jax.jit``); the rotary tables are constants (their
gradient is zero, as torch gives none); float64 needs ``jax_enable_x64``. Supported dtypes
are those of the CPU kernels: float32, float64, bfloat16. A CUDA build of the package also
registers CUDA handlers (same kernels as the torch CUDA ops: bfloat16/float16, head dim 64
or 128, XLA's stream); those are compiled by ``make cuda-check`` but have not been run.

Inside this package ``jax`` is this module; ``import jax`` below is absolute and gets JAX.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .api import DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHUNK_SIZE

__all__ = ["forward", "sliding_window_attention", "residual_linear_attention",
           "export_disabled_checks"]

# FFI targets: XLA custom-call name rattention_<op>, C symbol rattention_<op>_<platform>.
_OPS = ("swa_fwd", "swa_bwd", "rla_fwd", "rla_bwd", "mix_fwd", "mix_bwd")
_LIBRARY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_jax_ffi.so")


def _register_targets() -> ctypes.CDLL:
    """Load _jax_ffi.so and register every handler it exports with XLA (once, at import)."""
    if not os.path.exists(_LIBRARY_PATH):
        raise ImportError(
            f"rattention_ext.jax: {_LIBRARY_PATH} is missing: this build of rattention_ext "
            "has no JAX FFI module (it is built only when jax is importable at build time). "
            "Reinstall with jax present: pip install --no-build-isolation '.[jax]'")
    lib = ctypes.cdll.LoadLibrary(_LIBRARY_PATH)
    for op in _OPS:
        for platform, suffix in (("cpu", "cpu"), ("CUDA", "cuda")):
            symbol = getattr(lib, f"rattention_{op}_{suffix}", None)
            if symbol is not None:
                jax.ffi.register_ffi_target(f"rattention_{op}", jax.ffi.pycapsule(symbol),
                                            platform=platform)
    return lib


_lib = _register_targets()
_HAS_CUDA_HANDLERS = hasattr(_lib, "rattention_swa_fwd_cuda")


def _on_cuda() -> bool:
    """Whether the calls being traced run on the CUDA handlers (JAX's default backend is a
    GPU and this build has them): their dtype / head-dim / chunk rules apply."""
    return _HAS_CUDA_HANDLERS and jax.default_backend() == "gpu"


def export_disabled_checks():
    """The ``disabled_checks`` that ``jax.export.export`` needs for a program that calls
    these kernels: our custom calls carry no cross-version compatibility guarantee (an
    exported artifact runs where this package, at a matching version, is imported)::

        exported = jax.export.export(jax.jit(fn),
                                     disabled_checks=rattention_ext.jax.export_disabled_checks())
    """
    from jax import export

    return [export.DisabledSafetyCheck.custom_call(f"rattention_{op}") for op in _OPS]


# ---- validation (the torch API's messages; shapes are static at trace time) -------------
def _shape(x) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _violated(check) -> bool:
    """True when `check()` is definitely true. With symbolic (jax.export) dims a comparison
    may be undecidable at trace time; the FFI handler checks it again at run time."""
    try:
        return bool(check())
    except Exception:  # InconclusiveDimensionOperation on symbolic shapes
        return False


def _as_array(x, name: str):
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return x


def _static_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int (static under jax.jit: pass it in "
                        f"static_argnames), got {type(value).__name__}")
    return int(value)


def _check_qkv(q, k, v):
    q, k, v = _as_array(q, "q"), _as_array(k, "k"), _as_array(v, "v")
    if q.ndim != 4:
        raise ValueError(f"q must be 4-D [B, T, Hq, D], got shape {_shape(q)}")
    if k.ndim != 4:
        raise ValueError(f"k must be 4-D [B, T, Hkv, D], got shape {_shape(k)}")
    if v.ndim != 4:
        raise ValueError(f"v must be 4-D [B, T, Hkv, D], got shape {_shape(v)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
    if _on_cuda():
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise TypeError(f"q: the CUDA kernels support bfloat16 and float16, got {q.dtype} "
                            "(use the CPU platform or the reference for float32/float64)")
        if _violated(lambda: q.shape[3] not in (64, 128)):
            raise ValueError(f"q: the CUDA kernels support head dim 64 and 128, got {q.shape[3]}")
    elif q.dtype not in (jnp.float32, jnp.float64, jnp.bfloat16):
        raise TypeError(f"q: the CPU kernels support float32, float64 and bfloat16, got {q.dtype}")
    if _violated(lambda: tuple(k.shape) != tuple(v.shape)):
        raise ValueError(f"v must have the shape of k {_shape(k)}, got {_shape(v)}")
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if _violated(lambda: k.shape[0] != B):
        raise ValueError(f"k must have batch size {B} (from q), got {k.shape[0]}")
    if _violated(lambda: k.shape[1] != T):
        raise ValueError(f"k must have sequence length {T} (from q), got {k.shape[1]}")
    if _violated(lambda: k.shape[3] != D):
        raise ValueError(f"k must have head dim {D} (from q), got {k.shape[3]}")
    if _violated(lambda: Hkv < 1 or Hq % Hkv != 0):
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if _violated(lambda: D < 2 or D % 2 != 0 or D > 256):
        raise ValueError(f"head dim must be even and in [2, 256], got {D}")
    return q, k, v


_INT64_MAX = 2**63 - 1  # the kernels' attributes are int64


def _check_window(window_size) -> int:
    w = _static_int(window_size, "window_size")
    if w < 0:
        raise ValueError(f"window_size must be >= 0, got {w}")
    if w > _INT64_MAX:
        raise ValueError(f"window_size must be an int in [0, {_INT64_MAX}], got {w}")
    return w


def _check_rotary(cos, sin, q):
    if (cos is None) != (sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if cos is None:
        return None, None
    T, D = q.shape[1], q.shape[3]
    out = []
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        t = _as_array(t, name)
        if _violated(lambda: t.ndim != 2 or t.shape[1] != D // 2):
            raise ValueError(f"{name} must be [positions, D/2] = [P, {D // 2}], got {_shape(t)}")
        if _violated(lambda: t.shape[0] < T):
            raise ValueError(f"{name} has {t.shape[0]} positions but {T} are needed (one row "
                             "per token position)")
        out.append(t.astype(_acc(q.dtype)))
    P_cos, P_sin = out[0].shape[0], out[1].shape[0]
    if isinstance(P_cos, int) and isinstance(P_sin, int) and P_cos != P_sin:
        # the kernels read rows 0 .. T-1 of both, and take tables of one shape
        P = min(P_cos, P_sin)
        out = [t[:P] for t in out]
    return tuple(out)


def _check_initial_state(h0, q):
    if h0 is None:
        return None
    h0 = _as_array(h0, "initial_state")
    B, _, Hq, D = q.shape
    if _violated(lambda: h0.ndim != 4 or h0.shape[0] not in (1, B) or tuple(h0.shape[1:]) != (
            Hq, 2 * D, D)):
        raise ValueError(f"initial_state must be [B or 1, Hq, 2D, D] = [{B} or 1, {Hq}, "
                         f"{2 * D}, {D}], got {_shape(h0)}")
    return h0


def _check_norm_weight(w, name: str, q):
    Hq, D = q.shape[2], q.shape[3]
    if w is None:
        return jnp.ones((Hq, D), _acc(q.dtype))
    w = _as_array(w, name)
    if _violated(lambda: w.ndim != 2 or tuple(w.shape) != (Hq, D)):
        raise ValueError(f"{name} must be [Hq, D] = [{Hq}, {D}], got {_shape(w)}")
    return w


def _check_feature_map(feature_map) -> str:
    if feature_map not in ("softmax", "relu"):
        raise ValueError(f"feature_map must be 'softmax' or 'relu', got '{feature_map}'")
    return feature_map


def _check_tiling(chunk_size, checkpoint_every):
    c = _static_int(chunk_size, "chunk_size")
    e = _static_int(checkpoint_every, "checkpoint_every")
    if not 1 <= c <= 1024:
        raise ValueError(f"chunk_size must be in [1, 1024], got {c}")
    if e < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {e}")
    if e > _INT64_MAX:
        raise ValueError(f"checkpoint_every must be an int in [1, {_INT64_MAX}], got {e}")
    if _on_cuda() and c != 64:
        raise ValueError(f"chunk_size: the CUDA RLA kernels use chunk_size=64, got {c}")
    return c, e


def _static_positive(value, name: str, why: str = "") -> float:
    """A static real number in (0, inf), as the torch API takes it (no bool, no string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number (static under jax.jit), got "
                        f"{type(value).__name__} {value!r}")
    try:
        x = float(value)
    except OverflowError:  # an int past the float range
        x = math.inf
    if not 0 < x < math.inf:
        raise ValueError(f"{name} must be a finite number > 0{why}, got {x}")
    return x


def _check_eps(norm_eps) -> float:
    return _static_positive(norm_eps, "norm_eps",
                            " (with 0 an all-zero branch output would mix in as NaN)")


def _scale(q, softmax_scale) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    return _static_positive(softmax_scale, "softmax_scale")


def _acc(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


# ---- vmap: fold a vmapped axis into the kernels' batch axis -----------------------------
# Per argument of a kernel call: "batch" (leading axis is B), "shared" (no batch axis: norm
# weights, rotary tables), "h0" (leading axis B or 1). Outputs: "batch" or "shared".
def _batchable(fn, in_kinds, out_kinds):
    """``fn(*arrays) -> tuple`` under ``jax.vmap``: when only per-batch arguments are vmapped
    (the usual case), the vmapped axis N is folded into B and the kernel runs once on N*B
    sequences; otherwise (a vmapped norm weight or rotary table, or a per-call reduction in
    the outputs) it runs once per vmapped index (``lax.map``)."""
    f = jax.custom_batching.custom_vmap(fn)

    @f.def_vmap
    def rule(axis_size, in_batched, *args):
        n = axis_size
        foldable = all(kind == "batch" for kind in out_kinds) and not any(
            b and kind == "shared" for b, kind in zip(in_batched, in_kinds))
        if not foldable:
            idx = [i for i, b in enumerate(in_batched) if b]

            def one(xs):
                full = list(args)
                for i, x in zip(idx, xs):
                    full[i] = x
                return f(*full)

            outs = jax.lax.map(one, tuple(args[i] for i in idx))
            return outs, tuple(True for _ in outs)
        ref = next(i for i, kind in enumerate(in_kinds) if kind == "batch")
        batch = args[ref].shape[1] if in_batched[ref] else args[ref].shape[0]
        folded = []
        for x, b, kind in zip(args, in_batched, in_kinds):
            if kind == "shared" or (x.ndim == 1 and not b):  # shared table / absent (0,)
                folded.append(x)
                continue
            if not b:
                x = jnp.broadcast_to(x, (n,) + x.shape)
            if kind == "h0" and x.shape[1] != batch:  # H0 broadcast over B
                x = jnp.broadcast_to(x, (n, batch) + x.shape[2:])
            folded.append(x.reshape((n * batch,) + x.shape[2:]))
        outs = f(*folded)
        # an absent output (no H0: its gradient) is the 1-D (0,); every other one has the
        # folded axis first, also when it is empty (T = 0)
        outs = tuple(jnp.zeros((n,) + o.shape, o.dtype) if o.ndim == 1 else o.reshape(
            (n, batch) + o.shape[1:]) for o in outs)
        return outs, tuple(True for _ in outs)

    return f


def _absent(dtype):
    """An optional kernel input that is not given: a zero-size buffer."""
    return jnp.zeros((0,), dtype)


def _ffi(op, results, *args, **attrs):
    # vmap never reaches the custom call (_batchable handles it); "sequential" is the
    # safe answer should it ever.
    return jax.ffi.ffi_call(f"rattention_{op}", results, vmap_method="sequential")(*args, **attrs)


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _num_checkpoints(T, chunk, every):
    n_chunks = (T + chunk - 1) // chunk
    return (n_chunks + every - 1) // every


# ---- one function per kernel ------------------------------------------------------------
def _swa_fwd(q, k, v, cos, sin, window_size, scale):
    def call(q, k, v, cos, sin):
        B, T, H, D = q.shape
        acc = _acc(q.dtype)
        return tuple(_ffi("swa_fwd", (_sds((B, T, H, D), acc), _sds((B, H, T), acc)),
                          q, k, v, cos, sin, window_size=np.int64(window_size),
                          softmax_scale=np.float64(scale)))
    acc = _acc(q.dtype)
    cos = _absent(acc) if cos is None else cos
    sin = _absent(acc) if sin is None else sin
    return _batchable(call, ("batch",) * 3 + ("shared",) * 2, ("batch",) * 2)(q, k, v, cos, sin)


def _swa_bwd(grad_out, grad_lse, q, k, v, out, lse, cos, sin, window_size, scale):
    def call(grad_out, grad_lse, q, k, v, out, lse, cos, sin):
        return tuple(_ffi("swa_bwd", (_sds(q.shape, q.dtype), _sds(k.shape, k.dtype),
                                      _sds(v.shape, v.dtype)),
                          grad_out, grad_lse, q, k, v, out, lse, cos, sin,
                          window_size=np.int64(window_size), softmax_scale=np.float64(scale)))
    acc = _acc(q.dtype)
    cos = _absent(acc) if cos is None else cos
    sin = _absent(acc) if sin is None else sin
    return _batchable(call, ("batch",) * 7 + ("shared",) * 2, ("batch",) * 3)(
        grad_out, grad_lse, q, k, v, out, lse, cos, sin)


def _rla_attrs(cfg):
    window_size, feature_map, chunk, every = cfg
    return dict(window_size=np.int64(window_size), feature_map=feature_map,
                chunk_size=np.int64(chunk), checkpoint_every=np.int64(every))


def _rla_fwd(q, k, v, h0, cfg):
    def call(q, k, v, h0):
        B, T, H, D = q.shape
        Hkv = k.shape[2]
        acc = _acc(q.dtype)
        n_ckpt = _num_checkpoints(T, cfg[2], cfg[3])
        return tuple(_ffi("rla_fwd", (_sds((B, T, H, D), acc), _sds((B, Hkv, 2 * D, D), acc),
                                      _sds((B, Hkv, n_ckpt, 2 * D, D), acc)),
                          q, k, v, h0, **_rla_attrs(cfg)))
    h0 = _absent(_acc(q.dtype)) if h0 is None else h0
    return _batchable(call, ("batch",) * 3 + ("h0",), ("batch",) * 3)(q, k, v, h0)


def _rla_bwd(grad_out, grad_final_state, q, k, v, h0, checkpoints, cfg):
    def call(grad_out, grad_final_state, q, k, v, h0, checkpoints):
        B, _, H, D = q.shape
        acc = _acc(q.dtype)
        gh0 = _sds((B, H, 2 * D, D) if h0.ndim == 4 else (0,), acc)  # (0,): no H0
        return tuple(_ffi("rla_bwd", (_sds(q.shape, q.dtype), _sds(k.shape, k.dtype),
                                      _sds(v.shape, v.dtype), gh0),
                          grad_out, grad_final_state, q, k, v, h0, checkpoints,
                          **_rla_attrs(cfg)))
    h0 = _absent(_acc(q.dtype)) if h0 is None else h0
    return _batchable(call, ("batch",) * 5 + ("h0", "batch"), ("batch",) * 4)(
        grad_out, grad_final_state, q, k, v, h0, checkpoints)


def _mix_fwd(o_swa, o_rla, swa_weight, rla_weight, eps, out_dtype):
    def call(o_swa, o_rla, swa_weight, rla_weight):
        return (_ffi("mix_fwd", _sds(o_swa.shape, out_dtype), o_swa, o_rla, swa_weight,
                     rla_weight, eps=np.float64(eps)),)
    return _batchable(call, ("batch", "batch", "shared", "shared"), ("batch",))(
        o_swa, o_rla, swa_weight, rla_weight)[0]


def _mix_bwd(grad_out, o_swa, o_rla, swa_weight, rla_weight, eps):
    def call(grad_out, o_swa, o_rla, swa_weight, rla_weight):
        acc = o_swa.dtype
        return tuple(_ffi("mix_bwd", (_sds(o_swa.shape, acc), _sds(o_swa.shape, acc),
                                      _sds(swa_weight.shape, acc), _sds(rla_weight.shape, acc)),
                          grad_out, o_swa, o_rla, swa_weight, rla_weight, eps=np.float64(eps)))
    # The weight gradients sum over the batch: a vmapped call runs once per index.
    return _batchable(call, ("batch",) * 3 + ("shared",) * 2,
                      ("batch", "batch", "shared", "shared"))(
        grad_out, o_swa, o_rla, swa_weight, rla_weight)


# ---- differentiable pieces (custom_vjp over the backward kernels) -----------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _swa(q, k, v, cos, sin, window_size, scale):
    return _swa_fwd(q, k, v, cos, sin, window_size, scale)


def _swa_vjp_fwd(q, k, v, cos, sin, window_size, scale):
    out, lse = _swa_fwd(q, k, v, cos, sin, window_size, scale)
    return (out, lse), (q, k, v, cos, sin, out, lse)


def _swa_vjp_bwd(window_size, scale, res, g):
    q, k, v, cos, sin, out, lse = res
    grad_out, grad_lse = g
    dq, dk, dv = _swa_bwd(grad_out.astype(out.dtype), grad_lse.astype(lse.dtype), q, k, v, out,
                          lse, cos, sin, window_size, scale)
    zero = lambda t: None if t is None else jnp.zeros_like(t)  # noqa: E731  (constants)
    return dq, dk, dv, zero(cos), zero(sin)


_swa.defvjp(_swa_vjp_fwd, _swa_vjp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _rla(q, k, v, h0, cfg):
    out, state, _ = _rla_fwd(q, k, v, h0, cfg)
    return out, state


def _rla_vjp_fwd(q, k, v, h0, cfg):
    out, state, checkpoints = _rla_fwd(q, k, v, h0, cfg)
    return (out, state), (q, k, v, h0, checkpoints)


def _rla_vjp_bwd(cfg, res, g):
    q, k, v, h0, checkpoints = res
    grad_out, grad_state = g
    dq, dk, dv, dh0 = _rla_bwd(grad_out.astype(checkpoints.dtype),
                               grad_state.astype(checkpoints.dtype), q, k, v, h0, checkpoints, cfg)
    if h0 is None:
        dh0 = None
    elif isinstance(h0.shape[0], int) and h0.shape[0] == 1:
        # H0 broadcast over the batch: its gradient sums over it (also when B is symbolic)
        dh0 = dh0.sum(axis=0, keepdims=True)
    return dq, dk, dv, dh0


_rla.defvjp(_rla_vjp_fwd, _rla_vjp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _mix(o_swa, o_rla, swa_weight, rla_weight, eps, out_dtype):
    return _mix_fwd(o_swa, o_rla, swa_weight, rla_weight, eps, out_dtype)


def _mix_vjp_fwd(o_swa, o_rla, swa_weight, rla_weight, eps, out_dtype):
    out = _mix_fwd(o_swa, o_rla, swa_weight, rla_weight, eps, out_dtype)
    return out, (o_swa, o_rla, swa_weight, rla_weight)


def _mix_vjp_bwd(eps, out_dtype, res, grad_out):
    o_swa, o_rla, swa_weight, rla_weight = res
    return _mix_bwd(grad_out, o_swa, o_rla, swa_weight, rla_weight, eps)


_mix.defvjp(_mix_vjp_fwd, _mix_vjp_bwd)


# ---- public API -------------------------------------------------------------------------
def sliding_window_attention(
    q,
    k,
    v,
    *,
    window_size: int,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    rotary_cos=None,
    rotary_sin=None,
):
    """Sliding-window softmax attention (the SWA branch alone), by the compiled kernel.

    Args:
        q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]`` with ``Hq % Hkv == 0``
            (float32, float64 or bfloat16, all the same dtype).
        window_size: left context ``w >= 0``; query ``t`` sees keys ``t-w .. t`` (static).
        softmax_scale: defaults to ``1/sqrt(D)`` (static).
        return_lse: also return the log-sum-exp ``[B, Hq, T]`` (float32; float64 for
            float64); it is differentiable too.
        rotary_cos, rotary_sin: optional ``[P >= T, D/2]`` tables, half-split (NeoX) rotary
            applied to q and k inside the kernel (constants: zero gradient).

    Returns:
        ``o [B, T, Hq, D]`` in q's dtype, or ``(o, lse)``. Differentiable in q, k, v.
    """
    q, k, v = _check_qkv(q, k, v)
    w = _check_window(window_size)
    cos, sin = _check_rotary(rotary_cos, rotary_sin, q)
    out, lse = _swa(q, k, v, cos, sin, w, _scale(q, softmax_scale))
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


def residual_linear_attention(
    q,
    k,
    v,
    *,
    window_size: int,
    feature_map: str = "softmax",
    initial_state=None,
    return_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
):
    """Residual linear attention (the RLA branch alone), by the compiled chunked kernel.

    ``o[t] = phi(q[t])^T (H0[h] + sum_{s <= t-w-1} phi(k[s]) v[s]^T)`` with
    ``phi(x) = [softmax(x), softmax(-x)]`` (``"softmax"``) or ``[relu(x), relu(-x)]``
    (``"relu"``); raw q/k (no rotary, no scale), no normaliser. This replaces the
    token-by-token scan of a JAX reference model on CPU.

    Args:
        q, k, v: as in :func:`sliding_window_attention`.
        window_size: the SWA window ``w``: RLA covers exactly the keys ``t - s >= w + 1``.
        feature_map: ``"softmax"`` or ``"relu"`` (static).
        initial_state: optional ``H0 [B or 1, Hq, 2D, D]`` (cast to float32; float64 for
            float64 inputs); differentiable.
        return_final_state: also return the state after all T tokens, ``[B, Hkv, 2D, D]``
            (tokens ``s <= T - w - 2``); gradients flow into it as well.
        chunk_size, checkpoint_every: tiling of the chunked kernel (static).

    Returns:
        ``o [B, T, Hq, D]`` in q's dtype, or ``(o, final_state)``.
    """
    q, k, v = _check_qkv(q, k, v)
    cfg = (_check_window(window_size), _check_feature_map(feature_map),
           *_check_tiling(chunk_size, checkpoint_every))
    h0 = _check_initial_state(initial_state, q)
    h0 = None if h0 is None else h0.astype(_acc(q.dtype))
    out, state = _rla(q, k, v, h0, cfg)
    out = out.astype(q.dtype)
    return (out, state) if return_final_state else out


def forward(
    q,
    k,
    v,
    *,
    window_size: int,
    feature_map: str = "softmax",
    softmax_scale: Optional[float] = None,
    swa_norm_weight=None,
    rla_norm_weight=None,
    norm_eps: float = 1e-8,
    initial_state=None,
    rotary_cos=None,
    rotary_sin=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
) -> Any:
    """RAttention: ``rms(SWA(q,k,v)) * g_swa + rms(RLA(q,k,v)) * g_rla`` per token and head.

    The same function as :func:`rattention_ext.forward`, on JAX arrays, by the same kernels.

    Args:
        q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]`` (GQA: query head h reads kv head h // G).
        window_size: SWA left context ``w``; RLA covers exactly the keys ``t - s >= w + 1``.
        feature_map: ``"softmax"`` (default) or ``"relu"`` for the RLA branch.
        softmax_scale: SWA scale, default ``1/sqrt(D)``.
        swa_norm_weight, rla_norm_weight: learned RMS-norm scales ``[Hq, D]`` (default ones).
        norm_eps: RMS-norm epsilon.
        initial_state: optional learned RLA prefix state ``[B or 1, Hq, 2D, D]``.
        rotary_cos, rotary_sin: optional ``[P >= T, D/2]`` rotary tables (SWA branch only).
        chunk_size, checkpoint_every: RLA tiling and state-saving interval.
        All but the arrays are static (``static_argnames`` under ``jax.jit``).

    Returns:
        ``[B, T, Hq, D]`` in q's dtype. Differentiable in q, k, v, initial_state and both
        norm weights. Branch outputs and mixing are computed in float32 (float64 for float64).
    """
    q, k, v = _check_qkv(q, k, v)
    w = _check_window(window_size)
    cfg = (w, _check_feature_map(feature_map), *_check_tiling(chunk_size, checkpoint_every))
    eps = _check_eps(norm_eps)
    scale = _scale(q, softmax_scale)  # checked before any kernel runs
    acc = _acc(q.dtype)
    cos, sin = _check_rotary(rotary_cos, rotary_sin, q)
    h0 = _check_initial_state(initial_state, q)
    h0 = None if h0 is None else h0.astype(acc)
    g_swa = _check_norm_weight(swa_norm_weight, "swa_norm_weight", q).astype(acc)
    g_rla = _check_norm_weight(rla_norm_weight, "rla_norm_weight", q).astype(acc)
    o_rla, _ = _rla(q, k, v, h0, cfg)
    o_swa, _ = _swa(q, k, v, cos, sin, w, scale)
    return _mix(o_swa, o_rla, g_swa, g_rla, eps, q.dtype)
