"""Shared test helpers (import them with ``from conftest import ...``): small and generic."""
import torch


def rel_err(a, b):
    """||a - b|| / ||b|| in float64 (NaN anywhere in ``a`` gives NaN, which never passes)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def rotary_tables(P, D, dtype=torch.float64, theta=10000.0):
    """Half-split rotary tables ``cos, sin [P, D/2]`` for positions 0 .. P-1."""
    inv = 1.0 / theta ** (torch.arange(0, D // 2, dtype=torch.float64) / (D // 2))
    ang = torch.arange(P, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def make_qkv(B, T, Hq, Hkv, D, dtype, seed, layout="contiguous"):
    """Fresh random ``q [B,T,Hq,D]``, ``k, v [B,T,Hkv,D]`` (drawn in float64, then cast).

    ``layout``: "contiguous"; "perm" (memory [B, H, T, D]: strided rows, what the kernels
    read directly); "strided" (head dim strided by 2 as well: the op layer copies it).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for H in (Hq, Hkv, Hkv):
        x = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype)
        if layout != "contiguous":
            step = 2 if layout == "strided" else 1
            big = torch.zeros(B, H, T, step * D, dtype=dtype)
            big[..., ::step] = x.transpose(1, 2)
            x = big[..., ::step].transpose(1, 2)
        out.append(x)
    return tuple(out)
