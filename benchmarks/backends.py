"""The implementations the benchmark compares, behind one interface.

* ``ours``   rattention_ext (CPU kernels on CPU tensors, CUDA kernels on CUDA tensors).
* ``torch``  the plain-PyTorch composition a user would write without this package:
             SDPA with a band mask for SWA (``enable_gqa``), chunked linear attention in
             torch ops for RLA (shift by padding, per-chunk states with ``cumsum``), RMS
             mixing in torch ops, autograd for the backward.
* ``flex``   FlexAttention with a sliding-window block mask (CUDA only, SWA only).
* ``flash``  flash-attn's ``window_size`` (CUDA, SWA only, when installed).
* ``fla``    flash-linear-attention chunked linear attention (CUDA, RLA only, when installed)
             on the feature-mapped, shifted q/k a user would hand it.

``Backend.build(op, case)`` returns ``fn(i)`` that runs one call on input set ``i`` (the
inputs are made inside ``build``; their construction is not timed), or raises
``Unsupported`` with the reason.
Ops: ``swa_fwd``, ``rla_fwd``, ``fwd`` (full RAttention forward), ``fwd_bwd`` (forward and
backward into q, k, v), ``decode`` (one decode step with a context of T tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

OPS = ("swa_fwd", "rla_fwd", "fwd", "fwd_bwd", "decode")


class Unsupported(Exception):
    """This backend cannot run this case (the message says why)."""


@dataclass
class Case:
    op: str
    B: int
    T: int
    Hq: int
    Hkv: int
    D: int
    w: int
    dtype: str = "float32"
    device: str = "cpu"
    feature_map: str = "softmax"
    chunk: int = 64

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def as_dict(self) -> Dict:
        return asdict(self)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- inputs -----------------------------------------------------------------------------
def make_inputs(case: Case, n_sets: int = 1, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    """Fresh random q, k, v (and a gradient for the backward) per set, [B, T, H, D]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev, dt = torch.device(case.device), case.torch_dtype
    T = 1 if case.op == "decode" else case.T
    sets = []
    for _ in range(n_sets):
        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(device=dev, dtype=dt)
        s = {"q": rnd(case.B, T, case.Hq, case.D), "k": rnd(case.B, T, case.Hkv, case.D),
             "v": rnd(case.B, T, case.Hkv, case.D)}
        if case.op == "fwd_bwd":
            s["grad"] = rnd(case.B, T, case.Hq, case.D)
        sets.append(s)
    return sets


def bytes_per_set(case: Case) -> int:
    es = torch.empty(0, dtype=case.torch_dtype).element_size()
    T = 1 if case.op == "decode" else case.T
    n = case.B * T * (2 * case.Hq + 2 * case.Hkv) * case.D
    return n * es


# ---- the plain-PyTorch composition ------------------------------------------------------
def torch_feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    x = x.to(_acc(x.dtype))
    if kind == "softmax":
        return torch.cat([x.softmax(-1), (-x).softmax(-1)], dim=-1)
    return torch.cat([x.relu(), (-x).relu()], dim=-1)


def band_mask(T: int, w: int, device) -> torch.Tensor:
    """Boolean [T, T] mask, True where 0 <= t - s <= w."""
    i = torch.arange(T, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d <= w)


def torch_swa(q, k, v, w: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SWA with SDPA and a band mask; [B, T, H, D] in and out."""
    if mask is None:
        mask = band_mask(q.shape[1], w, q.device)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def torch_rla(q, k, v, w: int, feature_map: str = "softmax", chunk: int = 64) -> torch.Tensor:
    """Residual linear attention as chunked linear attention in torch ops.

    Keys/values are shifted right by w + 1 (zero rows in front, after the feature map) so
    that the branch becomes plain causal linear attention: shifted key s' = s + w + 1 is
    visible to query t iff s' <= t, i.e. t - s >= w + 1. Output float32 [B, T, Hq, D].
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    Fd = 2 * D
    acc = _acc(q.dtype)
    s = w + 1
    n = -(-T // chunk)
    pad = n * chunk - T
    pq = F.pad(torch_feature_map(q, feature_map), (0, 0, 0, 0, 0, pad))
    pk = F.pad(torch_feature_map(k, feature_map), (0, 0, 0, 0, s, 0))[:, :T]
    vv = F.pad(v.to(acc), (0, 0, 0, 0, s, 0))[:, :T]
    pk = F.pad(pk, (0, 0, 0, 0, 0, pad))
    vv = F.pad(vv, (0, 0, 0, 0, 0, pad))
    qc = pq.reshape(B, n, chunk, Hkv, G, Fd).permute(0, 3, 4, 1, 2, 5)  # [B, Hkv, G, n, C, F]
    kc = pk.reshape(B, n, chunk, Hkv, Fd).permute(0, 3, 1, 2, 4)        # [B, Hkv, n, C, F]
    vc = vv.reshape(B, n, chunk, Hkv, D).permute(0, 3, 1, 2, 4)         # [B, Hkv, n, C, D]
    kv = kc.transpose(-1, -2) @ vc                                       # [B, Hkv, n, F, D]
    state = kv.cumsum(dim=2) - kv                                        # exclusive prefix
    o = qc @ state.unsqueeze(2)                                          # inter-chunk
    a = qc @ kc.unsqueeze(2).transpose(-1, -2)                           # [B, Hkv, G, n, C, C]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    o = o + a.masked_fill(~causal, 0.0) @ vc.unsqueeze(2)                # intra-chunk
    return o.permute(0, 3, 4, 1, 2, 5).reshape(B, n * chunk, Hq, D)[:, :T]


def torch_rms_mix(a, b, ga, gb, eps: float = 1e-8) -> torch.Tensor:
    acc = _acc(a.dtype)
    a, b = a.to(acc), b.to(acc)
    ya = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + eps) * ga
    yb = b * torch.rsqrt(b.pow(2).mean(-1, keepdim=True) + eps) * gb
    return ya + yb


def torch_forward(q, k, v, w: int, feature_map: str = "softmax", ga=None, gb=None,
                  mask: Optional[torch.Tensor] = None, chunk: int = 64) -> torch.Tensor:
    """Full RAttention in plain PyTorch: rms(SWA) * g_swa + rms(RLA) * g_rla, q's dtype."""
    acc = _acc(q.dtype)
    if ga is None:
        ga = torch.ones(q.shape[2], q.shape[3], dtype=acc, device=q.device)
    if gb is None:
        gb = torch.ones(q.shape[2], q.shape[3], dtype=acc, device=q.device)
    o_swa = torch_swa(q, k, v, w, mask)
    o_rla = torch_rla(q, k, v, w, feature_map, chunk)
    return torch_rms_mix(o_swa, o_rla, ga, gb).to(q.dtype)


def torch_decode_step(q, k, v, k_cache, v_cache, state, pos, feature_map, scale, ga, gb,
                      eps: float = 1e-8) -> torch.Tensor:
    """One decode step in torch ops (SPEC.md 'Decoding'); mutates the cache. q: [B, 1, Hq, D]."""
    B, _, Hq, D = q.shape
    W1, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    ar = torch.arange(B, device=q.device)
    slot = pos % W1
    leaving = (pos >= W1).to(state.dtype)[:, None, None, None]
    pk_old = torch_feature_map(k_cache[ar, slot], feature_map)            # [B, Hkv, F]
    state += leaving * (pk_old.unsqueeze(-1) * v_cache[ar, slot].to(state.dtype).unsqueeze(-2))
    k_cache[ar, slot] = k[:, 0]
    v_cache[ar, slot] = v[:, 0]
    qg = q[:, 0].reshape(B, Hkv, G, D).to(state.dtype)
    scores = torch.einsum("bhgd,bjhd->bhgj", qg, k_cache.to(state.dtype)) * scale
    valid = torch.arange(W1, device=q.device)[None, :] <= pos[:, None]   # ring not yet full
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    o_swa = torch.einsum("bhgj,bjhd->bhgd", scores.softmax(-1), v_cache.to(state.dtype))
    o_rla = torch.einsum("bhgf,bhfd->bhgd", torch_feature_map(qg, feature_map), state)
    pos += 1
    out = torch_rms_mix(o_swa.reshape(B, 1, Hq, D), o_rla.reshape(B, 1, Hq, D), ga, gb, eps)
    return out.to(q.dtype)


def _decode_cache(case: Case, seed: int = 1):
    """A cache as after a prefill of T tokens: full ring, a random (positive) state."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev, dt = torch.device(case.device), case.torch_dtype
    W1 = case.w + 1
    kc = torch.randn(case.B, W1, case.Hkv, case.D, generator=g).to(device=dev, dtype=dt)
    vc = torch.randn(case.B, W1, case.Hkv, case.D, generator=g).to(device=dev, dtype=dt)
    st = torch.rand(case.B, case.Hkv, 2 * case.D, case.D, generator=g).to(dev, _acc(dt))
    pos = torch.full((case.B,), case.T, dtype=torch.long, device=dev)
    return kc, vc, st, pos


# ---- backends ---------------------------------------------------------------------------
class Backend:
    name = "?"
    label = "?"

    def available(self, device: str) -> Optional[str]:
        """None if usable on `device`, else the reason it is not."""
        return None

    def build(self, case: Case, sets: List[Dict[str, torch.Tensor]]) -> Callable[[int], object]:
        """fn(i) running the case on input set i; every backend defines it."""
        raise TypeError(f"backend {self.name!r} does not define build()")


def _fwd_bwd(f, sets):
    """fn(i): forward on set i, backward into (q, k, v) with the set's gradient."""
    for s in sets:
        for name in ("q", "k", "v"):
            s[name].requires_grad_(True)

    def run(i):
        s = sets[i % len(sets)]
        out = f(s["q"], s["k"], s["v"])
        return torch.autograd.grad(out, (s["q"], s["k"], s["v"]), s["grad"])
    return run


class Ours(Backend):
    name, label = "ours", "rattention_ext"

    def available(self, device):
        try:
            import rattention_ext  # noqa: F401
        except Exception as e:  # pragma: no cover - depends on the build
            return f"rattention_ext not importable: {e}"
        if device == "cuda":
            import rattention_ext
            if not rattention_ext.build_info().get("cuda"):
                return "rattention_ext built without CUDA kernels"
        return None

    def build(self, case, sets):
        import rattention_ext as r
        from rattention_ext._ops import ops
        w, fm, C = case.w, case.feature_map, case.chunk
        if case.op == "swa_fwd":
            return lambda i: r.sliding_window_attention(**_qkv(sets, i), window_size=w)
        if case.op == "rla_fwd":
            return lambda i: r.residual_linear_attention(**_qkv(sets, i), window_size=w,
                                                         feature_map=fm, chunk_size=C)
        if case.op == "fwd":
            return lambda i: r.forward(**_qkv(sets, i), window_size=w, feature_map=fm, chunk_size=C)
        if case.op == "fwd_bwd":
            return _fwd_bwd(lambda q, k, v: r.forward(q, k, v, window_size=w, feature_map=fm,
                                                      chunk_size=C), sets)
        if case.op == "decode":
            kc, vc, st, pos = _decode_cache(case)
            ga = torch.ones(case.Hq, case.D, dtype=st.dtype, device=st.device)
            scale = 1.0 / math.sqrt(case.D)
            return lambda i: ops.decode_step(
                **_qkv(sets, i), k_cache=kc, v_cache=vc, state=st, pos=pos, feature_map=fm,
                softmax_scale=scale, initial_state=None, rotary_cos=None, rotary_sin=None,
                swa_weight=ga, rla_weight=ga, eps=1e-8)
        raise Unsupported(case.op)


def _qkv(sets, i):
    s = sets[i % len(sets)]
    return {"q": s["q"], "k": s["k"], "v": s["v"]}


class PlainTorch(Backend):
    name, label = "torch", "plain PyTorch (SDPA band mask + chunked torch RLA)"

    def build(self, case, sets):
        w, fm, C = case.w, case.feature_map, case.chunk
        if case.op == "decode":
            kc, vc, st, pos = _decode_cache(case)
            ga = torch.ones(case.Hq, case.D, dtype=st.dtype, device=st.device)
            scale = 1.0 / math.sqrt(case.D)
            return lambda i: torch_decode_step(**_qkv(sets, i), k_cache=kc, v_cache=vc, state=st,
                                               pos=pos, feature_map=fm, scale=scale, ga=ga, gb=ga)
        # The [T, T] band mask is built once, outside the timed call (a user would cache it).
        mask = band_mask(case.T, w, case.device) if case.op != "rla_fwd" else None
        if case.op == "swa_fwd":
            return lambda i: torch_swa(**_qkv(sets, i), w=w, mask=mask)
        if case.op == "rla_fwd":
            return lambda i: torch_rla(**_qkv(sets, i), w=w, feature_map=fm, chunk=C)
        if case.op == "fwd":
            return lambda i: torch_forward(**_qkv(sets, i), w=w, feature_map=fm, mask=mask, chunk=C)
        if case.op == "fwd_bwd":
            return _fwd_bwd(lambda q, k, v: torch_forward(q, k, v, w, fm, mask=mask, chunk=C), sets)
        raise Unsupported(case.op)


class Flex(Backend):
    name, label = "flex", "FlexAttention (sliding-window block mask)"

    def available(self, device):
        if device != "cuda":
            return "FlexAttention peer is CUDA only"
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except Exception as e:
            return f"FlexAttention not importable: {e}"
        return None

    def build(self, case, sets):
        if case.op != "swa_fwd":
            raise Unsupported("FlexAttention covers the SWA branch only")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        w = case.w

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx <= w)
        bm = create_block_mask(sliding, None, None, case.T, case.T, device=case.device)
        flex = torch.compile(flex_attention, dynamic=False)
        gqa = case.Hq != case.Hkv

        def run(i):
            s = sets[i % len(sets)]
            return flex(s["q"].transpose(1, 2), s["k"].transpose(1, 2), s["v"].transpose(1, 2),
                        block_mask=bm, enable_gqa=gqa).transpose(1, 2)
        return run


class FlashAttn(Backend):
    name, label = "flash", "flash-attn window_size"

    def available(self, device):
        if device != "cuda":
            return "flash-attn is CUDA only"
        try:
            import flash_attn  # noqa: F401
        except Exception as e:
            return f"flash-attn not installed: {e}"
        return None

    def build(self, case, sets):
        if case.op != "swa_fwd":
            raise Unsupported("flash-attn covers the SWA branch only")
        if case.dtype not in ("float16", "bfloat16"):
            raise Unsupported("flash-attn needs fp16/bf16")
        from flash_attn import flash_attn_func
        return lambda i: flash_attn_func(**_qkv(sets, i), causal=True, window_size=(case.w, 0))


class Fla(Backend):
    name, label = "fla", "flash-linear-attention chunk_linear_attn"

    def available(self, device):
        if device != "cuda":
            return "flash-linear-attention is CUDA only"
        try:
            from fla.ops.linear_attn import chunk_linear_attn  # noqa: F401
        except Exception as e:
            return f"flash-linear-attention not installed: {e}"
        return None

    def build(self, case, sets):
        if case.op != "rla_fwd":
            raise Unsupported("flash-linear-attention covers the RLA branch only")
        import inspect
        from fla.ops.linear_attn import chunk_linear_attn
        params = inspect.signature(chunk_linear_attn).parameters
        kw = {}
        if "normalize" in params:
            kw["normalize"] = False
        if "scale" in params:
            kw["scale"] = 1.0
        if "head_first" in params:
            kw["head_first"] = False
        G = case.Hq // case.Hkv
        s = case.w + 1

        def run(i):
            x = sets[i % len(sets)]
            # What a user does to hand RLA to fla: feature maps, shift k/v by w + 1, expand GQA.
            pq = torch_feature_map(x["q"], case.feature_map).to(x["q"].dtype)
            pk = F.pad(torch_feature_map(x["k"], case.feature_map).to(x["k"].dtype),
                       (0, 0, 0, 0, s, 0))[:, :case.T]
            vv = F.pad(x["v"], (0, 0, 0, 0, s, 0))[:, :case.T]
            pk = pk.repeat_interleave(G, dim=2)
            vv = vv.repeat_interleave(G, dim=2)
            return chunk_linear_attn(pq, pk, vv, **kw)
        return run


BACKENDS: Dict[str, Backend] = {b.name: b for b in (Ours(), PlainTorch(), Flex(), FlashAttn(), Fla())}
