"""FLOP and byte accounting with the window applied (never T^2).

Conventions (one multiply-add = 2 FLOPs; B batch, Hq query heads, Hkv kv heads, D head dim,
F = 2D the feature width of the RLA branch, C the RLA chunk length):

* SWA forward: per query head, 4 * D * sum_t keys_in_window(t) (QK^T and PV, 2*D each per
  visible key), keys_in_window(t) = min(t, w) + 1. Backward = 2.5 x forward (the
  flash-attention convention: recompute QK^T, plus dV, dP, dQ, dK).
* RLA forward, per chunk of C tokens (what a chunked kernel executes, masked halves included):
      per query head   2*C*C*F  (phi(Q) phi(K)^T)   + 2*C*C*D (A V)   + 2*C*F*D (phi(Q) S)
      per kv head      2*C*F*D  (state update phi(K)^T V)
  RLA backward: per query head 3*2*C*C*F (recompute A, dA->dQ, dA->dK) + 2*2*C*C*D (dA, dV)
  + 2*2*C*F*D (dQ from S, dS accumulation); per kv head 3*2*C*F*D (state recompute from the
  checkpoints, dK and dV from dS).
  Feature maps, RMS mixing and softmax exponentials are not counted (they are O(T*H*D)).
* Bytes: the minimum traffic of the op (inputs read once, outputs written once); decode
  reads the ring (w+1 keys and values), reads and writes the fp32 state.
"""
from __future__ import annotations

import math


def window_keys(T: int, w: int) -> int:
    """sum over t in [0, T) of the number of keys query t sees: min(t, w) + 1."""
    if T <= 0:
        return 0
    m = min(T, w + 1)  # queries t < m see t + 1 keys
    return m * (m + 1) // 2 + (T - m) * (w + 1)


def swa_fwd_flops(B: int, T: int, Hq: int, D: int, w: int) -> float:
    return 4.0 * D * window_keys(T, w) * Hq * B


def swa_bwd_flops(B: int, T: int, Hq: int, D: int, w: int) -> float:
    return 2.5 * swa_fwd_flops(B, T, Hq, D, w)


def rla_fwd_flops(B: int, T: int, Hq: int, Hkv: int, D: int, chunk: int = 64) -> float:
    F, C = 2 * D, chunk
    n = math.ceil(T / C)
    per_q = 2 * C * C * F + 2 * C * C * D + 2 * C * F * D
    per_kv = 2 * C * F * D
    return float(B * n * (Hq * per_q + Hkv * per_kv))


def rla_bwd_flops(B: int, T: int, Hq: int, Hkv: int, D: int, chunk: int = 64) -> float:
    F, C = 2 * D, chunk
    n = math.ceil(T / C)
    per_q = 3 * 2 * C * C * F + 2 * 2 * C * C * D + 2 * 2 * C * F * D
    per_kv = 3 * 2 * C * F * D
    return float(B * n * (Hq * per_q + Hkv * per_kv))


def op_flops(op: str, B: int, T: int, Hq: int, Hkv: int, D: int, w: int, chunk: int = 64) -> float:
    """Window-counted FLOPs of one call of `op` (see the module docstring)."""
    if op == "swa_fwd":
        return swa_fwd_flops(B, T, Hq, D, w)
    if op == "rla_fwd":
        return rla_fwd_flops(B, T, Hq, Hkv, D, chunk)
    if op == "fwd":
        return swa_fwd_flops(B, T, Hq, D, w) + rla_fwd_flops(B, T, Hq, Hkv, D, chunk)
    if op == "fwd_bwd":
        return (swa_fwd_flops(B, T, Hq, D, w) + swa_bwd_flops(B, T, Hq, D, w)
                + rla_fwd_flops(B, T, Hq, Hkv, D, chunk) + rla_bwd_flops(B, T, Hq, Hkv, D, chunk))
    if op == "decode":
        # one token per sequence: attention over min(T, w) + 1 ring entries, phi(q) S, and the
        # state update phi(k)^T v of the token leaving the window.
        keys = min(T, w) + 1
        return float(B * (Hq * (4 * D * keys + 2 * 2 * D * D) + Hkv * 2 * 2 * D * D))
    raise ValueError(f"unknown op {op!r}")


def op_bytes(op: str, B: int, T: int, Hq: int, Hkv: int, D: int, w: int, elem: int) -> float:
    """Minimum memory traffic of one call in bytes (`elem` = bytes per input element)."""
    qo = B * T * Hq * D * elem
    kv = 2 * B * T * Hkv * D * elem
    if op in ("swa_fwd", "rla_fwd", "fwd"):
        return float(qo * 2 + kv)
    if op == "fwd_bwd":
        # forward: q,k,v in, o out; backward: q,k,v,o,dO in, dq,dk,dv out
        return float(2 * qo + kv + 3 * qo + 2 * kv)
    if op == "decode":
        ring = 2 * B * (w + 1) * Hkv * D * elem
        state = 2 * B * Hkv * 2 * D * D * 4  # read + write, float32
        return float(ring + state + 2 * B * Hq * D * elem + 2 * B * Hkv * D * elem)
    raise ValueError(f"unknown op {op!r}")
