"""A tiny local-global language model on top of ``rattention_ext``.

Embedding -> N pre-norm blocks (RMSNorm -> attention -> residual, RMSNorm -> SwiGLU ->
residual) -> RMSNorm -> LM head (tied to the embedding or not). The attention of each
block follows ``layer_pattern``: by default three local layers then one global layer,
repeated. "Local" is either

* ``"rattention"``: ``rattention_ext.nn.RAttention`` (SWA + residual linear attention, the
  kernels via ``rattention_ext.forward``), or
* ``"swa"``: plain sliding-window attention with the same window and rotary embedding
  (``rattention_ext.sliding_window_attention``, the same SWA kernels, no RLA branch);

"global" is full causal softmax attention (``torch.nn.functional.scaled_dot_product_attention``
with ``is_causal=True``) with the same rotary embedding.

    from tiny_lm import TinyLM, TinyLMConfig
    model = TinyLM(TinyLMConfig(vocab_size=256, local="rattention", window_size=64))
    logits = model(tokens)               # [B, T, vocab]

Run this file for a smoke test: ``python examples/tiny_lm.py``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rattention_ext
from rattention_ext.nn import RAttention, rotary_tables


@dataclass
class TinyLMConfig:
    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None          # default hidden_size // num_heads
    mlp_hidden: Optional[int] = None        # default 8/3 * hidden_size rounded up to 8
    window_size: int = 64
    local: str = "rattention"               # "rattention" or "swa"
    # One letter per layer, cycled: "L" local, "G" global. "LLLG" = 3 local : 1 global.
    layer_pattern: str = "LLLG"
    feature_map: str = "softmax"
    learned_init_state: bool = False
    rope_theta: float = 500000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-6


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split rotary of ``x [B, T, H, D]`` with tables ``[>= T, D/2]``."""
    T, d2 = x.shape[1], x.shape[-1] // 2
    c = cos[:T].to(x.dtype)[None, :, None, :]
    s = sin[:T].to(x.dtype)[None, :, None, :]
    x1, x2 = x[..., :d2], x[..., d2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class _SoftmaxAttention(nn.Module):
    """Shared projections + rotary for the two softmax baselines (SWA and global)."""

    def __init__(self, cfg: TinyLMConfig, window_size: Optional[int]):
        super().__init__()
        self.h, self.hkv = cfg.num_heads, cfg.num_kv_heads
        self.d = cfg.head_dim or cfg.hidden_size // cfg.num_heads
        self.window_size = window_size  # None: global causal attention
        self.theta = cfg.rope_theta
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)
        self._tables = {}

    def _rotary(self, n: int, device, dtype):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        key = (torch.device(device), acc)
        t = self._tables.get(key)
        if t is None or t[0].shape[0] < n:
            t = rotary_tables(max(n, 64), self.d, self.theta, device=device, dtype=acc)
            self._tables[key] = t
        return t

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.d)
        k = self.k_proj(x).view(B, T, self.hkv, self.d)
        v = self.v_proj(x).view(B, T, self.hkv, self.d)
        cos, sin = self._rotary(T, x.device, x.dtype)
        if self.window_size is not None:
            # The SWA kernel applies the rotary itself.
            o = rattention_ext.sliding_window_attention(
                q, k, v, window_size=self.window_size, rotary_cos=cos, rotary_sin=sin)
        else:
            qr, kr = _rope(q, cos, sin).transpose(1, 2), _rope(k, cos, sin).transpose(1, 2)
            o = F.scaled_dot_product_attention(qr, kr, v.transpose(1, 2), is_causal=True,
                                               enable_gqa=self.h != self.hkv).transpose(1, 2)
        return self.o_proj(o.reshape(B, T, self.h * self.d))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate = nn.Linear(hidden, inner, bias=False)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: TinyLMConfig, kind: str):
        super().__init__()
        self.kind = kind  # "rattention", "swa" or "global"
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if kind == "rattention":
            self.attn = RAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.window_size,
                                   head_dim=cfg.head_dim, feature_map=cfg.feature_map,
                                   rope_theta=cfg.rope_theta,
                                   learned_init_state=cfg.learned_init_state)
        elif kind == "swa":
            self.attn = _SoftmaxAttention(cfg, cfg.window_size)
        elif kind == "global":
            self.attn = _SoftmaxAttention(cfg, None)
        else:
            raise ValueError(f"unknown attention kind {kind!r}")
        inner = cfg.mlp_hidden or (8 * cfg.hidden_size // 3 + 7) // 8 * 8
        self.mlp = SwiGLU(cfg.hidden_size, inner)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyLM(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        if cfg.local not in ("rattention", "swa"):
            raise ValueError(f"local must be 'rattention' or 'swa', got {cfg.local!r}")
        if not cfg.layer_pattern or set(cfg.layer_pattern) - {"L", "G"}:
            raise ValueError(f"layer_pattern must be letters L/G, got {cfg.layer_pattern!r}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        kinds = [cfg.local if cfg.layer_pattern[i % len(cfg.layer_pattern)] == "L" else "global"
                 for i in range(cfg.num_layers)]
        self.blocks = nn.ModuleList(Block(cfg, k) for k in kinds)
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def layer_kinds(self):
        return [b.kind for b in self.blocks]

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.head is None else self.head(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _smoke():
    torch.manual_seed(0)
    for local in ("rattention", "swa"):
        cfg = TinyLMConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=2,
                           num_kv_heads=1, window_size=8, local=local)
        model = TinyLM(cfg)
        tok = torch.randint(0, 64, (2, 40))
        logits = model(tok)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 64), tok[:, 1:].reshape(-1))
        loss.backward()
        print(f"{local:10s} layers={model.layer_kinds} params={model.num_parameters()} "
              f"loss={loss.item():.4f}")
    print("config fields:", [f.name for f in dataclasses.fields(TinyLMConfig)])


if __name__ == "__main__":
    _smoke()
