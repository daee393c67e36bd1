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

Gradients: ``prefill`` is differentiable like ``forward`` (the cache is filled without
gradients); ``decode_step`` is inference only and raises if an input requires grad while
grad mode is on (run decoding under ``torch.no_grad()`` / ``torch.inference_mode()``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor

from . import _validate as check
from ._ops import call, ops
from .api import (DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHUNK_SIZE, _acc, _forward_packed,
                  _norm_weight, _nvtx, _scale, _swa_and_mix)
from .continuation import forward_continued
from .varlen import check_cu_seqlens, check_packed_qkv, seqlens

__all__ = ["RAttentionCache", "prefill", "decode_step", "cache_bytes"]

# dtypes and head dims the cache can hold per backend (those of the kernels).
_CACHE_DTYPES = {"cpu": (torch.float32, torch.float64, torch.bfloat16),
                 "cuda": (torch.bfloat16, torch.float16)}
_ANY_CACHE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_CUDA_HEAD_DIMS = (64, 128)
_MAX_HEAD_DIM = 256


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
    # Host-side upper bound of max(positions), kept by prefill / decode_step so callers that
    # size tables by position (nn.RAttention.step's rotary tables) need no device sync.
    max_position: int = field(default=0, compare=False)

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
        what = "RAttentionCache.empty"
        check.check_int(what, "batch_size", batch_size, 0)
        check.check_int(what, "window_size", window_size, 0, 2**40)
        check.check_int(what, "num_kv_heads", num_kv_heads, 1)
        check.check_int(what, "head_dim", head_dim, 2, _MAX_HEAD_DIM)
        if head_dim % 2:
            raise ValueError(f"rattention_ext.{what}: head_dim must be even, got {head_dim}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"rattention_ext.{what}: dtype must be a torch.dtype, got {dtype!r}")
        # devices without kernels of ours (meta, ...): at least a floating dtype some backend has
        allowed = _CACHE_DTYPES.get(dev.type, _ANY_CACHE_DTYPES)
        if dtype not in allowed:
            raise ValueError(f"rattention_ext.{what}: dtype {dtype} is not supported on "
                             f"{dev.type}; the {dev.type} kernels take "
                             f"{', '.join(str(d) for d in allowed)}")
        if dev.type == "cuda" and head_dim not in _CUDA_HEAD_DIMS:
            raise ValueError(f"rattention_ext.{what}: head_dim {head_dim} is not supported on "
                             f"cuda; the CUDA kernels take head dims {_CUDA_HEAD_DIMS}")
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
        self.max_position = 0


def _check_cache(cache: RAttentionCache, q: Tensor, k: Tensor, what: str,
                 batch_size: Optional[int] = None) -> None:
    """Cheap shape/dtype/device agreement checks with messages naming the mismatch (the op
    layer checks the rest: contiguity, the state's shape and dtype, positions)."""
    if not isinstance(cache, RAttentionCache):
        raise TypeError(f"rattention_ext.{what}: cache must be a RAttentionCache, got {type(cache).__name__}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rattention_ext.{what}: q must be [B, T, Hq, D] and k, v [B, T, Hkv, D], got q "
                         f"{list(q.shape)}, k {list(k.shape)}")
    if batch_size is not None:  # packed batch: one cache row per document of cu_seqlens
        if cache.batch_size != batch_size:
            raise ValueError(f"rattention_ext.{what}: cache batch size {cache.batch_size} does not match the "
                             f"{batch_size} sequences of cu_seqlens")
    elif cache.batch_size != q.shape[0]:
        raise ValueError(f"rattention_ext.{what}: cache batch size {cache.batch_size} does not match q's "
                         f"batch size {q.shape[0]}")
    if cache.num_kv_heads != k.shape[2]:
        raise ValueError(f"rattention_ext.{what}: cache has {cache.num_kv_heads} kv heads but k has "
                         f"{k.shape[2]}")
    if cache.head_dim != q.shape[3] or cache.head_dim != k.shape[3]:
        raise ValueError(f"rattention_ext.{what}: cache head dim {cache.head_dim} does not match q/k head dim "
                         f"{q.shape[3]}/{k.shape[3]}")
    if cache.dtype != q.dtype:
        raise ValueError(f"rattention_ext.{what}: cache dtype {cache.dtype} does not match q's dtype {q.dtype}")
    if cache.device != q.device:
        raise ValueError(f"rattention_ext.{what}: cache is on {cache.device} but q is on {q.device}")


def _check_window_kwarg(window_size, cache: RAttentionCache, what: str) -> None:
    if window_size is not None and check.window(what, window_size) != cache.window_size:
        raise ValueError(f"rattention_ext.{what}: window_size={window_size} but the cache was "
                         f"made for window_size={cache.window_size}")


def _forward_keywords(what: str, q: Tensor, cache: RAttentionCache, window_size, feature_map,
                      softmax_scale, swa_norm_weight, rla_norm_weight, norm_eps, initial_state,
                      rotary_cos, rotary_sin, chunk_size, checkpoint_every) -> dict:
    """Validated forward() keywords as one dict (softmax_scale resolved to a float)."""
    _check_window_kwarg(window_size, cache, what)
    check.feature_map(what, feature_map)
    for name, t in (("swa_norm_weight", swa_norm_weight), ("rla_norm_weight", rla_norm_weight),
                    ("initial_state", initial_state)):
        check.optional_tensor(what, name, t)
    check.no_grad_tensor(what, "rotary_cos", rotary_cos)
    check.no_grad_tensor(what, "rotary_sin", rotary_sin)
    chunk_size, checkpoint_every = check.tiling(what, chunk_size, checkpoint_every)
    return dict(feature_map=feature_map, softmax_scale=_scale(q, softmax_scale, what),
                swa_norm_weight=swa_norm_weight, rla_norm_weight=rla_norm_weight,
                norm_eps=check.norm_eps(what, norm_eps), initial_state=initial_state,
                rotary_cos=rotary_cos, rotary_sin=rotary_sin, chunk_size=chunk_size,
                checkpoint_every=checkpoint_every)


def prefill(q: Tensor, k: Tensor, v: Tensor, cache: RAttentionCache, *,
            seq_lens: Optional[Tensor] = None,
            cu_seqlens: Optional[Tensor] = None,
            max_seqlen: Optional[int] = None,
            window_size: Optional[int] = None,
            feature_map: str = "softmax",
            softmax_scale: Optional[float] = None,
            swa_norm_weight: Optional[Tensor] = None,
            rla_norm_weight: Optional[Tensor] = None,
            norm_eps: float = 1e-8,
            initial_state: Optional[Tensor] = None,
            rotary_cos: Optional[Tensor] = None,
            rotary_sin: Optional[Tensor] = None,
            chunk_size: int = DEFAULT_CHUNK_SIZE,
            checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY) -> Tensor:
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
            are exact, since attention is causal, whatever the padding holds (NaN
            included). Default: every sequence has length ``T``.
        cu_seqlens: instead of a padded batch, a packed one (``forward``'s varlen
            convention): q ``[total, Hq, D]``, k, v ``[total, Hkv, D]``, int32 offsets
            ``[N+1]`` with ``N`` = the cache's batch size; sequence ``b`` is tokens
            ``cu_seqlens[b] .. cu_seqlens[b+1] - 1`` (empty allowed) and its cache ends up as
            its own decode steps leave it. Not together with ``seq_lens``; needs an empty
            cache (continue a packed batch with a padded one, or decode).
        max_seqlen: optional longest sequence of the packed batch (checked).
        window_size: optional; must equal the cache's window (which is what is used).
        feature_map, softmax_scale, swa_norm_weight, rla_norm_weight, norm_eps,
        initial_state, rotary_cos, rotary_sin, chunk_size, checkpoint_every: as for
            ``rattention_ext.forward``. Pass the same ones to every later ``decode_step``.

    Returns:
        ``forward(q, k, v, window_size=cache.window_size, ...keywords)``, ``[B, T, Hq, D]``
        (for a continuing chunk: its rows of ``forward`` on the whole sequence so far;
        packed: ``forward(..., cu_seqlens=cu_seqlens)``, ``[total, Hq, D]``).

    Afterwards, for each sequence of length ``L``: ring slot ``s % (w+1)`` holds token ``s``
    for the last ``min(L, w+1)`` tokens (other slots keep their zeros), the state is
    ``sum_{s <= L-w-2} phi(k_s) v_s^T``, and ``cache.positions == L``; exactly what ``L``
    calls of ``decode_step`` leave. ``T = 0`` is allowed (nothing changes).

    Under ``torch.compile`` a prefill into an empty cache traces as one graph
    (``fullgraph=True``): emptiness is read from the host-side ``cache.max_position``, and
    the checks that need the data (seq_lens range) run in eager mode only.
    """
    what = "prefill"
    kw = _forward_keywords(what, q, cache, window_size, feature_map, softmax_scale,
                           swa_norm_weight, rla_norm_weight, norm_eps, initial_state, rotary_cos,
                           rotary_sin, chunk_size, checkpoint_every)
    if cu_seqlens is not None:
        if seq_lens is not None:
            raise ValueError("rattention_ext.prefill: pass seq_lens (padded batch) or cu_seqlens "
                             "(packed batch), not both")
        return _prefill_packed(q, k, v, cache, cu_seqlens, max_seqlen, kw)
    check.qkv(what, q, k, v)
    _check_cache(cache, q, k, what)
    B, T = q.shape[0], q.shape[1]
    w = cache.window_size
    eager = not torch.compiler.is_compiling()
    lens = None
    if seq_lens is not None:
        if not isinstance(seq_lens, Tensor) or seq_lens.dim() != 1 or seq_lens.shape[0] != B \
                or seq_lens.dtype.is_floating_point or seq_lens.dtype.is_complex \
                or seq_lens.dtype == torch.bool:
            got = (seq_lens if not isinstance(seq_lens, Tensor)
                   else (seq_lens.dtype, list(seq_lens.shape)))
            raise ValueError(f"rattention_ext.prefill: seq_lens must be an integer tensor "
                             f"[B={B}], got {got}")
        lens = seq_lens.to(device=q.device, dtype=torch.int64)
        if eager and B > 0:
            lo, hi = int(lens.min()), int(lens.max())  # one sync; prefill is not a hot loop
            if lo < 0 or hi > T:
                raise ValueError(f"rattention_ext.prefill: seq_lens must lie in [0, T={T}], got "
                                 f"min {lo}, max {hi}")
    if _holds_tokens(cache):
        out = _prefill_continue(q, k, v, cache, lens, kw)
        cache.max_position += T
        return out

    with _nvtx("rattention.prefill", q):
        # forward()'s composition, keeping the RLA final state of the same pass.
        o_rla, final_state, _ = call("rla_fwd", q, k, v, w, kw["feature_map"],
                                     kw["initial_state"], kw["chunk_size"],
                                     kw["checkpoint_every"])
        out = _swa_and_mix(q, k, v, o_rla, w, kw["softmax_scale"], kw["rotary_cos"],
                           kw["rotary_sin"], kw["swa_norm_weight"], kw["rla_norm_weight"],
                           kw["norm_eps"])
        with torch.no_grad():
            _fill_cache(cache, k, v, lens, final_state, kw["feature_map"])
    cache.max_position = max(cache.max_position, T)  # an upper bound of positions.max()
    return out


def _holds_tokens(cache: RAttentionCache) -> bool:
    """Whether some sequence of the cache has a token. ``max_position`` (host side) is an
    upper bound of the positions, so 0 means empty without reading the device; otherwise
    (eager) the positions are read."""
    if cache.max_position == 0:
        return False
    return bool((cache.positions != 0).any())


def _prefill_packed(q: Tensor, k: Tensor, v: Tensor, cache: RAttentionCache, cu_seqlens: Tensor,
                    max_seqlen: Optional[int], kw: dict) -> Tensor:
    """``prefill`` of a packed batch: one packed forward (keeping its per-sequence RLA final
    states), then each sequence's ring filled from its own last ``w + 1`` tokens."""
    check_packed_qkv(q, k, v, "prefill")
    check_cu_seqlens(cu_seqlens, q.shape[0], q.device, max_seqlen=max_seqlen, what="prefill")
    _check_cache(cache, q[None], k[None], "prefill", batch_size=cu_seqlens.shape[0] - 1)
    if _holds_tokens(cache):
        raise ValueError("rattention_ext.prefill: prefill needs an empty cache (all positions 0): prefilling a cache "
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
    cache.max_position = max(cache.max_position, q.shape[0])
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
                final_state: Tensor, feature_map: str) -> None:
    B, T = k.shape[0], k.shape[1]
    W1 = cache.window_size + 1
    dev = k.device
    if T == 0:
        return  # nothing to store; positions stay 0
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
    if lens is None:
        cache.state.copy_(final_state)  # the RLA kernel's own final state (tokens s < T - W1)
    else:
        # Per-sequence lengths: the state sums only each sequence's own tokens. Padding is
        # selected away (torch.where), never multiplied by zero, so NaN/Inf padding (e.g. from
        # torch.empty) cannot reach it. The same computation for every length keeps this
        # free of data-dependent branches.
        state = torch.zeros_like(cache.state)
        # Blocks of rows bound the [B, block, Hkv, 2D] feature map's memory; traced, one
        # block of all T rows (a loop over a symbolic T would specialise the graph on it).
        block = 4096
        bounds = ([(0, T)] if torch.compiler.is_compiling() else
                  [(c0, min(T, c0 + block)) for c0 in range(0, T, block)])
        for c0, c1 in bounds:
            keep = (torch.arange(c0, c1, device=dev)[None, :] < (L[:, None] - W1))  # [B, c]
            keep = keep[:, :, None, None]
            phi = _phi(k[:, c0:c1], feature_map)  # [B, c, Hkv, 2D] acc
            phi = torch.where(keep, phi, torch.zeros((), dtype=phi.dtype, device=dev))
            vf = v[:, c0:c1].to(phi.dtype)
            vf = torch.where(keep, vf, torch.zeros((), dtype=vf.dtype, device=dev))
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
            keep = keep[:, :, None, None]
            zero = torch.zeros((), dtype=state.dtype, device=dev)
            # Selected, never multiplied by zero: NaN/Inf padding cannot reach the state.
            phi = torch.where(keep, _phi(k_ext[:, c0:c1], feature_map), zero)
            vf = torch.where(keep, v_ext[:, c0:c1].to(phi.dtype), zero)
            state += torch.einsum("bshi,bshd->bhid", phi, vf)
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
    raise ValueError(f"rattention_ext: feature_map must be 'softmax' or 'relu', got {kind!r}")


def decode_step(q: Tensor, k: Tensor, v: Tensor, cache: RAttentionCache, *,
                window_size: Optional[int] = None,
                feature_map: str = "softmax",
                softmax_scale: Optional[float] = None,
                swa_norm_weight: Optional[Tensor] = None,
                rla_norm_weight: Optional[Tensor] = None,
                norm_eps: float = 1e-8,
                initial_state: Optional[Tensor] = None,
                rotary_cos: Optional[Tensor] = None,
                rotary_sin: Optional[Tensor] = None,
                chunk_size: Optional[int] = None,
                checkpoint_every: Optional[int] = None) -> Tensor:
    """Attend one new token per sequence and append it to the cache (in place).

    Args:
        q: ``[B, 1, Hq, D]``; k, v: ``[B, 1, Hkv, D]``: the token at each sequence's
            position ``cache.positions[b]`` (sequences may be at different positions).
        cache: the layer's ``RAttentionCache``; its ring, state and positions are updated.
        window_size: optional; must equal the cache's window.
        feature_map, softmax_scale, swa_norm_weight, rla_norm_weight, norm_eps,
        initial_state, rotary_cos, rotary_sin: as for ``prefill`` / ``forward``.
            ``rotary_cos``/``rotary_sin`` must have a row for every position reached.
        chunk_size, checkpoint_every: accepted and ignored (they only tile the prefill), so
            one set of keywords serves ``prefill`` and ``decode_step``.

    Returns:
        ``[B, 1, Hq, D]`` in q's dtype: row ``t = positions[b]`` of ``forward`` on the whole
        sequence. Inference only: raises if an input requires grad while grad mode is on.
        No host synchronisation (CUDA-graph capturable).
    """
    what = "decode_step"
    check.qkv(what, q, k, v)
    _check_cache(cache, q, k, what)
    if q.shape[1] != 1 or k.shape[1] != 1:
        raise ValueError(f"rattention_ext.decode_step: takes one token per sequence: q must be "
                         f"[B, 1, Hq, D] and k, v [B, 1, Hkv, D], got q {list(q.shape)}, k "
                         f"{list(k.shape)}")
    _check_window_kwarg(window_size, cache, what)
    check.feature_map(what, feature_map)
    scale = _scale(q, softmax_scale, what)
    norm_eps = check.norm_eps(what, norm_eps)
    if chunk_size is not None or checkpoint_every is not None:
        check.tiling(what, DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size,
                     DEFAULT_CHECKPOINT_EVERY if checkpoint_every is None else checkpoint_every)
    g_swa, g_rla = _norm_weight(swa_norm_weight, q), _norm_weight(rla_norm_weight, q)
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k", k), ("v", v), ("swa_norm_weight", g_swa),
                        ("rla_norm_weight", g_rla), ("initial_state", initial_state),
                        ("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if isinstance(t, Tensor) and t.requires_grad:
                raise RuntimeError(
                    f"rattention_ext.decode_step: {name} requires grad, but decoding is "
                    f"inference only (the step updates the cache in place, no gradient would "
                    f"flow); run it under torch.no_grad() or torch.inference_mode(), or train "
                    f"with rattention_ext.forward / prefill")
    with _nvtx("rattention.decode_step", q):
        out = ops.decode_step(
            q, k, v, cache.keys, cache.values, cache.state, cache.positions, feature_map, scale,
            initial_state, rotary_cos, rotary_sin, g_swa, g_rla, norm_eps)
    cache.max_position += 1
    return out


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
        raise ValueError(f"rattention_ext.cache_bytes: dtype must be one of {list(_DTYPE_BYTES)}, got {dtype}")
    for name, val, lo in (("num_kv_heads", num_kv_heads, 1), ("head_dim", head_dim, 1),
                          ("window_size", window_size, 0), ("seq_len", seq_len, 0),
                          ("num_layers", num_layers, 1)):
        if not isinstance(val, int) or val < lo:
            raise ValueError(f"rattention_ext.cache_bytes: {name} must be an int >= {lo}, got "
                             f"{val!r}")
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
