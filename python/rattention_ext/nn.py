"""``torch.nn`` modules built on the RAttention kernels.

``RAttention`` is a drop-in attention layer for local-global transformers: q/k/v/o
projections with grouped-query attention, rotary position embedding on the sliding-window
branch, and the two learned RMS-norm scales that mix the SWA and RLA branches
(SPEC.md). Training and full-sequence inference go through ``rattention_ext.forward``
(the CPU / CUDA kernels); incremental decoding goes through ``rattention_ext.prefill`` and
``rattention_ext.decode_step`` with a constant-size ``rattention_ext.RAttentionCache``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["RAttention", "rotary_tables"]


def _functional():
    # Imported lazily: this module is imported by the package's __init__.
    import rattention_ext

    return rattention_ext


def rotary_tables(positions: int, head_dim: int, theta: float, *, device=None,
                  dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
    """Half-split (GPT-NeoX) rotary tables ``cos, sin: [positions, head_dim // 2]``.

    Row ``t`` rotates the token at position ``t``; pair ``i`` (dims ``i`` and ``i + D/2``)
    turns at frequency ``theta ** (-2 i / D)``. Computed in float64, then cast, so float64
    layers get tables exact to double precision.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embedding, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    t = torch.arange(positions, dtype=torch.float64, device=device)
    ang = torch.outer(t, inv_freq)  # [P, D/2]
    return ang.cos().to(dtype), ang.sin().to(dtype)


class RAttention(nn.Module):
    """RAttention layer: sliding-window softmax attention plus residual linear attention.

    ``y = o_proj( rms(SWA(rope(q), rope(k), v)) * swa_norm_weight
                + rms(RLA(q, k, v; H0)) * rla_norm_weight )``, per token and query head
    (SPEC.md). SWA sees the ``window_size`` previous tokens and the token itself; RLA covers
    exactly the older tokens, from raw (un-rotated, unscaled) ``q``/``k`` through the
    feature map.

    Args:
        hidden_size: model width ``d``; input and output are ``[B, T, d]``.
        num_heads: query heads ``Hq``.
        num_kv_heads: key/value heads ``Hkv`` (``Hq % Hkv == 0``; query head ``h`` reads kv
            head ``h // (Hq / Hkv)``).
        window_size: SWA left context ``w >= 0``.
        head_dim: ``D`` (even), default ``hidden_size // num_heads``.
        feature_map: RLA feature map, ``"softmax"`` (default) or ``"relu"``.
        rope_theta: rotary base (SWA branch only).
        learned_init_state: add a learned RLA initial state ``H0``.
        norm_eps: epsilon of the two RMS norms.
        bias: biases in the four projections.
        context_parallel_group: a ``torch.distributed`` process group (or ``True`` for the
            default group) to shard the sequence across: each rank's ``forward(x)`` takes its
            contiguous shard ``x [B, T_r, d]`` of one sequence (ranks in order, any lengths)
            and returns its rows of the whole sequence's output, through
            ``rattention_ext.distributed.context_parallel_forward`` (rotary positions are
            those of the whole sequence, offset by the shard's start). Parameter gradients
            are each rank's contribution; sum them over the group (DDP, all-reduce).
            ``None`` (default): no sharding.

    Parameters (shapes):
        ``q_proj``: ``nn.Linear(d, Hq * D)``, weight ``[Hq * D, d]``; output column
            ``h * D + i`` is dim ``i`` of query head ``h``.
        ``k_proj``, ``v_proj``: ``nn.Linear(d, Hkv * D)``, weight ``[Hkv * D, d]``.
        ``o_proj``: ``nn.Linear(Hq * D, d)``, weight ``[d, Hq * D]``.
        ``swa_norm_weight``, ``rla_norm_weight``: ``[Hq, D]``, init ones.
        ``initial_state`` (only with ``learned_init_state``): ``[1, Hq, 2D, D]``, init zeros;
            rows ``0..D-1`` pair with ``softmax(k)`` (``relu(k)``), rows ``D..2D-1`` with
            ``softmax(-k)`` (``relu(-k)``).

    Mapping the paper's reference layer (axlearn ``rattention.RAttention``, JAX) onto this one:
        * Projections: axlearn stores ``i_proj`` q/k/v weights as ``[d, heads, D]`` and
          ``o_proj`` as ``[d, Hq, D]`` (einsum ``btnh,dnh->btd``). Here
          ``q_proj.weight = w_q.reshape(d, Hq * D).T`` (likewise k, v with ``Hkv``) and
          ``o_proj.weight = w_o.reshape(d, Hq * D)``; biases reshape to ``[heads * D]``.
        * Rotary layout: axlearn's RoFormer rotary rotates interleaved pairs
          ``(2i, 2i+1)``, this layer (like the kernels) rotates half-split pairs
          ``(i, i + D/2)``. Permute the output dims of every q and k head with
          ``perm = [0, 2, 4, ..., D-2, 1, 3, ..., D-1]`` (new dim ``j`` = old dim
          ``perm[j]``), i.e. ``W_q.view(Hq, D, d)[:, perm]``. This is exact for both
          branches: SWA scores are dot products (invariant under a common permutation of q
          and k) and the RLA feature maps act elementwise / by softmax over the head dim, so
          ``phi(P q) . phi(P k) = phi(q) . phi(k)``. ``v`` and ``o_proj`` are not permuted.
        * Mixing norms: ``swa_norm`` / ``rla_norm`` are GroupRMSNorms with one group per
          head; copy their scale into ``swa_norm_weight`` / ``rla_norm_weight`` (repeat a
          ``[D]`` scale over the ``Hq`` heads), and use their epsilon as ``norm_eps``.
        * Learned initial state: axlearn parameterises it by ``k_tokens, v_tokens
          [Hq, M, D]`` (``use_learned_init``); set
          ``initial_state = einsum("nmk,nmv->nkv", phi(k_tokens), v_tokens)[None]`` with
          ``phi`` the feature map (``rattention_ext.reference.feature_map``), then apply
          the rotary ``perm`` above to each half of the ``2D`` rows.
        * ``rope_theta`` and the SWA scale ``1/sqrt(D)`` match axlearn's defaults;
          ``use_qk_scale`` (extra RLA-only q/k scales) has no counterpart here.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, window_size: int, *,
                 head_dim: Optional[int] = None, feature_map: str = "softmax",
                 rope_theta: float = 500000.0, learned_init_state: bool = False,
                 norm_eps: float = 1e-8, bias: bool = False, context_parallel_group=None,
                 device=None, dtype=None):
        super().__init__()
        from . import _validate as check

        what = "nn.RAttention"
        check.check_int(what, "hidden_size", hidden_size, 1)
        check.check_int(what, "num_heads", num_heads, 1)
        check.check_int(what, "num_kv_heads", num_kv_heads, 1)
        if num_heads % num_kv_heads:
            raise ValueError(f"rattention_ext.{what}: num_heads ({num_heads}) must be a positive "
                             f"multiple of num_kv_heads ({num_kv_heads})")
        window_size = check.window(what, window_size)
        check.feature_map(what, feature_map)
        norm_eps = check.norm_eps(what, norm_eps)
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        check.check_int(what, "head_dim", head_dim, 2)
        if head_dim % 2:
            raise ValueError(f"rattention_ext.{what}: head_dim must be even and >= 2, got "
                             f"{head_dim}")
        fk = dict(device=device, dtype=dtype)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.window_size = window_size
        self.feature_map = feature_map
        self.rope_theta = float(rope_theta)
        self.norm_eps = float(norm_eps)
        # True selects the default group (None would mean "no sharding" here).
        self.context_parallel_group = context_parallel_group
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **fk)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias, **fk)
        self.swa_norm_weight = nn.Parameter(torch.ones(num_heads, head_dim, **fk))
        self.rla_norm_weight = nn.Parameter(torch.ones(num_heads, head_dim, **fk))
        if learned_init_state:
            self.initial_state = nn.Parameter(torch.zeros(1, num_heads, 2 * head_dim, head_dim, **fk))
        else:
            self.register_parameter("initial_state", None)
        # (device, dtype) -> (cos, sin); grown geometrically, never part of the state dict.
        self._rope_cache: Dict[Tuple[torch.device, torch.dtype], Tuple[Tensor, Tensor]] = {}

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"window_size={self.window_size}, feature_map={self.feature_map!r}, "
                f"learned_init_state={self.initial_state is not None}")

    # ---- helpers ---------------------------------------------------------------------
    def rotary(self, positions: int, device, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """Cached rotary tables with at least ``positions`` rows (float32, or float64 for a
        float64 layer), on ``device``."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        key = (torch.device(device), acc)
        cached = self._rope_cache.get(key)
        if cached is None or cached[0].shape[0] < positions:
            n = max(positions, 2 * cached[0].shape[0] if cached is not None else 64)
            cached = rotary_tables(n, self.head_dim, self.rope_theta, device=device, dtype=acc)
            self._rope_cache[key] = cached
        return cached

    def _project(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"rattention_ext.nn.RAttention: x must be [B, T, hidden_size="
                             f"{self.hidden_size}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        return q, k, v

    def _kwargs(self, positions: int, like: Tensor) -> dict:
        cos, sin = self.rotary(positions, like.device, like.dtype)
        return dict(feature_map=self.feature_map, swa_norm_weight=self.swa_norm_weight,
                    rla_norm_weight=self.rla_norm_weight, norm_eps=self.norm_eps,
                    initial_state=self.initial_state, rotary_cos=cos, rotary_sin=sin)

    def _out(self, o: Tensor) -> Tensor:
        B, T = o.shape[:2]
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))

    def _project_packed(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """q ``[total, Hq, D]``, k, v ``[total, Hkv, D]`` of a packed batch ``x`` given as
        ``[total, hidden_size]`` or ``[1, total, hidden_size]``."""
        rows = x[0] if x.dim() == 3 and x.shape[0] == 1 else x
        if rows.dim() != 2 or rows.shape[-1] != self.hidden_size:
            raise ValueError(f"with cu_seqlens, x must be [total, hidden_size={self.hidden_size}] "
                             f"or [1, total, hidden_size], got {tuple(x.shape)}")
        total = rows.shape[0]
        q = self.q_proj(rows).view(total, self.num_heads, self.head_dim)
        k = self.k_proj(rows).view(total, self.num_kv_heads, self.head_dim)
        v = self.v_proj(rows).view(total, self.num_kv_heads, self.head_dim)
        return q, k, v

    # ---- training / full-sequence path -----------------------------------------------
    def forward(self, x: Tensor, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None) -> Tensor:
        """``x [B, T, hidden_size] -> [B, T, hidden_size]`` through ``rattention_ext.forward``
        (or, with a ``context_parallel_group``, this rank's shard of the sequence through
        ``rattention_ext.distributed.context_parallel_forward``).

        Packed batch (no padding): ``x`` ``[total, hidden_size]`` or ``[1, total,
        hidden_size]`` holding documents back to back, ``cu_seqlens`` their int32 offsets
        ``[N+1]`` on x's device (``0``, non-decreasing, ``total``). Each document is computed
        as if it were alone: rotary positions restart at 0 in each, the window and the RLA
        state stay inside it, and it starts from the layer's ``initial_state``. The output has
        x's shape. From Hugging Face-style ``position_ids`` that restart at 0 at every
        document, ``cu_seqlens = rattention_ext.cu_seqlens_from_position_ids(position_ids)``
        (compute it in the data loader: it reads the values). ``max_seqlen`` (optional, the
        longest document) bounds the rotary table; without it the table covers ``total``.
        """
        if cu_seqlens is not None:
            if self.context_parallel_group is not None:
                raise ValueError("RAttention: cu_seqlens (packed documents) and "
                                 "context_parallel_group (one sequence across ranks) do not "
                                 "go together")
            q, k, v = self._project_packed(x)
            total = q.shape[0]
            n = total if max_seqlen is None else max_seqlen
            o = _functional().forward(q, k, v, window_size=self.window_size,
                                      cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                      **self._kwargs(max(n, 1), q))
            return self.o_proj(o.reshape(total, self.num_heads * self.head_dim)).view(x.shape)
        q, k, v = self._project(x)
        if self.context_parallel_group is not None:
            return self._out(self._context_parallel(q, k, v))
        o = _functional().forward(q, k, v, window_size=self.window_size,
                                  **self._kwargs(x.shape[1], q))
        return self._out(o)

    def _context_parallel(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        from . import distributed

        group = None if self.context_parallel_group is True else self.context_parallel_group
        B, T, Hq, D = q.shape
        # The rotary tables must cover the whole sequence: learn its length first.
        layout = distributed.shard_layout(T, group, device=q.device,
                                          check=(B, Hq, k.shape[2], D, self.window_size))
        return distributed.context_parallel_forward(
            q, k, v, window_size=self.window_size, group=group, shard_lengths=layout.lengths,
            **self._kwargs(layout.total, q))

    # ---- decoding path -----------------------------------------------------------------
    def new_cache(self, batch_size: int, *, dtype: Optional[torch.dtype] = None, device=None):
        """An empty ``RAttentionCache`` for ``batch_size`` sequences: ring buffer of the last
        ``window_size + 1`` keys/values, float32 RLA state, positions at 0. dtype/device
        default to the layer's parameters."""
        w = self.q_proj.weight
        return _functional().RAttentionCache.empty(
            batch_size, self.window_size, self.num_kv_heads, self.head_dim,
            dtype=w.dtype if dtype is None else dtype, device=w.device if device is None else device)

    @staticmethod
    def _next_positions(cache) -> int:
        # Largest position any sequence of the cache has reached: the cache's host-side
        # bound (no device sync, so a decode step can be captured in a CUDA graph).
        return cache.max_position

    def _no_context_parallel(self, what: str) -> None:
        if self.context_parallel_group is not None:
            raise RuntimeError(f"RAttention.{what}: decoding is per process; use a layer without "
                               f"context_parallel_group (the same weights) for prefill / step")

    def prefill(self, x: Tensor, cache, *, seq_lens: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """Run the prompt ``x [B, T, hidden_size]`` through the layer and fill the ``cache``
        (from ``new_cache``; in place) so that ``step`` continues after it. Returns ``[B, T,
        hidden_size]``, equal to ``forward(x)``. On a cache that already holds tokens the
        prompt continues it (chunked prefill: equal to one prefill of all the chunks).
        ``seq_lens [B]`` (optional): true prompt lengths of a right-padded batch.
        ``cu_seqlens [B+1]`` (optional): ``x`` is a packed batch ``[total, hidden_size]`` (or
        ``[1, total, hidden_size]``) of ``B`` prompts, as in ``forward``."""
        self._no_context_parallel("prefill")
        if cu_seqlens is not None:
            q, k, v = self._project_packed(x)
            total = q.shape[0]
            o = _functional().prefill(q, k, v, cache, cu_seqlens=cu_seqlens,
                                      **self._kwargs(max(total, 1), q))
            return self.o_proj(o.reshape(total, self.num_heads * self.head_dim)).view(x.shape)
        q, k, v = self._project(x)
        n = self._next_positions(cache) + x.shape[1]
        o = _functional().prefill(q, k, v, cache, seq_lens=seq_lens, **self._kwargs(n, q))
        return self._out(o)

    def step(self, x: Tensor, cache) -> Tensor:
        """One decoding step: ``x [B, 1, hidden_size]`` is the next token of every sequence;
        updates ``cache`` in place and returns ``[B, 1, hidden_size]``."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"rattention_ext.nn.RAttention.step: x must be [B, 1, hidden_size], "
                             f"got {tuple(x.shape)}")
        self._no_context_parallel("step")
        q, k, v = self._project(x)
        n = self._next_positions(cache) + 1
        o = _functional().decode_step(q, k, v, cache, **self._kwargs(n, q))
        return self._out(o)
