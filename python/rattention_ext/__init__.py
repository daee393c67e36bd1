"""rattention_ext: RAttention (sliding-window softmax attention + residual linear attention)
for PyTorch, with CUDA and CPU kernels registered as ``torch.ops.rattention_ext``.

    import rattention_ext
    o = rattention_ext.forward(q, k, v, window_size=512)     # [B, T, Hq, D]
    o = rattention_ext.forward(q, k, v, window_size=512,     # packed documents:
                               cu_seqlens=cu_seqlens)        # q [total, Hq, D]

See ``rattention_ext.reference`` for the plain-PyTorch definition (SPEC.md). JAX users:
``rattention_ext.jax`` runs the same kernels as XLA FFI custom calls (imported on its own;
built when jax is installed), ``rattention_ext.jax_reference`` is a pure-JAX oracle.
"""
from __future__ import annotations

from . import _ops  # noqa: F401  (registers fake kernels and autograd)
from ._C import build_info as _build_info
from .api import forward, residual_linear_attention, sliding_window_attention
from .decode import RAttentionCache, cache_bytes, decode_step, prefill
from .varlen import cu_seqlens_from_position_ids
from . import nn  # noqa: F401  (rattention_ext.nn.RAttention)

__version__ = "0.1.0"

__all__ = [
    "forward",
    "sliding_window_attention",
    "residual_linear_attention",
    "RAttentionCache",
    "prefill",
    "decode_step",
    "cache_bytes",
    "cu_seqlens_from_position_ids",
    "build_info",
    "__version__",
]


def build_info() -> dict:
    """What this build contains: version, whether CUDA kernels are compiled in, the CUDA
    architectures, the CUDA and CUTLASS versions, and the torch it was built against."""
    return dict(_build_info())
