"""Fake (meta) kernels and autograd for the compiled ops in ``torch.ops.rattention_ext``.

The schemas live in C++ (csrc/ops.cpp); this file only teaches PyTorch how to trace
them (``register_fake``) and differentiate them (``register_autograd``, through the
registered backward ops). Nothing here validates inputs: the op layer does.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library and registers the ops)

ops = torch.ops.rattention_ext
lib = "rattention_ext"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _num_checkpoints(T: int, chunk: int, every: int) -> int:
    n_chunks = (T + chunk - 1) // chunk
    return (n_chunks + every - 1) // every


# Shapes of a dense ([B, T, H, D]) or packed ([total, H, D] with cu_seqlens) call. Sizes stay
# SymInts under tracing (floor division and sums only), so nothing specialises on T, total
# or the number of documents.
def _lse_shape(q, cu_seqlens):
    if cu_seqlens is None:
        B, T, H, _ = q.shape
        return (B, H, T)
    total, H, _ = q.shape
    return (H, total)


def _num_seqs(q, cu_seqlens):
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _checkpoint_shape(q, k, cu_seqlens, chunk, every):
    D, Hkv = q.shape[-1], k.shape[-2]
    if cu_seqlens is None:
        B, T = q.shape[0], q.shape[1]
        return (B, Hkv, _num_checkpoints(T, chunk, every), 2 * D, D)
    # csrc/core/params.h RlaCheckpointLayout: document b starts at slot cu[b] // (C*every) + b.
    total = q.shape[0]
    return (1, Hkv, total // (chunk * every) + _num_seqs(q, cu_seqlens), 2 * D, D)


# ---- fake kernels -----------------------------------------------------------------------
@torch.library.register_fake(f"{lib}::swa_fwd")
def _swa_fwd_fake(q, k, v, window_size, softmax_scale, rotary_cos, rotary_sin, cu_seqlens=None):
    acc = _acc(q.dtype)
    return q.new_empty(q.shape, dtype=acc), q.new_empty(_lse_shape(q, cu_seqlens), dtype=acc)


@torch.library.register_fake(f"{lib}::swa_mix_fwd")
def _swa_mix_fwd_fake(q, k, v, window_size, softmax_scale, rotary_cos, rotary_sin, o_rla,
                      swa_weight, rla_weight, eps, out_dtype, save_for_backward, cu_seqlens=None):
    acc = _acc(q.dtype)
    out = q.new_empty(q.shape, dtype=out_dtype)
    if not save_for_backward:
        return out, q.new_empty(0, dtype=acc), q.new_empty(0, dtype=acc)
    return (out, q.new_empty(q.shape, dtype=acc),
            q.new_empty(_lse_shape(q, cu_seqlens), dtype=acc))


@torch.library.register_fake(f"{lib}::swa_bwd")
def _swa_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, window_size, softmax_scale,
                  rotary_cos, rotary_sin, deterministic, cu_seqlens=None):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


@torch.library.register_fake(f"{lib}::rla_fwd")
def _rla_fwd_fake(q, k, v, window_size, feature_map, initial_state, chunk_size, checkpoint_every,
                  cu_seqlens=None, carried_state=None):
    D, Hkv = q.shape[-1], k.shape[-2]
    acc = _acc(q.dtype)
    return (q.new_empty(q.shape, dtype=acc),
            q.new_empty(_num_seqs(q, cu_seqlens), Hkv, 2 * D, D, dtype=acc),
            q.new_empty(_checkpoint_shape(q, k, cu_seqlens, chunk_size, checkpoint_every),
                        dtype=acc))


@torch.library.register_fake(f"{lib}::rla_bwd")
def _rla_bwd_fake(grad_out, grad_final_state, q, k, v, initial_state, checkpoints, window_size,
                  feature_map, chunk_size, checkpoint_every, cu_seqlens=None, carried_state=None):
    acc = _acc(q.dtype)
    gh0 = q.new_empty(0 if initial_state is None else initial_state.shape, dtype=acc)
    gcs = q.new_empty(0 if carried_state is None else carried_state.shape, dtype=acc)
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device), gh0, gcs)


@torch.library.register_fake(f"{lib}::mix_fwd")
def _mix_fwd_fake(o_swa, o_rla, swa_weight, rla_weight, eps, out_dtype):
    return torch.empty(o_swa.shape, dtype=out_dtype, device=o_swa.device)


@torch.library.register_fake(f"{lib}::mix_bwd")
def _mix_bwd_fake(grad_out, o_swa, o_rla, swa_weight, rla_weight, eps):
    H, D = o_swa.shape[-2], o_swa.shape[-1]
    return (torch.empty_like(o_swa, memory_format=torch.contiguous_format),
            torch.empty_like(o_swa, memory_format=torch.contiguous_format),
            o_swa.new_empty(H, D), o_swa.new_empty(H, D))


@torch.library.register_fake(f"{lib}::decode_step")
def _decode_step_fake(q, k, v, k_cache, v_cache, state, pos, feature_map, softmax_scale,
                      initial_state, rotary_cos, rotary_sin, swa_weight, rla_weight, eps):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


# ---- autograd ---------------------------------------------------------------------------
def _swa_setup(ctx, inputs, output):
    q, k, v, window_size, softmax_scale, rotary_cos, rotary_sin, cu_seqlens = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, rotary_cos, rotary_sin, cu_seqlens)
    ctx.window_size = window_size
    ctx.softmax_scale = softmax_scale


def _swa_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cos, sin, cu_seqlens = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = ops.swa_bwd(grad_out, grad_lse, q, k, v, out, lse, ctx.window_size,
                             ctx.softmax_scale, cos, sin, torch.are_deterministic_algorithms_enabled(),
                             cu_seqlens)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd(f"{lib}::swa_fwd", _swa_backward, setup_context=_swa_setup)


def _swa_mix_setup(ctx, inputs, output):
    (q, k, v, window_size, softmax_scale, rotary_cos, rotary_sin, o_rla, swa_weight, rla_weight,
     eps, _out_dtype, save_for_backward, cu_seqlens) = inputs
    _, o_swa, lse = output
    ctx.save_for_backward(q, k, v, rotary_cos, rotary_sin, o_swa, lse, o_rla, swa_weight,
                          rla_weight, cu_seqlens)
    ctx.args = (window_size, softmax_scale, eps, save_for_backward)


def _swa_mix_backward(ctx, grad_out, grad_o_swa, grad_lse):
    q, k, v, cos, sin, o_swa, lse, o_rla, ga, gb, cu_seqlens = ctx.saved_tensors
    window_size, softmax_scale, eps, saved = ctx.args
    if not saved:
        raise RuntimeError("rattention_ext.swa_mix_fwd: called with save_for_backward=False, so "
                           "the SWA output and lse needed for the backward were not kept; call "
                           "it with save_for_backward=True to differentiate")
    if grad_out is None:
        grad_out = torch.zeros_like(o_swa)
    # Mixing backward first: it gives the gradients flowing into both branch outputs.
    da, db, dga, dgb = ops.mix_bwd(grad_out, o_swa, o_rla, ga, gb, eps)
    if grad_o_swa is not None:
        da = da + grad_o_swa
    dq, dk, dv = ops.swa_bwd(da, grad_lse, q, k, v, o_swa, lse, window_size, softmax_scale, cos,
                             sin, torch.are_deterministic_algorithms_enabled(), cu_seqlens)
    return (dq, dk, dv, None, None, None, None, db, dga.to(ga.dtype), dgb.to(gb.dtype), None,
            None, None, None)


torch.library.register_autograd(f"{lib}::swa_mix_fwd", _swa_mix_backward,
                                setup_context=_swa_mix_setup)


def _rla_setup(ctx, inputs, output):
    (q, k, v, window_size, feature_map, initial_state, chunk_size, checkpoint_every, cu_seqlens,
     carried_state) = inputs
    _, _, checkpoints = output
    ctx.save_for_backward(q, k, v, initial_state, checkpoints, cu_seqlens, carried_state)
    ctx.args = (window_size, feature_map, chunk_size, checkpoint_every)
    ctx.h0_dtype = None if initial_state is None else initial_state.dtype
    ctx.carried_dtype = None if carried_state is None else carried_state.dtype


def _rla_backward(ctx, grad_out, grad_final_state, _grad_checkpoints):
    q, k, v, h0, checkpoints, cu_seqlens, carried = ctx.saved_tensors
    window_size, feature_map, chunk_size, checkpoint_every = ctx.args
    if grad_out is None:
        grad_out = q.new_zeros(q.shape, dtype=_acc(q.dtype))
    dq, dk, dv, dh0, dcs = ops.rla_bwd(grad_out, grad_final_state, q, k, v, h0, checkpoints,
                                       window_size, feature_map, chunk_size, checkpoint_every,
                                       cu_seqlens, carried)
    dh0 = dh0.to(ctx.h0_dtype) if h0 is not None else None
    dcs = dcs.to(ctx.carried_dtype) if carried is not None else None
    return dq, dk, dv, None, None, dh0, None, None, None, dcs


torch.library.register_autograd(f"{lib}::rla_fwd", _rla_backward, setup_context=_rla_setup)


def _mix_setup(ctx, inputs, output):
    o_swa, o_rla, swa_weight, rla_weight, eps, out_dtype = inputs
    ctx.save_for_backward(o_swa, o_rla, swa_weight, rla_weight)
    ctx.eps = eps


def _mix_backward(ctx, grad_out):
    o_swa, o_rla, ga, gb = ctx.saved_tensors
    da, db, dga, dgb = ops.mix_bwd(grad_out, o_swa, o_rla, ga, gb, ctx.eps)
    return da, db, dga.to(ga.dtype), dgb.to(gb.dtype), None, None


torch.library.register_autograd(f"{lib}::mix_fwd", _mix_backward, setup_context=_mix_setup)
