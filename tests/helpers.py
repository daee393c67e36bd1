"""The one helpers module of the test suite (``from helpers import ...``): relative error,
fresh inputs, rotary tables, NaN poisoning, plain-dtype baselines, the CUDA-required
marker. Test modules import from here, never from each other."""
from __future__ import annotations

import pytest
import torch

import rattention_ext
from rattention_ext import reference as ref

HAS_CUDA_KERNELS = torch.cuda.is_available() and bool(
    rattention_ext.build_info().get("cuda", False))
requires_cuda = pytest.mark.skipif(
    not HAS_CUDA_KERNELS, reason="needs a CUDA device and a build with the CUDA kernels")

FLOOR = 5e-4  # relative floor added to the 2x-plain-baseline bound (bf16/fp16 rule)


def rel_err(a, b):
    """||a - b|| / ||b|| in float64 (NaN anywhere in ``a`` gives NaN, which never passes)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def rel_err_no_nan(x, r):
    """rel_err that fails loudly on NaN (kernel outputs that were never written)."""
    assert not torch.isnan(x).any(), "NaN in kernel output"
    return rel_err(x, r)


def rotary_tables(P, D, dtype=torch.float64, theta=10000.0, device=None):
    """Half-split rotary tables ``cos, sin [P, D/2]`` for positions 0 .. P-1."""
    inv = 1.0 / theta ** (torch.arange(0, D // 2, dtype=torch.float64, device=device) / (D // 2))
    ang = torch.arange(P, dtype=torch.float64, device=device)[:, None] * inv[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def make_qkv(B, T, Hq, Hkv, D, dtype, seed, layout="contiguous", device=None):
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
        out.append(x.to(device) if device is not None else x)
    return tuple(out)


def poison_cuda_allocator(blocks: int = 16):
    """Fill the CUDA caching allocator's free blocks with NaN (the next allocations reuse
    them), so an output element a kernel forgets to write shows up as NaN."""
    tmp = [torch.full((1 << 22,), float("nan"), device="cuda") for _ in range(blocks)]
    del tmp


def nan_at(x, index, value=float("nan")):
    """A copy of ``x`` with ``x[index] = value`` (NaN by default; use inf for Inf)."""
    y = x.detach().clone()
    y[index] = value
    return y


def plain_swa(q, k, v, w, scale, cos=None, sin=None):
    """SWA in plain PyTorch in q's dtype (the SPEC's reduced-precision yardstick):
    ``(o, lse)``."""
    dt = q.dtype
    if cos is not None:
        q = ref.apply_rotary(q, cos.to(dt), sin.to(dt))
        k = ref.apply_rotary(k, cos.to(dt), sin.to(dt))
    G = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    T = q.shape[1]
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    t = torch.arange(T, device=q.device)
    vis = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] <= w)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.einsum("bhts,bshd->bthd", torch.softmax(s, dim=-1), v)
    return o, lse


def plain_rla(q, k, v, w, fm, h0):
    """The RLA in plain PyTorch, every tensor in q's dtype (the accuracy baseline)."""
    dt = q.dtype
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    if fm == "softmax":
        phi = lambda x: torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1)  # noqa: E731
    else:
        phi = lambda x: torch.cat([torch.relu(x), torch.relu(-x)], -1)  # noqa: E731
    pq = phi(q).transpose(1, 2)  # [B, Hq, T, 2D]
    pk = phi(k).repeat_interleave(G, 2).transpose(1, 2)
    vv = v.repeat_interleave(G, 2).transpose(1, 2)
    t = torch.arange(T, device=q.device)
    mask = (t[:, None] - t[None, :]) >= w + 1
    a = (pq @ pk.transpose(-1, -2)) * mask.to(dt)
    o = a @ vv
    if h0 is not None:
        o = o + pq @ h0.to(dt)
    n = max(0, T - w - 1)
    pk1 = phi(k).transpose(1, 2)[:, :, :n]  # [B, Hkv, n, 2D]
    st = pk1.transpose(-1, -2) @ v.transpose(1, 2)[:, :, :n]
    return o.transpose(1, 2), st


def load_emulator():
    """The host emulator's module ``rattention_emu`` (tools/emu: the CUDA kernels run on the
    CPU), built if needed; RATTENTION_EMU_MODULE names a prebuilt one (make emu-mutants).
    Skips the test when a prerequisite is missing here (a compile error fails)."""
    import importlib.util
    import os
    import sys
    from pathlib import Path

    prebuilt = os.environ.get("RATTENTION_EMU_MODULE")
    if prebuilt:
        spec = importlib.util.spec_from_file_location("rattention_emu", prebuilt)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "emu"))
        import build
        try:
            mod = build.load()
        except build.EmulatorUnavailable as e:
            pytest.skip(f"CUDA emulator not buildable here: {e}")
    mod.set_arch(emu_arch())
    return mod


def emu_arch() -> int:
    """The GPU architecture the emulator's launches are checked against (RATTENTION_EMU_ARCH,
    default 80: its shared-memory and register limits); tests that emulate another set it
    back to this one."""
    import os

    return int(os.environ.get("RATTENTION_EMU_ARCH", "80"))


def emu_kernel(*sources):
    """Marks a test with the kernel sources (csrc/cuda file names) it exercises:
    tools/emu/mutants.py runs the `mutants`-marked tests that name the file it mutates."""
    return pytest.mark.emu_kernel(*sources)


# ---- the NaN / Inf rule: which rows a non-finite token may reach --------------------------
def seen_positions(name, T, w, t):
    """Key positions query row t depends on (SWA: t-w .. t; RLA: .. t-w-1; both: .. t)."""
    u = torch.arange(T)
    if name == "swa":
        return (u <= t) & (u >= t - w)
    if name == "rla":
        return u <= t - w - 1
    return u <= t


def unchanged_positions(name, T, w, s, which):
    """(output rows, q-gradient rows, k/v-gradient rows) that a non-finite value at token s of
    input ``which`` cannot reach. Softmax attention couples a row's gradients through its
    lse and Di, so the k/v rows seen by any reached row count as reached (conservative)."""
    t = torch.arange(T)
    if which == "q":
        bad_rows = t == s  # q[s] only reaches row s
    else:
        bad_rows = torch.stack([seen_positions(name, T, w, r)[s] for r in range(T)])
    kv_seen = torch.zeros(T, dtype=torch.bool)
    for r in range(T):
        if bad_rows[r]:
            kv_seen |= seen_positions(name, T, w, r)
    if which != "q":
        kv_seen[s] = True
    return ~bad_rows, ~bad_rows, ~kv_seen


def rla_unchanged_positions(T, w, s, which):
    """Exactly what a non-finite value at token s cannot reach in the RLA (no normaliser, so
    no coupling through row statistics): (output rows, dq rows, dk/dv rows).
    q[s]: only row s, and dk/dv of the keys row s sees (u <= s - w - 1).
    k[s] or v[s]: rows t >= s + w + 1 (and the final state), dq of those rows, dk/dv of s."""
    t = torch.arange(T)
    if which == "q":
        rows = t != s
        return rows, rows, t > s - w - 1
    rows = t < s + w + 1
    return rows, rows, t != s
