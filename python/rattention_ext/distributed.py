"""Context parallelism: one long sequence sharded across the ranks of a process group.

Each rank holds a contiguous shard ``[B, T_r, H, D]`` of the sequence (ranks in order, any
lengths, possibly shorter than the window). RAttention needs from the ranks before it only
(SPEC.md, "Continuing a sequence"):

* the **halo**: keys/values of the ``w + 1`` tokens before the shard, possibly held by several
  ranks, sent point to point (``torch.distributed.batch_isend_irecv``);
* the **carried RLA state** of every token ``s <= start - w - 2``: one ``[B, Hkv, 2D, D]``
  matrix. By linearity it is a prefix sum of per-rank sums ``E_j`` (the tokens that enter
  the state during rank ``j``'s chunk, ``s`` in ``[a_j - w - 1, a_{j+1} - w - 2]``, which
  need only rank ``j``'s keys/values and its halo), exchanged with one all-gather.

The backward mirrors it: the carried-state gradients are all-gathered and summed in reverse
(``dE_j = sum_{r > j} dC_r``), and the halo gradients are sent back to the ranks that own
those tokens. Traffic per rank and layer is therefore independent of the shard length:
``w + 1`` keys/values and one state per direction (plus a few integers describing the
shards). Communication overlaps local work: the local state sum runs while the halo
travels, the SWA branch while the states travel; in the backward the SWA backward runs
while the state gradients travel.

Works with any ``torch.distributed`` backend that has point-to-point ops and all-gather
(gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ._ops import ops
from .api import DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHUNK_SIZE, _acc, _norm_weight, _scale
from .continuation import rla_continued, state_sum_backward, state_sum_forward, swa_continued

__all__ = ["context_parallel_forward", "ShardLayout", "shard_layout", "count_traffic"]

_FORWARD_KWARGS = ("feature_map", "softmax_scale", "swa_norm_weight", "rla_norm_weight",
                   "norm_eps", "initial_state", "rotary_cos", "rotary_sin", "chunk_size",
                   "checkpoint_every")


# ---- traffic accounting -----------------------------------------------------------------
_ACTIVE_COUNTERS: List[Dict[str, int]] = []


@contextlib.contextmanager
def count_traffic() -> Iterator[Dict[str, int]]:
    """Count the bytes this rank sends inside the ``with`` block.

    Yields a dict filled on exit of each communication, keyed by what was sent:
    ``layout`` (shard lengths), ``halo`` and ``halo_grad`` (point-to-point), ``state`` and
    ``state_grad`` (all-gather); ``total`` is their sum. An all-gather of ``n`` bytes counts
    ``n * (world - 1)``: every other rank must receive this rank's contribution.
    """
    counter = {k: 0 for k in ("layout", "halo", "halo_grad", "state", "state_grad", "total")}
    _ACTIVE_COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE_COUNTERS.remove(counter)


def _count(kind: str, nbytes: int) -> None:
    for c in _ACTIVE_COUNTERS:
        c[kind] += nbytes
        c["total"] += nbytes


# ---- shard layout -----------------------------------------------------------------------
@dataclass(frozen=True)
class ShardLayout:
    """Where every rank's shard sits in the sequence.

    Attributes:
        lengths: shard length of each rank of the group, in rank order.
        rank: this process's rank in the group.
    """

    lengths: Tuple[int, ...]
    rank: int

    @property
    def world_size(self) -> int:
        return len(self.lengths)

    @property
    def starts(self) -> Tuple[int, ...]:
        """Global position of each shard's first token."""
        out, a = [], 0
        for n in self.lengths:
            out.append(a)
            a += n
        return tuple(out)

    @property
    def start(self) -> int:
        """Global position of this rank's first token."""
        return self.starts[self.rank]

    @property
    def total(self) -> int:
        """Length of the whole sequence."""
        return sum(self.lengths)

    def halo_len(self, window_size: int, rank: Optional[int] = None) -> int:
        """Rows of the halo of ``rank`` (default this one): ``min(w + 1, start)``."""
        r = self.rank if rank is None else rank
        return min(window_size + 1, self.starts[r])

    def _pieces(self, window_size: int):
        # (src, dst, src_lo, src_hi, dst_lo, dst_hi): rows [src_lo, src_hi) of rank src's
        # shard are rows [dst_lo, dst_hi) of rank dst's halo.
        starts = self.starts
        for dst in range(self.world_size):
            h = self.halo_len(window_size, dst)
            g0 = starts[dst] - h
            for src in range(dst):
                x = max(g0, starts[src])
                y = min(starts[src] + self.lengths[src], starts[dst])
                if y > x:
                    yield src, dst, x - starts[src], y - starts[src], x - g0, y - g0

    def halo_sources(self, window_size: int) -> List[Tuple[int, int, int]]:
        """``(src, lo, hi)``: halo rows ``[lo, hi)`` of this rank come from rank ``src``."""
        return [(s, dlo, dhi) for s, d, _, _, dlo, dhi in self._pieces(window_size)
                if d == self.rank]

    def halo_targets(self, window_size: int) -> List[Tuple[int, int, int]]:
        """``(dst, lo, hi)``: rows ``[lo, hi)`` of this rank's shard are halo of rank ``dst``."""
        return [(d, slo, shi) for s, d, slo, shi, _, _ in self._pieces(window_size)
                if s == self.rank]


def _group_rank(group) -> Tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _peer(group, group_rank: int) -> int:
    # P2POp takes global ranks.
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def shard_layout(local_length: int, group=None, *, device=None,
                 check: Optional[Sequence[int]] = None) -> ShardLayout:
    """All-gather the shard lengths of ``group`` (collective: every rank must call it).

    Args:
        local_length: this rank's number of tokens.
        device: where the small exchange tensor lives (a CUDA device for NCCL).
        check: optional integers that must agree on all ranks (batch size, heads, head dim,
            window...); a mismatch raises ``ValueError`` on every rank.
    """
    rank, world = _group_rank(group)
    extra = list(check or ())
    mine = torch.tensor([int(local_length)] + [int(x) for x in extra], dtype=torch.int64,
                        device=device)
    everyone, _ = _all_gather(mine, group, world, "layout", async_op=False)
    rows = everyone.tolist()
    if extra and any(row[1:] != rows[0][1:] for row in rows):
        raise ValueError(f"context_parallel_forward: every rank must pass the same batch size, "
                         f"heads, head dim and window; got (B, Hq, Hkv, D, w) per rank: "
                         f"{[tuple(r[1:]) for r in rows]}")
    return ShardLayout(tuple(r[0] for r in rows), rank)


# ---- communication ----------------------------------------------------------------------
def _exchange(sends: List[Tuple[Tensor, int]], recvs: List[Tuple[Tensor, int]], group, kind: str):
    """Post point-to-point sends/receives (group ranks) in one batch; returns the works."""
    # P2POp accepts only distributed_c10d's own isend / irecv (looked up now, so that a
    # wrapper installed there, e.g. to count traffic, is the one called).
    isend, irecv = dist.distributed_c10d.isend, dist.distributed_c10d.irecv
    p2p = [dist.P2POp(isend, t, _peer(group, peer), group) for t, peer in sends]
    p2p += [dist.P2POp(irecv, t, _peer(group, peer), group) for t, peer in recvs]
    _count(kind, sum(t.numel() * t.element_size() for t, _ in sends))
    return dist.batch_isend_irecv(p2p) if p2p else []


def _all_gather(x: Tensor, group, world: int, kind: str, async_op: bool):
    """All-gather ``x`` (same shape on every rank) into ``[world, *x.shape]``."""
    x = x.contiguous()
    out = x.new_empty((world,) + tuple(x.shape))
    _count(kind, x.numel() * x.element_size() * (world - 1))
    work = dist.all_gather(list(out.unbind(0)), x, group=group, async_op=async_op)
    return out, work


def _all_gather_async(x: Tensor, group, world: int, kind: str):
    return _all_gather(x, group, world, kind, async_op=True)


def _wait(works) -> None:
    for wk in works:
        wk.wait()


# ---- the layer --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Config:
    layout: ShardLayout
    group: object
    window_size: int
    feature_map: str
    softmax_scale: float
    norm_eps: float
    chunk_size: int
    checkpoint_every: int


def _forward_local(cfg: _Config, q, k, v, h0, g_swa, g_rla, cos, sin, build_graph: bool):
    """The forward with its communication. With ``build_graph`` the local pieces are
    recorded as small autograd graphs on detached leaves, which the backward walks in the
    order that overlaps its own communication."""
    lay, group, w = cfg.layout, cfg.group, cfg.window_size
    W1 = w + 1
    r, world = lay.rank, lay.world_size
    B, T, Hkv, D = k.shape
    h = lay.halo_len(w)
    a = lay.start

    # 1. Halo: post the sends of our tail rows and the receives of the rows before us.
    #    Rows travel as [rows, B, 2*Hkv, D] so that every piece is a contiguous slice.
    halo_buf = k.new_empty(h, B, 2 * Hkv, D)
    sends = [(torch.cat([k[:, lo:hi], v[:, lo:hi]], dim=2).transpose(0, 1).contiguous(), dst)
             for dst, lo, hi in lay.halo_targets(w)]
    recvs = [(halo_buf[lo:hi], src) for src, lo, hi in lay.halo_sources(w)]
    works = _exchange(sends, recvs, group, "halo")

    # 2. While it travels: our own tokens that enter the RLA state during this chunk
    #    (positions a .. a + T - w - 2).
    n_loc = max(0, T - W1)
    e_state = state_sum_forward(k[:, :n_loc], v[:, :n_loc], cfg.feature_map) \
        if n_loc else k.new_zeros(B, Hkv, 2 * D, D, dtype=_acc(k.dtype))
    _wait(works)
    del sends
    halo = halo_buf.transpose(0, 1)  # [B, h, 2*Hkv, D]
    hk, hv = halo[:, :, :Hkv], halo[:, :, Hkv:]
    # Halo rows (oldest first) entering the state in this chunk: positions < a + T - w - 1.
    n_halo = min(h, max(0, h + T - W1))
    if n_halo:
        e_state = e_state + state_sum_forward(hk[:, :n_halo], hv[:, :n_halo],
                                              cfg.feature_map)

    # 3. Post the all-gather of the per-rank state sums; run the SWA branch meanwhile.
    gathered, state_work = _all_gather_async(e_state, group, world, "state")
    with torch.enable_grad():
        q_l = q.detach().requires_grad_(build_graph)
        k_ext = torch.cat([hk.to(k.dtype), k], dim=1).requires_grad_(build_graph)
        v_ext = torch.cat([hv.to(v.dtype), v], dim=1).requires_grad_(build_graph)
        o_swa = swa_continued(q_l, k_ext, v_ext, halo=h, window_size=w,
                              softmax_scale=cfg.softmax_scale, rotary_cos=cos, rotary_sin=sin,
                              position=a - h)
    state_work.wait()
    carried = gathered[:r].sum(0) if r else torch.zeros_like(e_state)
    del gathered

    # 4. RLA with the carried state, then the mixing.
    with torch.enable_grad():
        c_l = carried.requires_grad_(build_graph)
        h0_l = None if h0 is None else h0.detach().requires_grad_(build_graph and h0.requires_grad)
        o_rla, _ = rla_continued(q_l, k_ext, v_ext, halo=h, window_size=w,
                                 feature_map=cfg.feature_map, initial_state=h0_l,
                                 carried_state=c_l, chunk_size=cfg.chunk_size,
                                 checkpoint_every=cfg.checkpoint_every)
        os_l = o_swa.detach().requires_grad_(build_graph)
        or_l = o_rla.detach().requires_grad_(build_graph)
        gs_l = g_swa.detach().requires_grad_(build_graph and g_swa.requires_grad)
        gr_l = g_rla.detach().requires_grad_(build_graph and g_rla.requires_grad)
        out = ops.mix_fwd(os_l.contiguous(), or_l.contiguous(), gs_l, gr_l, cfg.norm_eps,
                          q.dtype)
    graph = dict(q=q_l, k_ext=k_ext, v_ext=v_ext, carried=c_l, h0=h0_l, o_swa=o_swa,
                 o_rla=o_rla, os=os_l, orl=or_l, gs=gs_l, gr=gr_l, out=out, halo=h,
                 n_state=n_halo + n_loc)
    return out.detach(), graph


def _grad(outputs, inputs, grad_outputs):
    """``torch.autograd.grad`` over the inputs that require grad (None for the others)."""
    idx = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    got = torch.autograd.grad(outputs, [inputs[i] for i in idx], grad_outputs, allow_unused=True)
    res = [None] * len(inputs)
    for i, g in zip(idx, got):
        res[i] = g
    return res


class _ContextParallelAttention(torch.autograd.Function):
    """The layer on this rank's shard, with the communication of both passes inside (the
    backward is collective too)."""

    @staticmethod
    def forward(ctx, cfg, q, k, v, h0, g_swa, g_rla, cos, sin):
        out, graph = _forward_local(cfg, q, k, v, h0, g_swa, g_rla, cos, sin, build_graph=True)
        ctx.cfg = cfg
        ctx.graph = graph
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        cfg, g = ctx.cfg, ctx.graph
        ctx.graph = None  # the local graphs are freed as they are walked
        lay, group, w = cfg.layout, cfg.group, cfg.window_size
        W1 = w + 1
        r, world = lay.rank, lay.world_size
        h, n_state = g["halo"], g["n_state"]

        # Each graph is dropped as soon as it has been walked (its saved tensors with it).
        # Mixing backward: the gradients flowing into both branches and the norm weights.
        d_os, d_or, d_gs, d_gr = _grad(g.pop("out"), [g.pop("os"), g.pop("orl"), g.pop("gs"),
                                                      g.pop("gr")], d_out.contiguous())
        # RLA backward first, so that its carried-state gradient travels during the SWA one.
        dq, dk_ext, dv_ext, d_carried, d_h0 = _grad(
            g.pop("o_rla"), [g["q"], g["k_ext"], g["v_ext"], g.pop("carried"), g.pop("h0")],
            d_or)
        del d_or
        gathered, state_work = _all_gather_async(d_carried, group, world, "state_grad")
        dq2, dk2, dv2 = _grad(g.pop("o_swa"), [g.pop("q"), g["k_ext"], g["v_ext"]], d_os)
        del d_os
        dq += dq2
        dk_ext += dk2
        dv_ext += dv2
        del dq2, dk2, dv2
        state_work.wait()
        # d E_r = sum of the carried-state gradients of the later ranks (reverse scan).
        d_state = gathered[r + 1:].sum(0) if r + 1 < world else None
        del gathered
        k_ext, v_ext = g["k_ext"].detach(), g["v_ext"].detach()
        if d_state is not None and n_state:
            # The rows of k_ext that entered the state during this chunk are its first n_state
            # (the halo part first, so that it can be sent back as soon as possible).
            n_h = min(n_state, h)
            if n_h:
                dk_h, dv_h = state_sum_backward(k_ext[:, :n_h], v_ext[:, :n_h], d_state,
                                                   cfg.feature_map)
                dk_ext[:, :n_h] += dk_h
                dv_ext[:, :n_h] += dv_h
        # Halo gradients back to their owners; our tail rows' gradients from the later ranks.
        B, _, Hkv, D = dk_ext.shape
        d_halo = torch.cat([dk_ext[:, :h], dv_ext[:, :h]], dim=2).transpose(0, 1).contiguous()
        sends = [(d_halo[lo:hi], src) for src, lo, hi in lay.halo_sources(w)]
        recvs = [(dk_ext.new_empty(hi - lo, B, 2 * Hkv, D), dst, lo, hi)
                 for dst, lo, hi in lay.halo_targets(w)]
        works = _exchange(sends, [(t, dst) for t, dst, _, _ in recvs], group, "halo_grad")
        dk, dv = dk_ext[:, h:], dv_ext[:, h:]
        if d_state is not None and n_state > h:
            dk_l, dv_l = state_sum_backward(k_ext[:, h:n_state], v_ext[:, h:n_state], d_state,
                                               cfg.feature_map)
            dk[:, :n_state - h] += dk_l
            dv[:, :n_state - h] += dv_l
        _wait(works)
        for t, _, lo, hi in recvs:
            part = t.transpose(0, 1)
            dk[:, lo:hi] += part[:, :, :Hkv]
            dv[:, lo:hi] += part[:, :, Hkv:]
        return (None, dq, dk.contiguous(), dv.contiguous(), d_h0, d_gs, d_gr, None, None)


def context_parallel_forward(q: Tensor, k: Tensor, v: Tensor, *, window_size: int, group=None,
                             shard_lengths: Optional[Sequence[int]] = None,
                             **forward_kwargs) -> Tensor:
    """``rattention_ext.forward`` of a sequence sharded across the ranks of ``group``.

    Collective: every rank of ``group`` calls it with its own contiguous shard, ranks in
    order (rank 0 holds the first tokens), and the backward is collective as well (every
    rank must backpropagate through its output).

    Args:
        q: ``[B, T_r, Hq, D]``; k, v: ``[B, T_r, Hkv, D]``: this rank's shard. Lengths may
            differ between ranks and be shorter than the window (the halo then comes from
            several ranks); ``B``, heads, head dim, dtype and ``window_size`` must agree.
        window_size: SWA left context ``w``.
        group: the process group (default: the default group).
        shard_lengths: optional lengths of all shards in rank order, if the caller knows
            them; saves one small all-gather. Must be the same on every rank.
        **forward_kwargs: ``rattention_ext.forward``'s keywords, with their global meaning:
            ``initial_state`` (H0, shared by all ranks), ``rotary_cos``/``rotary_sin`` (tables
            for global positions: each rank reads its own rows), norm weights, ``norm_eps``,
            ``feature_map``, ``softmax_scale``, ``chunk_size``, ``checkpoint_every``.

    Returns:
        This rank's rows of ``forward`` on the whole sequence, ``[B, T_r, Hq, D]``.
        Differentiable in q, k, v and the shared tensors (``initial_state``, norm weights):
        each rank gets its own contribution to a shared tensor's gradient; their sum over
        ranks (what DDP's or an explicit all-reduce gives) is the single-process gradient.
    """
    unknown = set(forward_kwargs) - set(_FORWARD_KWARGS)
    if unknown:
        raise TypeError(f"context_parallel_forward: unexpected keyword argument(s) "
                        f"{sorted(unknown)}; accepted: window_size, group, shard_lengths, "
                        f"{', '.join(_FORWARD_KWARGS)}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel_forward needs an initialised torch.distributed "
                           "process group (torch.distributed.init_process_group)")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q must be [B, T, Hq, D] and k, v [B, T, Hkv, D], got q "
                         f"{list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] \
            or q.shape[2] % k.shape[2]:
        raise ValueError(f"q [B, T, Hq, D] and k, v [B, T, Hkv, D] with Hq % Hkv == 0 expected, "
                         f"got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if not isinstance(window_size, int) or window_size < 0:
        raise ValueError(f"window_size must be an int >= 0, got {window_size!r}")
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if shard_lengths is None:
        layout = shard_layout(T, group, device=q.device, check=(B, Hq, Hkv, D, window_size))
    else:
        rank, world = _group_rank(group)
        lengths = tuple(int(n) for n in shard_lengths)
        if len(lengths) != world or lengths[rank] != T or min(lengths) < 0:
            raise ValueError(f"shard_lengths must list the {world} shard lengths in rank order "
                             f"with this rank's ({rank}) equal to q.shape[1]={T}, got "
                             f"{list(shard_lengths)}")
        layout = ShardLayout(lengths, rank)
    fk = forward_kwargs
    cfg = _Config(layout=layout, group=group, window_size=window_size,
                  feature_map=fk.get("feature_map", "softmax"),
                  softmax_scale=_scale(q, fk.get("softmax_scale")),
                  norm_eps=float(fk.get("norm_eps", 1e-8)),
                  chunk_size=int(fk.get("chunk_size", DEFAULT_CHUNK_SIZE)),
                  checkpoint_every=int(fk.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY)))
    if cfg.feature_map not in ("softmax", "relu"):
        raise ValueError(f"feature_map must be 'softmax' or 'relu', got {cfg.feature_map!r}")
    h0 = fk.get("initial_state")
    g_swa = _norm_weight(fk.get("swa_norm_weight"), q)
    g_rla = _norm_weight(fk.get("rla_norm_weight"), q)
    cos, sin = fk.get("rotary_cos"), fk.get("rotary_sin")
    if (cos is None) != (sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if cos is not None and (cos.dim() != 2 or cos.shape[0] < layout.total):
        raise ValueError(f"rotary_cos/rotary_sin must be global tables [P >= {layout.total} "
                         f"(the whole sequence), D/2], got {list(cos.shape)}")
    tensors = (q, k, v, h0, g_swa, g_rla)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _ContextParallelAttention.apply(cfg, q, k, v, h0, g_swa, g_rla, cos, sin)
    with torch.no_grad():
        return _forward_local(cfg, q, k, v, h0, g_swa, g_rla, cos, sin, build_graph=False)[0]
