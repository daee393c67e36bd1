"""Argument checks at the public boundary (``forward``, the branch functions, ``prefill``,
``decode_step``, ``RAttentionCache``, ``nn.RAttention``).

Every error names the package, the function and the argument, and says what was expected.
The tensor checks (shapes, dtypes, devices) live in the op layer (csrc/op_common.cpp) and the
fake kernels (_ops.py); this module checks the Python scalars, which the op schemas would
otherwise coerce (``True`` -> 1, ``"0.5"`` accepted by ``float()``) or reject with a message
naming the internal op.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

_INT64_MAX = 2**63 - 1
FEATURE_MAPS = ("softmax", "relu")
MAX_CHUNK_SIZE = 1024


def _is_int(x) -> bool:
    return isinstance(x, (numbers.Integral, torch.SymInt)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (numbers.Real, torch.SymFloat)) and not isinstance(x, bool)


def _finite_positive(x) -> bool:
    """``0 < x < inf`` (NaN fails both). Comparisons only, not ``math.isfinite``, so that it
    also traces when ``torch.compile(dynamic=True)`` makes a Python float symbolic."""
    return x > 0 and x < math.inf


def _positive(what: str, name: str, x, why: str = ""):
    """A real number (already type-checked) as a float in (0, inf); a traced SymFloat as is."""
    if isinstance(x, torch.SymFloat):
        return x
    x = float(x)
    if not _finite_positive(x):
        raise ValueError(f"rattention_ext.{what}: {name} must be a finite number > 0{why}, got {x}")
    return x


def check_int(what: str, name: str, value, lo: int, hi: int = _INT64_MAX) -> int:
    """``value`` must be an int (not a bool, not a float) in ``[lo, hi]``."""
    if not _is_int(value):
        raise TypeError(f"rattention_ext.{what}: {name} must be an int, got "
                        f"{type(value).__name__} {value!r}")
    if isinstance(value, torch.SymInt):
        return value
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"rattention_ext.{what}: {name} must be an int in [{lo}, {hi}], got "
                         f"{value}")
    return value


def window(what: str, window_size) -> int:
    """The SWA left context: an int ``w >= 0`` (any size up to 2^63 - 1; the op layer clamps
    it to the sequence length)."""
    return check_int(what, "window_size", window_size, 0)


def softmax_scale(what: str, scale, head_dim: int) -> float:
    """The SWA scale as a Python float: default ``1/sqrt(D)``; else a finite number > 0."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, Tensor):
        raise TypeError(f"rattention_ext.{what}: softmax_scale must be a Python number, got a "
                        f"tensor (a tensor scale would get no gradient); pass float(scale)")
    if not _is_real(scale):
        raise TypeError(f"rattention_ext.{what}: softmax_scale must be a number (or None for "
                        f"1/sqrt(D)), got {type(scale).__name__} {scale!r}")
    return _positive(what, "softmax_scale", scale)


def norm_eps(what: str, eps) -> float:
    """The RMS-norm epsilon: a finite number > 0 (so an all-zero branch mixes in as zero)."""
    if isinstance(eps, Tensor) or not _is_real(eps):
        raise TypeError(f"rattention_ext.{what}: norm_eps must be a number, got "
                        f"{type(eps).__name__} {eps!r}")
    return _positive(what, "norm_eps", eps, " (with 0 an all-zero branch output would mix in as "
                     "NaN)")


def feature_map(what: str, fm) -> str:
    if not isinstance(fm, str) or fm not in FEATURE_MAPS:
        raise ValueError(f"rattention_ext.{what}: feature_map must be 'softmax' or 'relu', got "
                         f"{fm!r}")
    return fm


def tiling(what: str, chunk_size, checkpoint_every):
    """RLA chunk length in [1, 1024] and the checkpoint interval >= 1 (values beyond the
    number of chunks save one state; the op layer clamps them)."""
    return (check_int(what, "chunk_size", chunk_size, 1, MAX_CHUNK_SIZE),
            check_int(what, "checkpoint_every", checkpoint_every, 1))


def no_grad_tensor(what: str, name: str, t: Optional[Tensor]) -> None:
    """Inputs the kernels read but do not differentiate (rotary tables) must not ask for a
    gradient: it would silently stay None."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"rattention_ext.{what}: {name} must be a tensor or None, got "
                        f"{type(t).__name__}")
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"rattention_ext.{what}: {name} requires grad, but no gradient flows "
                         f"into it (it is a fixed table); pass {name}.detach()")


def optional_tensor(what: str, name: str, t) -> None:
    if t is not None and not isinstance(t, Tensor):
        raise TypeError(f"rattention_ext.{what}: {name} must be a tensor or None, got "
                        f"{type(t).__name__}")


def qkv(what: str, q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"rattention_ext.{what}: {name} must be a tensor, got "
                            f"{type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"rattention_ext.{what}: {name} must be 4-D [B, T, H, D], got shape "
                             f"{list(t.shape)}")
    # The ops take extra leading k/v rows as a halo (continuation.py); a public call does not,
    # so a k or v of another length is a mistake, not earlier context.
    for name, t in (("k", k), ("v", v)):
        if t.shape[1] != q.shape[1]:
            raise ValueError(f"rattention_ext.{what}: {name} must have q's sequence length "
                             f"T = {q.shape[1]} (dim 1), got shape {list(t.shape)}; to continue a "
                             f"sequence from earlier keys use rattention_ext.continuation")
