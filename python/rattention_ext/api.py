"""Public functional API: ``forward``, ``sliding_window_attention``, ``residual_linear_attention``.

Each is a thin composition of the registered ops (``torch.ops.rattention_ext.*``), so it
runs on whatever backend the inputs live on (CPU kernels, CUDA kernels), is
differentiable through the registered backward ops, and traces under ``torch.compile``.
Semantics: SPEC.md (window = left context ``w``; RLA sees exactly keys ``t - s >= w + 1``).
"""
from __future__ import annotations

import contextlib
from typing import Literal, Optional, Tuple, overload

import torch
from torch import Tensor

from . import _validate as check
from ._ops import call
from .varlen import check_cu_seqlens, check_packed_qkv, check_packed_state

# RLA chunk length and how often the forward saves a state for the backward to restart
# from ("flexible state saving"): memory for states is T / (chunk * every) states.
DEFAULT_CHUNK_SIZE = 64
DEFAULT_CHECKPOINT_EVERY = 4


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def _nvtx(name: str, t: Tensor):
    """NVTX range around an op on CUDA tensors (free otherwise and under torch.compile)."""
    if t.is_cuda and not torch.compiler.is_compiling():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


def _scale(q: Tensor, softmax_scale: Optional[float], what: str = "forward") -> float:
    return check.softmax_scale(what, softmax_scale, q.shape[-1])


_UNUSED = object()  # an argument the function does not take


def _check_common(what: str, q, k, v, window_size, packed: bool, *, feature_map=_UNUSED,
                  norm_eps=_UNUSED, rotary=(None, None), tiling=None, tensors=()):
    """Validate the Python scalars and optional tensors of a public call (the op layer checks
    tensor shapes, dtypes and devices). Returns (window_size, norm_eps, tiling)."""
    if not packed:
        check.qkv(what, q, k, v)
    window_size = check.window(what, window_size)
    if feature_map is not _UNUSED:
        check.feature_map(what, feature_map)
    if norm_eps is not _UNUSED:
        norm_eps = check.norm_eps(what, norm_eps)
    check.no_grad_tensor(what, "rotary_cos", rotary[0])
    check.no_grad_tensor(what, "rotary_sin", rotary[1])
    for name, t in tensors:
        check.optional_tensor(what, name, t)
    if tiling is not None:
        tiling = check.tiling(what, *tiling)
    return window_size, norm_eps, tiling


@overload
def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, *, window_size: int,
                             softmax_scale: Optional[float] = ..., return_lse: Literal[False] = ...,
                             rotary_cos: Optional[Tensor] = ..., rotary_sin: Optional[Tensor] = ...,
                             cu_seqlens: Optional[Tensor] = ...,
                             max_seqlen: Optional[int] = ...) -> Tensor: ...


@overload
def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, *, window_size: int,
                             softmax_scale: Optional[float] = ..., return_lse: Literal[True],
                             rotary_cos: Optional[Tensor] = ..., rotary_sin: Optional[Tensor] = ...,
                             cu_seqlens: Optional[Tensor] = ...,
                             max_seqlen: Optional[int] = ...) -> Tuple[Tensor, Tensor]: ...


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: int,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
):
    """Sliding-window softmax attention (the SWA branch alone).

    Args:
        q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]`` with ``Hq % Hkv == 0``.
        window_size: left context ``w >= 0``; query ``t`` sees keys ``t-w .. t``.
        softmax_scale: defaults to ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp ``[B, Hq, T]`` (float32; float64 for float64).
        rotary_cos, rotary_sin: optional ``[P >= T, D/2]`` tables, half-split (NeoX) rotary
            applied to q and k inside the kernel.
        cu_seqlens: packed batch (flash-attn varlen convention): int32 ``[N+1]`` document
            offsets on q's device; then q is ``[total, Hq, D]``, k, v ``[total, Hkv, D]``,
            each document is attended alone (the window never crosses a boundary, rotary
            rows restart at 0 in each), o is ``[total, Hq, D]`` and lse ``[Hq, total]``.
        max_seqlen: optional length of the longest document (checked, not required).

    Returns:
        ``o [B, T, Hq, D]`` in q's dtype, or ``(o, lse)``.
    """
    what = "sliding_window_attention"
    window_size, _, _ = _check_common(what, q, k, v, window_size, cu_seqlens is not None,
                                      rotary=(rotary_cos, rotary_sin))
    scale = _scale(q, softmax_scale, what)
    if cu_seqlens is not None:
        with _nvtx("rattention.sliding_window_attention", q):
            out, lse = _swa_packed(q, k, v, cu_seqlens, max_seqlen, window_size, scale,
                                   rotary_cos, rotary_sin)
        return (out, lse) if return_lse else out
    with _nvtx("rattention.sliding_window_attention", q):
        out, lse = call("swa_fwd", q, k, v, window_size, scale, rotary_cos, rotary_sin)
        out = out.to(q.dtype)
    return (out, lse) if return_lse else out


@overload
def residual_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, window_size: int,
                              feature_map: str = ..., initial_state: Optional[Tensor] = ...,
                              return_final_state: Literal[False] = ..., chunk_size: int = ...,
                              checkpoint_every: int = ..., cu_seqlens: Optional[Tensor] = ...,
                              max_seqlen: Optional[int] = ...) -> Tensor: ...


@overload
def residual_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, window_size: int,
                              feature_map: str = ..., initial_state: Optional[Tensor] = ...,
                              return_final_state: Literal[True], chunk_size: int = ...,
                              checkpoint_every: int = ..., cu_seqlens: Optional[Tensor] = ...,
                              max_seqlen: Optional[int] = ...) -> Tuple[Tensor, Tensor]: ...


def residual_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: int,
    feature_map: str = "softmax",
    initial_state: Optional[Tensor] = None,
    return_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
):
    """Residual linear attention (the RLA branch alone): keys outside the window only.

    ``o[t] = phi(q[t])^T (H0[h] + sum_{s <= t-w-1} phi(k[s]) v[s]^T)`` with
    ``phi(x) = [softmax(x), softmax(-x)]`` (``"softmax"``) or ``[relu(x), relu(-x)]``
    (``"relu"``); raw q/k (no rotary, no scale), no normaliser.

    Args:
        initial_state: optional ``H0 [B or 1, Hq, 2D, D]`` (float32; float64 for float64 inputs).
        return_final_state: also return the state after all T tokens, ``[B, Hkv, 2D, D]``
            (tokens ``s <= T - w - 2``; the last ``w + 1`` stay in the window). Gradients
            flow into it as well.
        chunk_size, checkpoint_every: tiling of the chunked kernel; the forward saves one
            state every ``checkpoint_every`` chunks for the backward.
        cu_seqlens, max_seqlen: packed batch, as for ``sliding_window_attention``; then
            ``initial_state`` is ``[N or 1, Hq, 2D, D]`` (each document's state starts from
            its own H0, the shift never crosses a boundary), o is ``[total, Hq, D]`` and the
            final state ``[N, Hkv, 2D, D]`` (zero for an empty document).

    Returns:
        ``o [B, T, Hq, D]`` in q's dtype, or ``(o, final_state)``.
    """
    what = "residual_linear_attention"
    window_size, _, (chunk_size, checkpoint_every) = _check_common(
        what, q, k, v, window_size, cu_seqlens is not None, feature_map=feature_map,
        tiling=(chunk_size, checkpoint_every), tensors=(("initial_state", initial_state),))
    if cu_seqlens is not None:
        with _nvtx("rattention.residual_linear_attention", q):
            out, state = _rla_packed(q, k, v, cu_seqlens, max_seqlen, window_size, feature_map,
                                     initial_state, chunk_size, checkpoint_every)
        out = out.to(q.dtype)
        return (out, state) if return_final_state else out
    with _nvtx("rattention.residual_linear_attention", q):
        out, state, _ = call("rla_fwd", q, k, v, window_size, feature_map, initial_state,
                             chunk_size, checkpoint_every)
        out = out.to(q.dtype)
    return (out, state) if return_final_state else out


def _norm_weight(w: Optional[Tensor], q: Tensor) -> Tensor:
    if w is not None:
        return w
    return torch.ones(q.shape[-2], q.shape[-1], dtype=_acc(q.dtype), device=q.device)


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: int,
    feature_map: str = "softmax",
    softmax_scale: Optional[float] = None,
    swa_norm_weight: Optional[Tensor] = None,
    rla_norm_weight: Optional[Tensor] = None,
    norm_eps: float = 1e-8,
    initial_state: Optional[Tensor] = None,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> Tensor:
    """RAttention: ``rms(SWA(q,k,v)) * g_swa + rms(RLA(q,k,v)) * g_rla`` per token and head.

    Args:
        q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]`` (GQA: query head h reads kv head h // G).
        window_size: SWA left context ``w``; RLA covers exactly the keys ``t - s >= w + 1``.
        feature_map: ``"softmax"`` (default) or ``"relu"`` for the RLA branch.
        softmax_scale: SWA scale, default ``1/sqrt(D)``.
        swa_norm_weight, rla_norm_weight: learned RMS-norm scales ``[Hq, D]`` (default ones).
        norm_eps: RMS-norm epsilon, a finite number > 0.
        initial_state: optional learned RLA prefix state ``[B or 1, Hq, 2D, D]``.
        rotary_cos, rotary_sin: optional ``[P >= T, D/2]`` rotary tables (SWA branch only).
        chunk_size, checkpoint_every: RLA tiling and state-saving interval.
        cu_seqlens: packed batch (flash-attn varlen convention): int32 ``[N+1]`` document
            offsets (``0``, non-decreasing, last = total; empty documents allowed) on q's
            device. Then q is ``[total, Hq, D]``, k, v ``[total, Hkv, D]``,
            ``initial_state`` ``[N or 1, Hq, 2D, D]``, and the output ``[total, Hq, D]``;
            every document is computed exactly as if it were alone (window, RLA shift and
            state stay inside it; rotary rows are positions inside the document).
        max_seqlen: optional length of the longest document (checked, not required).

    Returns:
        ``[B, T, Hq, D]`` in q's dtype. Differentiable in q, k, v, initial_state and both
        norm weights. Branch outputs and mixing are computed in float32 (float64 for float64).
    """
    what = "forward"
    window_size, norm_eps, (chunk_size, checkpoint_every) = _check_common(
        what, q, k, v, window_size, cu_seqlens is not None, feature_map=feature_map,
        norm_eps=norm_eps, rotary=(rotary_cos, rotary_sin), tiling=(chunk_size, checkpoint_every),
        tensors=(("swa_norm_weight", swa_norm_weight), ("rla_norm_weight", rla_norm_weight),
                 ("initial_state", initial_state)))
    softmax_scale = _scale(q, softmax_scale, what)
    if cu_seqlens is not None:
        with _nvtx("rattention.forward", q):
            out, _ = _forward_packed(q, k, v, cu_seqlens, max_seqlen, window_size, feature_map,
                                     softmax_scale, swa_norm_weight, rla_norm_weight, norm_eps,
                                     initial_state, rotary_cos, rotary_sin, chunk_size,
                                     checkpoint_every)
        return out
    with _nvtx("rattention.forward", q):
        o_rla, _, _ = call("rla_fwd", q, k, v, window_size, feature_map, initial_state,
                           chunk_size, checkpoint_every)
        return _swa_and_mix(q, k, v, o_rla, window_size, softmax_scale, rotary_cos, rotary_sin,
                            swa_norm_weight, rla_norm_weight, norm_eps)


def _swa_and_mix(q, k, v, o_rla, window_size, softmax_scale, rotary_cos, rotary_sin,
                 swa_norm_weight, rla_norm_weight, norm_eps, cu_seqlens=None) -> Tensor:
    """SWA branch and the mixing in one op (``swa_mix_fwd``; fused into the SWA kernel's
    epilogue on CUDA). The SWA output and lse are kept only when a gradient may be asked for.
    ``softmax_scale`` is already resolved to a float and the arguments validated."""
    g_swa = _norm_weight(swa_norm_weight, q)
    g_rla = _norm_weight(rla_norm_weight, q)
    save = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, o_rla, g_swa, g_rla))
    out, _, _ = call("swa_mix_fwd", q, k, v, window_size, softmax_scale, rotary_cos, rotary_sin,
                     o_rla, g_swa, g_rla, norm_eps, q.dtype, save, cu_seqlens)
    return out


# ---- packed batches ---------------------------------------------------------------------
# One call to the packed ops (cu_seqlens): the kernels schedule over (document, tile), so
# neither padding nor a loop over documents is needed.
def _check_packed(q, k, v, cu_seqlens, max_seqlen, initial_state, what) -> None:
    """Shapes of a packed batch and its ``cu_seqlens`` (values too, unless compiling)."""
    check_packed_qkv(q, k, v, what)
    check_cu_seqlens(cu_seqlens, q.shape[0], q.device, max_seqlen=max_seqlen, what=what)
    check_packed_state(initial_state, cu_seqlens.shape[0] - 1, what)


def _swa_packed(q, k, v, cu_seqlens, max_seqlen, window_size, scale, cos, sin):
    _check_packed(q, k, v, cu_seqlens, max_seqlen, None, "sliding_window_attention")
    out, lse = call("swa_fwd", q, k, v, window_size, scale, cos, sin, cu_seqlens)
    return out.to(q.dtype), lse


def _rla_packed(q, k, v, cu_seqlens, max_seqlen, window_size, feature_map, initial_state,
                chunk_size, checkpoint_every):
    """Packed RLA output (accumulation dtype) and final states ``[N, Hkv, 2D, D]``."""
    _check_packed(q, k, v, cu_seqlens, max_seqlen, initial_state, "residual_linear_attention")
    out, state, _ = call("rla_fwd", q, k, v, window_size, feature_map, initial_state, chunk_size,
                              checkpoint_every, cu_seqlens)
    return out, state


def _forward_packed(q, k, v, cu_seqlens, max_seqlen, window_size, feature_map, softmax_scale,
                    swa_norm_weight, rla_norm_weight, norm_eps, initial_state, rotary_cos,
                    rotary_sin, chunk_size, checkpoint_every):
    """Packed ``forward``: the output ``[total, Hq, D]`` and the RLA final states."""
    o_rla, states = _rla_packed(q, k, v, cu_seqlens, max_seqlen, window_size, feature_map,
                                initial_state, chunk_size, checkpoint_every)
    out = _swa_and_mix(q, k, v, o_rla, window_size, softmax_scale, rotary_cos, rotary_sin,
                       swa_norm_weight, rla_norm_weight, norm_eps, cu_seqlens)
    return out, states
