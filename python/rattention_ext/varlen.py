"""Packed variable-length batches (flash-attn's "varlen" convention).

A packed batch holds ``N`` documents back to back in one row: ``q [total, Hq, D]``,
``k, v [total, Hkv, D]``, and ``cu_seqlens``, an int32 tensor ``[N + 1]`` of document
offsets (``cu_seqlens[0] = 0``, non-decreasing, ``cu_seqlens[N] = total``; empty documents
allowed). Document ``b`` is tokens ``cu_seqlens[b] .. cu_seqlens[b+1] - 1`` and is computed
exactly as if it were alone (SPEC.md, "Packed sequences").

This module checks ``cu_seqlens`` (one place, so the API, the reference and the decoder
say the same thing about bad input) and turns the usual ``position_ids`` of a packed
training batch into ``cu_seqlens``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

__all__ = ["cu_seqlens_from_position_ids", "seqlens"]


def check_cu_seqlens(cu_seqlens, total: int, device: torch.device, *,
                     max_seqlen: Optional[int] = None, what: str = "forward") -> None:
    """Raise a ``ValueError``/``TypeError`` naming ``cu_seqlens`` (or ``max_seqlen``) unless
    it describes a packed batch of ``total`` tokens on ``device``.

    The value checks (first 0, non-decreasing, last = total, ``max_seqlen`` at least the
    longest document) read the offsets on the host: one synchronisation. Under
    ``torch.compile`` they are left to the compiled op, so that the graph has no break and
    does not depend on the document lengths; the metadata checks always run.
    """
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"rattention_ext.{what}: cu_seqlens must be an int32 tensor [N+1], got "
                        f"{type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"rattention_ext.{what}: cu_seqlens must have dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"rattention_ext.{what}: cu_seqlens must be 1-d [N+1] with N >= 1 documents, got "
                         f"shape {list(cu_seqlens.shape)}")
    if cu_seqlens.device != torch.device(device):
        raise ValueError(f"rattention_ext.{what}: cu_seqlens must be on the inputs' device {device}, got "
                         f"{cu_seqlens.device}")
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool)
                                   or max_seqlen < 0):
        raise ValueError(f"rattention_ext.{what}: max_seqlen must be None or an int >= 0, got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        return
    offs = cu_seqlens.tolist()
    if offs[0] != 0:
        raise ValueError(f"rattention_ext.{what}: cu_seqlens[0] must be 0, got {offs[0]}")
    lens = [b - a for a, b in zip(offs[:-1], offs[1:])]
    bad = next((i for i, n in enumerate(lens) if n < 0), None)
    if bad is not None:
        raise ValueError(f"rattention_ext.{what}: cu_seqlens must be non-decreasing, got cu_seqlens[{bad}] = "
                         f"{offs[bad]} > cu_seqlens[{bad + 1}] = {offs[bad + 1]}")
    if offs[-1] != total:
        raise ValueError(f"rattention_ext.{what}: cu_seqlens[-1] must equal the number of packed tokens "
                         f"total = {total} (q.shape[0]), got {offs[-1]}")
    if max_seqlen is not None and max_seqlen < max(lens):
        raise ValueError(f"rattention_ext.{what}: max_seqlen = {max_seqlen} is shorter than the longest "
                         f"document ({max(lens)} tokens); pass None or at least that")


def check_packed_qkv(q: Tensor, k: Tensor, v: Tensor, what: str) -> None:
    """Shapes of a packed batch: ``q [total, Hq, D]``, ``k, v [total, Hkv, D]``."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"rattention_ext.{what}: with cu_seqlens, q must be [total, Hq, D] and k, v "
                         f"[total, Hkv, D], got q {list(q.shape)}, k {list(k.shape)}, "
                         f"v {list(v.shape)}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"rattention_ext.{what}: q, k, v must hold the same number of packed tokens, got "
                         f"{q.shape[0]}, {k.shape[0]}, {v.shape[0]}")


def check_packed_state(initial_state: Optional[Tensor], n_docs: int, what: str) -> None:
    """``initial_state`` of a packed batch is ``[N or 1, Hq, 2D, D]``."""
    if initial_state is not None and (initial_state.dim() != 4
                                      or initial_state.shape[0] not in (1, n_docs)):
        raise ValueError(f"rattention_ext.{what}: with cu_seqlens of N = {n_docs} documents, initial_state "
                         f"must be [N or 1, Hq, 2D, D], got {list(initial_state.shape)}")


def seqlens(cu_seqlens: Tensor) -> Tensor:
    """Document lengths ``[N]`` (int64) of ``cu_seqlens [N+1]``."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)


def bounds(cu_seqlens: Tensor) -> List[tuple]:
    """``[(start, end), ...]`` per document, as Python ints (one host read)."""
    offs = cu_seqlens.tolist()
    return list(zip(offs[:-1], offs[1:]))


def cu_seqlens_from_position_ids(position_ids: Tensor) -> Tensor:
    """``cu_seqlens`` (int32 ``[N+1]``) of a packed batch whose ``position_ids`` restart at 0
    at each document (the form Hugging Face data collators produce for packing without
    padding, e.g. ``[0, 1, 2, 0, 1, 0, 1, 2, 3]`` -> ``[0, 3, 5, 9]``).

    Args:
        position_ids: integer ``[total]`` or ``[1, total]``, ``position_ids[0] == 0`` and
            every later entry either the previous one + 1 or 0 (a new document).

    Compute it where the batch is built (data loader or before the compiled region): the
    number of documents depends on the values, so this is a host synchronisation. Empty
    documents cannot be expressed by position ids; build ``cu_seqlens`` directly for those.
    """
    if not isinstance(position_ids, Tensor) or position_ids.dtype.is_floating_point \
            or position_ids.dtype == torch.bool:
        raise TypeError("position_ids must be an integer tensor [total] or [1, total]")
    p = position_ids
    if p.dim() == 2 and p.shape[0] == 1:
        p = p[0]
    if p.dim() != 1 or p.shape[0] == 0:
        raise ValueError(f"position_ids must be [total] or [1, total] with total >= 1, got "
                         f"shape {list(position_ids.shape)}")
    p = p.to(torch.int64)
    if int(p[0]) != 0:
        raise ValueError(f"position_ids[0] must be 0 (the first document starts there), got "
                         f"{int(p[0])}")
    step_ok = (p[1:] == p[:-1] + 1) | (p[1:] == 0)
    if not bool(step_ok.all()):
        t = int((~step_ok).nonzero()[0]) + 1
        raise ValueError(f"position_ids must count up by 1 inside a document and restart at 0, "
                         f"got position_ids[{t - 1}] = {int(p[t - 1])}, position_ids[{t}] = "
                         f"{int(p[t])}")
    starts = (p == 0).nonzero().flatten()
    end = torch.tensor([p.shape[0]], device=p.device, dtype=starts.dtype)
    return torch.cat([starts, end]).to(torch.int32)
