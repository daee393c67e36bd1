"""Decoding with a constant-size cache: ``RAttentionCache``, ``prefill``, ``decode_step``.

RAttention needs, per sequence and KV head, only the last ``w + 1`` keys and values (the
sliding window) and one ``[2D, D]`` float32 state (everything older, folded into the
residual linear attention). So the cache does not grow with the sequence::

    cache = RAttentionCache.empty(B, window_size=512, num_kv_heads=4, head_dim=128,
                                  dtype=torch.bfloat16, device="cuda")
    o = prefill(q, k, v, cache)                 # [B, T, ...] prompt; cache now at position T
    for _ in range(n_new):
        o = decode_step(q1, k1, v1, cache)      # [B, 1, ...] one token per sequence

Semantics (SPEC.md, "Decoding"): ``prefill`` of ``T`` tokens leaves exactly the cache that
``T`` calls of ``decode_step`` leave, and the outputs equal ``rattention_ext.forward`` on
the whole sequence token by token. Every sequence of the batch has its own position, so
a batch may hold prompts of different lengths (``prefill(..., seq_lens=...)``).

Keyword arguments (``feature_map``, ``softmax_scale``, ``swa_norm_weight``,
``rla_norm_weight``, ``norm_eps``, ``initial_state``, ``rotary_cos``, ``rotary_sin``) are
those of ``rattention_ext.forward`` and must be the same for the prefill and every decode
step of a sequence; the window comes from the cache. ``initial_state`` (H0) is not stored
in the cache: it is read at every step, like the norm weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor

from ._ops import ops
from .api import (DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHUNK_SIZE, _acc, _forward_packed,
                  _norm_weight, _nvtx, _scale, _swa_and_mix)
from .continuation import forward_continued
from .varlen import check_cu_seqlens, check_packed_qkv, seqlens

__all__ = ["RAttentionCache", "prefill", "decode_step", "cache_bytes"]

# forward()'s keywords that decode_step uses; chunk_size / checkpoint_every only tile the
# prefill's RLA kernel and are accepted (and ignored) by decode_step so that one dict of
# keywords can be passed to both.
_STEP_KWARGS = ("feature_map", "softmax_scale", "swa_norm_weight", "rla_norm_weight",
                "norm_eps", "initial_state", "rotary_cos", "rotary_sin")
_TILING_KWARGS = ("chunk_size", "checkpoint_every")


@dataclass
class RAttentionCache:
    """Decoding cache of one RAttention layer for a batch of sequences.

    All four tensors are updated in place by ``prefill`` and ``decode_step``.

    Attributes:
        keys: ``[B, w+1, Hkv, D]`` ring buffer of the last ``w + 1`` keys, stored raw (rotary
            is applied when they are read, at each key's own position). The token at
            position ``s`` lives in slot ``s % (w + 1)``.
        values: ``[B, w+1, Hkv, D]`` ring buffer of the values, same slots.
        state: ``[B, Hkv, 2D, D]`` residual-linear-attention state ``sum phi(k_s) v_s^T`` over
            the tokens that have left the window (``s <= positions - w - 2``); float32
            (float64 for float64 caches), whatever the cache dtype.
        positions: ``[B]`` int64, the position of each sequence's next token (= the number
            of tokens it has seen).
    """

    keys: Tensor
    values: Tensor
    state: Tensor
    positions: Tensor

    @classmethod
    def empty(cls, batch_size: int, window_size: int, num_kv_heads: int, head_dim: int, *,
              dtype: torch.dtype = torch.bfloat16,
              device: Optional[torch.device | str] = None) -> "RAttentionCache":
        """A cache with no tokens: zero ring buffers and state, all positions 0.

        Args:
            batch_size: ``B``, the number of sequences.
            window_size: the SWA left context ``w`` of the layer (the ring holds ``w + 1``).
            num_kv_heads: ``Hkv``; head_dim: ``D``.
            dtype: dtype of q/k/v the layer runs in (the ring buffers use it; the state is
                float32, or float64 for float64).
            device: where the cache lives (that of q/k/v).
        """
        for name, val, lo in (("batch_size", batch_size, 1), ("window_size", window_size, 0),
                              ("num_kv_heads", num_kv_heads, 1), ("head_dim", head_dim, 2)):
            if not isinstance(val, int) or val < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
        ring = (batch_size, window_size + 1, num_kv_heads, head_dim)
        return cls(
            keys=torch.zeros(ring, dtype=dtype, device=device),
            values=torch.zeros(ring, dtype=dtype, device=device),
            state=torch.zeros(batch_size, num_kv_heads, 2 * head_dim, head_dim, dtype=_acc(dtype),
                              device=device),
            positions=torch.zeros(batch_size, dtype=torch.int64, device=device),
        )

    @property
    def batch_size(self) -> int:
        """Number of sequences ``B``."""
        return self.keys.shape[0]

    @property
    def window_size(self) -> int:
        """SWA left context ``w`` (the ring holds ``w + 1`` tokens)."""
        return self.keys.shape[1] - 1

    @property
    def num_kv_heads(self) -> int:
        """``Hkv``."""
        return self.keys.shape[2]

    @property
    def head_dim(self) -> int:
        """``D``."""
        return self.keys.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the ring buffers (= that of q/k/v)."""
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (all four tensors)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.keys, self.values, self.state, self.positions))

    def reset(self) -> None:
        """Forget every sequence (zero everything, positions 0), keeping the memory."""
        for t in (self.keys, self.values, self.state, self.positions):
            t.zero_()


def _check_cache(cache: RAttentionCache, q: Tensor, k: Tensor, what: str,
                 batch_size: Optional[int] = None) -> None:
    """Cheap shape/dtype/device agreement checks with messages naming the mismatch (the op
    layer checks the rest: contiguity, the state's shape and dtype, positions)."""
    if not isinstance(cache, RAttentionCache):
        raise TypeError(f"{what}: cache must be a RAttentionCache, got {type(cache).__name__}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{what}: q must be [B, T, Hq, D] and k, v [B, T, Hkv, D], got q "
                         f"{list(q.shape)}, k {list(k.shape)}")
    if batch_size is not None:  # packed batch: one cache row per document of cu_seqlens
        if cache.batch_size != batch_size:
            raise ValueError(f"{what}: cache batch size {cache.batch_size} does not match the "
                             f"{batch_size} sequences of cu_seqlens")
    elif cache.batch_size != q.shape[0]:
        raise ValueError(f"{what}: cache batch size {cache.batch_size} does not match q's "
                         f"batch size {q.shape[0]}")
    if cache.num_kv_heads != k.shape[2]:
        raise ValueError(f"{what}: cache has {cache.num_kv_heads} kv heads but k has "
                         f"{k.shape[2]}")
    if cache.head_dim != q.shape[3] or cache.head_dim != k.shape[3]:
        raise ValueError(f"{what}: cache head dim {cache.head_dim} does not match q/k head dim "
                         f"{q.shape[3]}/{k.shape[3]}")
    if cache.dtype != q.dtype:
        raise ValueError(f"{what}: cache dtype {cache.dtype} does not match q's dtype {q.dtype}")
    if cache.device != q.device:
        raise ValueError(f"{what}: cache is on {cache.device} but q is on {q.device}")


def _split_kwargs(kwargs: dict, cache: RAttentionCache, what: str) -> dict:
    w = kwargs.pop("window_size", None)
    if w is not None and w != cache.window_size:
        raise ValueError(f"{what}: window_size={w} but the cache was made for window_size="
                         f"{cache.window_size}")
    unknown = set(kwargs) - set(_STEP_KWARGS) - set(_TILING_KWARGS)
    if unknown:
        raise TypeError(f"{what}: unexpected keyword argument(s) {sorted(unknown)}; accepted: "
                        f"{', '.join(_STEP_KWARGS + _TILING_KWARGS)}")
    return kwargs


def prefill(q: Tensor, k: Tensor, v: Tensor, cache: RAttentionCache, *,
            seq_lens: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
            max_seqlen: Optional[int] = None, **forward_kwargs) -> Tensor:
    """Run RAttention over a prompt and fill an empty cache as if it had been decoded.

    Args:
        q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]``, matching the cache's batch size, kv
            heads, head dim, dtype and device.
        cache: the layer's cache, updated in place. Empty (from ``RAttentionCache.empty``):
            the prompt starts at position 0. Already holding tokens (chunked prefill): the
            chunk continues each sequence from its position, its ring as the halo and its
            state as the carried state (SPEC.md, "Continuing a sequence"), exactly as one
            prefill of the whole prompt would; sequences may be at different positions.
        seq_lens: optional ``[B]`` integer lengths for a right-padded batch: sequence ``b``
            is ``q[b, :seq_lens[b]]``. Outputs at padded positions ``t >= seq_lens[b]`` are
            returned but meaningless (they attend to padding); outputs at real positions
            are exact, since attention is causal. Default: every sequence has length ``T``.
        cu_seqlens: instead of a padded batch, a packed one (``forward``'s varlen
            convention): q ``[total, Hq, D]``, k, v ``[total, Hkv, D]``, int32 offsets
            ``[N+1]`` with ``N`` = the cache's batch size; sequence ``b`` is tokens
            ``cu_seqlens[b] .. cu_seqlens[b+1] - 1`` (empty allowed) and its cache ends up as
            its own decode steps leave it. Not together with ``seq_lens``; needs an empty
            cache (continue a packed batch with a padded one, or decode).
        max_seqlen: optional longest sequence of the packed batch (checked).
        **forward_kwargs: keywords of ``rattention_ext.forward`` (``feature_map``,
            ``softmax_scale``, ``swa_norm_weight``, ``rla_norm_weight``, ``norm_eps``,
            ``initial_state``, ``rotary_cos``, ``rotary_sin``, ``chunk_size``,
            ``checkpoint_every``); the window comes from the cache (a ``window_size``
            keyword must equal it). Pass the same ones to every later ``decode_step``.

    Returns:
        ``forward(q, k, v, window_size=cache.window_size, **forward_kwargs)``, ``[B, T, Hq, D]``
        (for a continuing chunk: its rows of ``forward`` on the whole sequence so far;
        packed: ``forward(..., cu_seqlens=cu_seqlens)``, ``[total, Hq, D]``).

    Afterwards, for each sequence of length ``L``: ring slot ``s % (w+1)`` holds token ``s``
    for the last ``min(L, w+1)`` tokens (other slots keep their zeros), the state is
    ``sum_{s <= L-w-2} phi(k_s) v_s^T``, and ``cache.positions == L``; exactly what ``L``
    calls of ``decode_step`` leave.
    """
    if cu_seqlens is not None:
        if seq_lens is not None:
            raise ValueError("prefill: pass seq_lens (padded batch) or cu_seqlens (packed "
                             "batch), not both")
        return _prefill_packed(q, k, v, cache, cu_seqlens, max_seqlen, forward_kwargs)
    _check_cache(cache, q, k, "prefill")
    kw = _split_kwargs(dict(forward_kwargs), cache, "prefill")
    B, T = q.shape[0], q.shape[1]
    w = cache.window_size
    W1 = w + 1
    if seq_lens is not None:
        if not isinstance(seq_lens, Tensor) or seq_lens.dim() != 1 or seq_lens.shape[0] != B \
                or seq_lens.dtype.is_floating_point or seq_lens.dtype == torch.bool:
            raise ValueError(f"seq_lens must be an integer tensor [B={B}], got "
                             f"{seq_lens if not isinstance(seq_lens, Tensor) else (seq_lens.dtype, list(seq_lens.shape))}")
        lens = seq_lens.to(device=q.device, dtype=torch.int64)
        lo, hi = int(lens.min()), int(lens.max())  # one sync; prefill is not a hot loop
        if lo < 0 or hi > T:
            raise ValueError(f"seq_lens must lie in [0, T={T}], got min {lo}, max {hi}")
        uniform = lo == T
    else:
        lens = None
        uniform = True
    if bool((cache.positions != 0).any()):
        return _prefill_continue(q, k, v, cache, lens, kw)

    feature_map = kw.get("feature_map", "softmax")
    with _nvtx("rattention.prefill", q):
        # forward()'s composition, keeping the RLA final state of the same pass.
        o_rla, final_state, _ = ops.rla_fwd(q, k, v, w, feature_map, kw.get("initial_state"),
                                            kw.get("chunk_size", DEFAULT_CHUNK_SIZE),
                                            kw.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY))
        out = _swa_and_mix(q, k, v, o_rla, w, kw.get("softmax_scale"), kw.get("rotary_cos"),
                           kw.get("rotary_sin"), kw.get("swa_norm_weight"),
                           kw.get("rla_norm_weight"), kw.get("norm_eps", 1e-8))
        with torch.no_grad():
            _fill_cache(cache, k, v, lens, uniform, final_state, feature_map)
    return out


def _prefill_packed(q: Tensor, k: Tensor, v: Tensor, cache: RAttentionCache, cu_seqlens: Tensor,
                    max_seqlen: Optional[int], forward_kwargs: dict) -> Tensor:
    """``prefill`` of a packed batch: one packed forward (keeping its per-sequence RLA final
    states), then each sequence's ring filled from its own last ``w + 1`` tokens."""
    check_packed_qkv(q, k, v, "prefill")
    check_cu_seqlens(cu_seqlens, q.shape[0], q.device, max_seqlen=max_seqlen, what="prefill")
    _check_cache(cache, q[None], k[None], "prefill", batch_size=cu_seqlens.shape[0] - 1)
    kw = _split_kwargs(dict(forward_kwargs), cache, "prefill")
    if bool((cache.positions != 0).any()):
        raise ValueError("prefill needs an empty cache (all positions 0): prefilling a cache "
                         "that already holds tokens is not supported; decode the new tokens "
                         "with decode_step, or call cache.reset() first")
    feature_map = kw.get("feature_map", "softmax")
    with _nvtx("rattention.prefill", q):
        out, final_state = _forward_packed(
            q, k, v, cu_seqlens, max_seqlen, cache.window_size, feature_map,
            kw.get("softmax_scale"), kw.get("swa_norm_weight"), kw.get("rla_norm_weight"),
            kw.get("norm_eps", 1e-8), kw.get("initial_state"), kw.get("rotary_cos"),
            kw.get("rotary_sin"), kw.get("chunk_size", DEFAULT_CHUNK_SIZE),
            kw.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY))
        with torch.no_grad():
            _fill_ring_packed(cache, k, v, cu_seqlens)
            cache.state.copy_(final_state)
            cache.positions.copy_(seqlens(cu_seqlens))
    return out


def _fill_ring_packed(cache: RAttentionCache, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> None:
    """Ring slot ``j`` of sequence ``b`` gets its newest token ``s = j (mod w+1)``, if any."""
    total = k.shape[0]
    if total == 0:
        return
    W1 = cache.window_size + 1
    start = cu_seqlens[:-1].to(torch.int64)
    L = seqlens(cu_seqlens)
    j = torch.arange(W1, device=k.device)
    s = (L[:, None] - 1) - torch.remainder(L[:, None] - 1 - j[None, :], W1)  # [N, W1]
    valid = (s >= 0)[:, :, None, None]
    idx = (start[:, None] + s.clamp(min=0)).clamp(max=total - 1)
    cache.keys.copy_(torch.where(valid, k[idx], cache.keys))
    cache.values.copy_(torch.where(valid, v[idx], cache.values))


def _fill_cache(cache: RAttentionCache, k: Tensor, v: Tensor, lens: Optional[Tensor],
                uniform: bool, final_state: Tensor, feature_map: str) -> None:
    B, T = k.shape[0], k.shape[1]
    W1 = cache.window_size + 1
    dev = k.device
    L = torch.full((B,), T, dtype=torch.int64, device=dev) if lens is None else lens
    # Ring: slot j holds the newest position s < L with s = j (mod W1), if s >= 0.
    j = torch.arange(W1, device=dev)
    s = (L[:, None] - 1) - torch.remainder(L[:, None] - 1 - j[None, :], W1)  # [B, W1]
    valid = (s >= 0)[:, :, None, None]
    bidx = torch.arange(B, device=dev)[:, None]
    sc = s.clamp(min=0)
    cache.keys.copy_(torch.where(valid, k[bidx, sc], cache.keys))
    cache.values.copy_(torch.where(valid, v[bidx, sc], cache.values))
    # State: tokens s <= L - w - 2 (s < L - W1).
    if uniform:
        cache.state.copy_(final_state)  # the RLA kernel's own final state (tokens s < T - W1)
    else:
        n = max(0, T - W1)  # no sequence has a state token at or beyond T - W1
        state = torch.zeros_like(cache.state)
        chunk = 4096  # bound the [B, chunk, Hkv, 2D] feature map's memory
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            keep = (torch.arange(c0, c1, device=dev)[None, :] < (L[:, None] - W1))  # [B, c]
            phi = _phi(k[:, c0:c1], feature_map)  # [B, c, Hkv, 2D] acc
            phi = phi * keep[:, :, None, None].to(phi.dtype)
            vf = v[:, c0:c1].to(phi.dtype)
            state += torch.einsum("bshi,bshd->bhid", phi, vf)
        cache.state.copy_(state)
    cache.positions.copy_(L)


def _prefill_continue(q: Tensor, k: Tensor, v: Tensor, cache: RAttentionCache,
                      lens: Optional[Tensor], kw: dict) -> Tensor:
    """Chunked prefill: the chunk continues every sequence from the cache (ring = halo,
    state = carried state). Sequences at the same position are computed together."""
    B, T = q.shape[0], q.shape[1]
    W1 = cache.window_size + 1
    feature_map = kw.get("feature_map", "softmax")
    h0 = kw.get("initial_state")
    positions = cache.positions.tolist()
    out = None
    with _nvtx("rattention.prefill", q):
        for p in sorted(set(positions)):
            rows = torch.tensor([b for b in range(B) if positions[b] == p], device=q.device)
            every = rows.numel() == B
            pick = (lambda t: t) if every else (lambda t: t.index_select(0, rows))
            h = min(W1, p)
            slots = torch.arange(p - h, p, device=q.device) % W1  # ring slots, oldest first
            k_ext = torch.cat([pick(cache.keys).index_select(1, slots), pick(k)], dim=1)
            v_ext = torch.cat([pick(cache.values).index_select(1, slots), pick(v)], dim=1)
            h0_rows = h0 if h0 is None or h0.shape[0] == 1 or every else pick(h0)
            o, final = forward_continued(
                pick(q), k_ext, v_ext, halo=h, position=p - h, window_size=cache.window_size,
                carried_state=pick(cache.state), feature_map=feature_map,
                softmax_scale=kw.get("softmax_scale"), swa_norm_weight=kw.get("swa_norm_weight"),
                rla_norm_weight=kw.get("rla_norm_weight"), norm_eps=kw.get("norm_eps", 1e-8),
                initial_state=h0_rows, rotary_cos=kw.get("rotary_cos"),
                rotary_sin=kw.get("rotary_sin"),
                chunk_size=kw.get("chunk_size", DEFAULT_CHUNK_SIZE),
                checkpoint_every=kw.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY))
            if every:
                out = o
            else:
                if out is None:
                    out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], q.shape[3])
                out = out.index_copy(0, rows, o)
            with torch.no_grad():
                new_lens = None if lens is None else pick(lens)
                _continue_cache(cache, rows, every, k_ext.detach(), v_ext.detach(), p, h,
                                new_lens, final.detach(), feature_map)
    return out


def _continue_cache(cache: RAttentionCache, rows: Tensor, every: bool, k_ext: Tensor,
                    v_ext: Tensor, p: int, h: int, lens: Optional[Tensor], final_state: Tensor,
                    feature_map: str) -> None:
    """Cache after continuing sequences at position ``p`` by ``lens`` tokens (default all
    ``T``): ``k_ext``/``v_ext`` hold positions ``p - h ..``."""
    n, T_ext = k_ext.shape[0], k_ext.shape[1]
    W1 = cache.window_size + 1
    dev = k_ext.device
    L = torch.full((n,), T_ext - h, dtype=torch.int64, device=dev) if lens is None else lens
    end = p + L  # new positions
    j = torch.arange(W1, device=dev)
    s = (end[:, None] - 1) - torch.remainder(end[:, None] - 1 - j[None, :], W1)  # [n, W1]
    i = s - (p - h)  # row of k_ext holding position s
    valid = (i >= 0)[:, :, None, None]
    bidx = torch.arange(n, device=dev)[:, None]
    ic = i.clamp(min=0)
    old_k = cache.keys if every else cache.keys.index_select(0, rows)
    old_v = cache.values if every else cache.values.index_select(0, rows)
    new_k = torch.where(valid, k_ext[bidx, ic], old_k)
    new_v = torch.where(valid, v_ext[bidx, ic], old_v)
    if lens is None:
        state = final_state  # carried state + the rows that entered in this chunk
    else:
        # Rows of k_ext entering the state: i < h + L - W1 (positions s <= end - w - 2).
        state = cache.state.index_select(0, rows).clone()
        n_rows = max(0, T_ext - W1)
        for c0 in range(0, n_rows, 4096):
            c1 = min(n_rows, c0 + 4096)
            keep = torch.arange(c0, c1, device=dev)[None, :] < (h + L[:, None] - W1)
            phi = _phi(k_ext[:, c0:c1], feature_map) * keep[:, :, None, None]
            state += torch.einsum("bshi,bshd->bhid", phi, v_ext[:, c0:c1].to(phi.dtype))
    if every:
        cache.keys.copy_(new_k)
        cache.values.copy_(new_v)
        cache.state.copy_(state)
        cache.positions.copy_(end)
    else:
        cache.keys.index_copy_(0, rows, new_k)
        cache.values.index_copy_(0, rows, new_v)
        cache.state.index_copy_(0, rows, state.to(cache.state.dtype))
        cache.positions.index_copy_(0, rows, end)


def _phi(x: Tensor, kind: str) -> Tensor:
    x = x.to(_acc(x.dtype))
    if kind == "softmax":
        return torch.cat([torch.softmax(x, dim=-1), torch.softmax(-x, dim=-1)], dim=-1)
    if kind == "relu":
        return torch.cat([torch.relu(x), torch.relu(-x)], dim=-1)
    raise ValueError(f"feature_map must be 'softmax' or 'relu', got {kind!r}")


def decode_step(q: Tensor, k: Tensor, v: Tensor, cache: RAttentionCache,
                **forward_kwargs) -> Tensor:
    """Attend one new token per sequence and append it to the cache (in place).

    Args:
        q: ``[B, 1, Hq, D]``; k, v: ``[B, 1, Hkv, D]``: the token at each sequence's
            position ``cache.positions[b]`` (sequences may be at different positions).
        cache: the layer's ``RAttentionCache``; its ring, state and positions are updated.
        **forward_kwargs: as for ``prefill`` (``rattention_ext.forward``'s keywords; the
            window comes from the cache; ``chunk_size`` / ``checkpoint_every`` are accepted
            and ignored). ``rotary_cos``/``rotary_sin`` must have a row for every position
            reached.

    Returns:
        ``[B, 1, Hq, D]`` in q's dtype: row ``t = positions[b]`` of ``forward`` on the whole
        sequence.
    """
    _check_cache(cache, q, k, "decode_step")
    if q.shape[1] != 1 or k.shape[1] != 1:
        raise ValueError(f"decode_step takes one token per sequence: q must be [B, 1, Hq, D] "
                         f"and k, v [B, 1, Hkv, D], got q {list(q.shape)}, k {list(k.shape)}")
    kw = _split_kwargs(dict(forward_kwargs), cache, "decode_step")
    with _nvtx("rattention.decode_step", q):
        return ops.decode_step(
            q, k, v, cache.keys, cache.values, cache.state, cache.positions,
            kw.get("feature_map", "softmax"), _scale(q, kw.get("softmax_scale")),
            kw.get("initial_state"), kw.get("rotary_cos"), kw.get("rotary_sin"),
            _norm_weight(kw.get("swa_norm_weight"), q), _norm_weight(kw.get("rla_norm_weight"), q),
            kw.get("norm_eps", 1e-8))


_DTYPE_BYTES = {torch.float64: 8, torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def cache_bytes(num_kv_heads: int, head_dim: int, window_size: int, seq_len: int, *,
                dtype: torch.dtype = torch.bfloat16, num_layers: int = 1) -> Dict[str, int]:
    """Decoding-cache bytes per sequence after ``seq_len`` tokens, for ``num_layers`` layers.

    Returns a dict:
        ``rattention``: this package's cache: ring of ``w + 1`` keys and values in ``dtype``
            plus the ``[Hkv, 2D, D]`` float32 state (float64 for float64); independent of
            ``seq_len``. (The 8-byte position counter is not counted.)
        ``rattention_ring``, ``rattention_state``: its two parts.
        ``full_kv``: a full KV cache, ``2 * seq_len * Hkv * D`` elements.
        ``sliding_window``: a plain sliding-window cache of the same window, ``w + 1`` keys
            and values (what a local-attention-only layer needs).
    """
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_BYTES)}, got {dtype}")
    for name, val, lo in (("num_kv_heads", num_kv_heads, 1), ("head_dim", head_dim, 1),
                          ("window_size", window_size, 0), ("seq_len", seq_len, 0),
                          ("num_layers", num_layers, 1)):
        if not isinstance(val, int) or val < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
    e = _DTYPE_BYTES[dtype]
    acc_e = 8 if dtype == torch.float64 else 4
    ring = 2 * (window_size + 1) * num_kv_heads * head_dim * e
    state = num_kv_heads * 2 * head_dim * head_dim * acc_e
    return {
        "rattention": num_layers * (ring + state),
        "rattention_ring": num_layers * ring,
        "rattention_state": num_layers * state,
        "full_kv": num_layers * 2 * seq_len * num_kv_heads * head_dim * e,
        "sliding_window": num_layers * ring,
    }
