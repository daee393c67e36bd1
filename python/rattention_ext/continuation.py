"""Computing a chunk of a longer sequence from its halo and carried state (SPEC.md,
"Continuing a sequence").

A chunk of tokens starting at global position ``a`` is computed exactly as inside the whole
sequence from (1) the halo: the keys/values of the ``h = min(w + 1, a)`` tokens before it,
passed as the first ``h`` rows of ``k_ext``/``v_ext`` (attended to and shifted into RLA, no
output rows), and (2) the carried RLA state ``[B, Hkv, 2D, D]`` of the tokens
``s <= a - w - 2`` (one per KV head, beside the learned per-query-head ``H0``).

Context parallelism (``rattention_ext.distributed``) and chunked prefill
(``rattention_ext.prefill`` on a cache that already holds tokens) are both built on the
functions here, so the way the ops receive halo and carried state lives in one place.

Every function is differentiable (through the registered ops' backward).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._ops import ops
from .api import DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHUNK_SIZE, _acc, _norm_weight, _scale

__all__ = ["swa_continued", "rla_continued", "forward_continued", "state_sum", "feature_map"]

# Tokens per block when summing phi(k) v^T outside the kernels (bounds the temporary
# [B, block, Hkv, 2D] feature map).
_STATE_BLOCK = 2048


def feature_map(x: Tensor, kind: str) -> Tensor:
    """``phi(x) = [softmax(x), softmax(-x)]`` or ``[relu(x), relu(-x)]`` in the accumulation
    dtype (float32; float64 for float64)."""
    x = x.to(_acc(x.dtype))
    if kind == "softmax":
        return torch.cat([torch.softmax(x, dim=-1), torch.softmax(-x, dim=-1)], dim=-1)
    if kind == "relu":
        return torch.cat([torch.relu(x), torch.relu(-x)], dim=-1)
    raise ValueError(f"feature_map must be 'softmax' or 'relu', got {kind!r}")


# Device types whose kernels turned out not to take a halo / carried state (the op raised
# NotImplementedError); those use the copying path from then on.
_NO_HALO_KERNELS: set = set()


@functools.lru_cache(maxsize=None)
def _schema_takes_halo() -> bool:
    return "carried_state" in str(ops.rla_fwd.default._schema)


def _halo_ops(t: Tensor) -> bool:
    """Whether the compiled ops take the halo as leading k/v rows and a per-kv-head carried
    state on ``t``'s device. Otherwise the halo rows are padded into q (their outputs
    dropped) and the carried state goes in through ``initial_state``, once per query head:
    exact, but it copies."""
    return _schema_takes_halo() and t.device.type not in _NO_HALO_KERNELS


def _without_halo_kernels(t: Tensor) -> None:
    _NO_HALO_KERNELS.add(t.device.type)


def _pad_front(q: Tensor, rows: int) -> Tensor:
    # Query rows for the halo positions, outputs dropped. Zeros keep them finite for both
    # feature maps (an all-zero RLA row mixes in as zero).
    if rows == 0:
        return q
    pad = q.new_zeros(q.shape[0], rows, q.shape[2], q.shape[3])
    return torch.cat([pad, q], dim=1)


def _rotary_from(table: Optional[Tensor], offset: int, rows: int, name: str):
    if table is None:
        return None
    if table.dim() != 2 or table.shape[0] < offset + rows:
        raise ValueError(f"{name} must be [P, D/2] with a row for every global position up to "
                         f"{offset + rows - 1} (P >= {offset + rows}), got {list(table.shape)}")
    return table[offset:]


def swa_continued(q: Tensor, k_ext: Tensor, v_ext: Tensor, *, halo: int, window_size: int,
                  softmax_scale: Optional[float] = None, rotary_cos: Optional[Tensor] = None,
                  rotary_sin: Optional[Tensor] = None, position: int = 0) -> Tensor:
    """Sliding-window attention of a chunk continuing a sequence.

    Args:
        q: ``[B, T, Hq, D]`` the chunk's queries.
        k_ext, v_ext: ``[B, halo + T, Hkv, D]``: the halo rows, then the chunk's rows.
        halo: number of halo rows (``min(w + 1, start)`` for a chunk at global ``start``).
        position: global position of ``k_ext``'s first row (``start - halo``); rotary tables
            are global and read from that row on.

    Returns:
        ``o_swa [B, T, Hq, D]`` in the accumulation dtype.
    """
    T_ext = k_ext.shape[1]
    cos = _rotary_from(rotary_cos, position, T_ext, "rotary_cos")
    sin = _rotary_from(rotary_sin, position, T_ext, "rotary_sin")
    scale = _scale(q, softmax_scale)
    if halo == 0 or _halo_ops(q):
        try:
            return ops.swa_fwd(q, k_ext, v_ext, window_size, scale, cos, sin)[0]
        except NotImplementedError:
            _without_halo_kernels(q)
    out, _ = ops.swa_fwd(_pad_front(q, halo), k_ext, v_ext, window_size, scale, cos, sin)
    return out[:, halo:]


def rla_continued(q: Tensor, k_ext: Tensor, v_ext: Tensor, *, halo: int, window_size: int,
                  feature_map: str = "softmax", initial_state: Optional[Tensor] = None,
                  carried_state: Optional[Tensor] = None,
                  chunk_size: int = DEFAULT_CHUNK_SIZE,
                  checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY) -> Tuple[Tensor, Tensor]:
    """Residual linear attention of a chunk continuing a sequence.

    Args:
        q, k_ext, v_ext, halo: as for ``swa_continued``.
        initial_state: the learned ``H0 [B or 1, Hq, 2D, D]`` (or None).
        carried_state: ``[B, Hkv, 2D, D]`` sum of ``phi(k_s) v_s^T`` over the tokens before
            the halo (``s <= start - w - 2``), or None for none.

    Returns:
        ``(o_rla [B, T, Hq, D], final_state [B, Hkv, 2D, D])`` in the accumulation dtype; the
        final state includes the carried state (tokens ``s <= start + T - w - 2``).
    """
    if _halo_ops(q):
        try:
            out, final, _ = ops.rla_fwd(q, k_ext, v_ext, window_size, feature_map,
                                        initial_state, chunk_size, checkpoint_every, None,
                                        carried_state)
            return out, final
        except NotImplementedError:
            _without_halo_kernels(q)
    init = initial_state
    if carried_state is not None:
        # These ops take one state per query head; the group shares the carried one.
        carried = carried_state.repeat_interleave(q.shape[2] // k_ext.shape[2], dim=1)
        init = carried if init is None else init.to(carried.dtype) + carried
    out, final, _ = ops.rla_fwd(_pad_front(q, halo), k_ext, v_ext, window_size, feature_map, init,
                                chunk_size, checkpoint_every)
    if carried_state is not None:
        final = final + carried_state
    return (out[:, halo:] if halo else out), final


def state_sum_forward(k: Tensor, v: Tensor, kind: str) -> Tensor:
    """``sum_s phi(k_s) v_s^T`` over the rows of ``k``/``v`` (no autograd), block by block."""
    B, T, H, D = k.shape
    acc = _acc(k.dtype)
    state = k.new_zeros(B, H, 2 * D, D, dtype=acc)
    for t0 in range(0, T, _STATE_BLOCK):
        t1 = min(T, t0 + _STATE_BLOCK)
        state += torch.einsum("bshi,bshd->bhid", feature_map(k[:, t0:t1], kind),
                              v[:, t0:t1].to(acc))
    return state


def state_sum_backward(k: Tensor, v: Tensor, d_state: Tensor, kind: str) -> Tuple[Tensor, Tensor]:
    """Gradients of ``state_sum_forward`` w.r.t. ``k`` and ``v`` (dtypes of k, v); recomputes
    the feature map block by block instead of keeping it."""
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    acc = d_state.dtype
    for t0 in range(0, k.shape[1], _STATE_BLOCK):
        t1 = min(k.shape[1], t0 + _STATE_BLOCK)
        with torch.enable_grad():
            kb = k[:, t0:t1].detach().requires_grad_()
            phi = feature_map(kb, kind)
        vb = v[:, t0:t1].to(acc)
        dv[:, t0:t1] = torch.einsum("bshi,bhid->bshd", phi.detach(), d_state)
        d_phi = torch.einsum("bshd,bhid->bshi", vb, d_state)
        dk[:, t0:t1] = torch.autograd.grad(phi, kb, d_phi)[0]
    return dk, dv


class _StateSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, kind: str) -> Tensor:
        ctx.save_for_backward(k, v)
        ctx.kind = kind
        return state_sum_forward(k, v, kind)

    @staticmethod
    def backward(ctx, d_state: Tensor):
        k, v = ctx.saved_tensors
        dk, dv = state_sum_backward(k, v, d_state, ctx.kind)
        return dk, dv, None


def state_sum(k: Tensor, v: Tensor, kind: str) -> Tensor:
    """``sum over the rows s of phi(k_s) v_s^T`` per batch element and KV head:
    ``[B, Hkv, 2D, D]`` in the accumulation dtype; differentiable in ``k`` and ``v``."""
    return _StateSum.apply(k, v, kind)


def forward_continued(q: Tensor, k_ext: Tensor, v_ext: Tensor, *, halo: int, position: int,
                      window_size: int, carried_state: Optional[Tensor] = None,
                      feature_map: str = "softmax", softmax_scale: Optional[float] = None,
                      swa_norm_weight: Optional[Tensor] = None,
                      rla_norm_weight: Optional[Tensor] = None, norm_eps: float = 1e-8,
                      initial_state: Optional[Tensor] = None,
                      rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None,
                      chunk_size: int = DEFAULT_CHUNK_SIZE,
                      checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY) -> Tuple[Tensor, Tensor]:
    """``rattention_ext.forward`` of a chunk continuing a sequence: its rows of the whole
    sequence's output, and the RLA state after it.

    Args:
        q: ``[B, T, Hq, D]``; k_ext, v_ext: ``[B, halo + T, Hkv, D]`` (halo rows first).
        halo: ``min(w + 1, start)`` rows; position: global position of ``k_ext``'s first row.
        carried_state: ``[B, Hkv, 2D, D]`` state of the tokens before the halo, or None.
        The other keywords are ``forward``'s, with global rotary tables.

    Returns:
        ``(out [B, T, Hq, D] in q's dtype, final_state [B, Hkv, 2D, D])``.
    """
    o_swa = swa_continued(q, k_ext, v_ext, halo=halo, window_size=window_size,
                          softmax_scale=softmax_scale, rotary_cos=rotary_cos,
                          rotary_sin=rotary_sin, position=position)
    o_rla, final = rla_continued(q, k_ext, v_ext, halo=halo, window_size=window_size,
                                 feature_map=feature_map, initial_state=initial_state,
                                 carried_state=carried_state, chunk_size=chunk_size,
                                 checkpoint_every=checkpoint_every)
    out = ops.mix_fwd(o_swa.contiguous(), o_rla.contiguous(), _norm_weight(swa_norm_weight, q),
                      _norm_weight(rla_norm_weight, q), norm_eps, q.dtype)
    return out, final
