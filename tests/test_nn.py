"""rattention_ext.nn.RAttention: forward/backward, equality with a hand composition of the
float64 reference, decoding (prefill + step) against forward, and a short training run of
the tiny local-global LM from examples/."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rattention_ext
from rattention_ext import reference
from rattention_ext.nn import RAttention, rotary_tables

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _randomise(layer: RAttention, seed: int):
    """Non-trivial values for every parameter (norm scales and init state are not left at
    their ones / zeros init, so a dropped parameter cannot go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if "norm_weight" in name:
                p.copy_(1.0 + 0.5 * r)
            elif name == "initial_state":
                p.copy_(0.3 * r)
            else:
                p.copy_(r / math.sqrt(p.shape[-1]))


def _hand_composition(layer: RAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer written out by hand on top of rattention_ext.reference (float64)."""
    B, T, _ = x.shape
    Hq, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = F.linear(x, layer.q_proj.weight, layer.q_proj.bias).view(B, T, Hq, D)
    k = F.linear(x, layer.k_proj.weight, layer.k_proj.bias).view(B, T, Hkv, D)
    v = F.linear(x, layer.v_proj.weight, layer.v_proj.bias).view(B, T, Hkv, D)
    # rotary tables written independently of rattention_ext.nn.rotary_tables
    inv = torch.tensor([layer.rope_theta ** (-(2.0 * i) / D) for i in range(D // 2)],
                       dtype=torch.float64)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    o = reference.forward(q, k, v, window_size=layer.window_size, feature_map=layer.feature_map,
                          swa_norm_weight=layer.swa_norm_weight,
                          rla_norm_weight=layer.rla_norm_weight, norm_eps=layer.norm_eps,
                          initial_state=layer.initial_state,
                          rotary_cos=ang.cos().to(x.dtype), rotary_sin=ang.sin().to(x.dtype))
    return F.linear(o.reshape(B, T, Hq * D), layer.o_proj.weight, layer.o_proj.bias)


# ---- construction -----------------------------------------------------------------------
def test_parameters_and_shapes():
    layer = RAttention(48, 4, 2, 7, head_dim=16, learned_init_state=True, bias=True)
    names = dict(layer.named_parameters())
    assert set(names) == {"q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                          "v_proj.weight", "v_proj.bias", "o_proj.weight", "o_proj.bias",
                          "swa_norm_weight", "rla_norm_weight", "initial_state"}
    assert names["q_proj.weight"].shape == (64, 48)
    assert names["k_proj.weight"].shape == (32, 48)
    assert names["o_proj.weight"].shape == (48, 64)
    assert names["swa_norm_weight"].shape == (4, 16)
    assert torch.equal(names["rla_norm_weight"], torch.ones(4, 16))
    assert names["initial_state"].shape == (1, 4, 32, 16)
    assert torch.count_nonzero(names["initial_state"]) == 0
    assert RAttention(32, 2, 2, 4).initial_state is None
    assert RAttention(32, 2, 2, 4).head_dim == 16


def test_rotary_tables_half_split():
    cos, sin = rotary_tables(11, 8, 10000.0, dtype=torch.float64)
    assert cos.shape == sin.shape == (11, 4)
    t, i = 7, 3
    ang = t * 10000.0 ** (-2 * i / 8)
    assert abs(cos[t, i].item() - math.cos(ang)) < 1e-15
    assert abs(sin[t, i].item() - math.sin(ang)) < 1e-15
    layer = RAttention(16, 2, 1, 3)
    c1, _ = layer.rotary(10, "cpu", torch.float32)
    c2, _ = layer.rotary(5, "cpu", torch.float32)
    assert c2 is c1 and c1.shape[0] >= 10        # cached, reused for shorter sequences
    c3, _ = layer.rotary(500, "cpu", torch.float32)
    assert c3.shape[0] >= 500 and torch.equal(c3[:10], c1[:10])


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden_size=32, num_heads=3, num_kv_heads=2, window_size=4), "num_kv_heads"),
    (dict(hidden_size=32, num_heads=2, num_kv_heads=1, window_size=-1), "window_size"),
    (dict(hidden_size=32, num_heads=2, num_kv_heads=1, window_size=4, head_dim=7), "head_dim"),
    (dict(hidden_size=32, num_heads=2, num_kv_heads=1, window_size=4, feature_map="elu"),
     "feature_map"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RAttention(**kwargs)


def test_bad_input_shape():
    layer = RAttention(32, 2, 1, 4)
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match=r"\[B, 1, hidden_size\]"):
        layer.step(torch.randn(2, 3, 32), None)


# ---- forward / backward -----------------------------------------------------------------
def test_forward_backward_grads_reach_every_parameter():
    torch.manual_seed(0)
    layer = RAttention(32, 4, 2, 5, head_dim=8, learned_init_state=True, bias=True)
    _randomise(layer, 1)
    x = torch.randn(2, 23, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 23, 32) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_grads_match_hand_composition_float64():
    torch.manual_seed(1)
    layer = RAttention(24, 4, 2, 3, head_dim=6, learned_init_state=True, dtype=torch.float64)
    _randomise(layer, 2)
    x = torch.randn(2, 19, 24, dtype=torch.float64)
    gy = torch.randn(2, 19, 24, dtype=torch.float64)
    layer(x).backward(gy)
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    _hand_composition(layer, x).backward(gy)
    for n, p in layer.named_parameters():
        assert _rel(got[n], p.grad) < 1e-10, n


@pytest.mark.parametrize("T", [1, 37, 97])
@pytest.mark.parametrize("window", [0, 5, 200])
@pytest.mark.parametrize("heads", [(4, 4), (8, 1)])
def test_matches_hand_composition_float64(T, window, heads):
    Hq, Hkv = heads
    torch.manual_seed(T * 1000 + window)
    layer = RAttention(40, Hq, Hkv, window, head_dim=8, learned_init_state=True, bias=True,
                       rope_theta=10000.0, dtype=torch.float64)
    _randomise(layer, T + window)
    x = torch.randn(2, T, 40, dtype=torch.float64)
    got = layer(x)
    ref = _hand_composition(layer, x)
    assert got.dtype == torch.float64
    assert _rel(got, ref) < 1e-10


@pytest.mark.parametrize("feature_map", ["softmax", "relu"])
def test_matches_hand_composition_float32(feature_map):
    torch.manual_seed(3)
    layer = RAttention(64, 4, 2, 16, feature_map=feature_map, learned_init_state=True)
    _randomise(layer, 4)
    x = torch.randn(3, 97, 64)
    got = layer(x)
    ref64 = _hand_composition(layer.double(), x.double())
    assert got.dtype == torch.float32
    assert _rel(got.double(), ref64) < 1e-5


# ---- decoding ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("window, prompt, total", [(4, 9, 23), (0, 1, 6), (30, 7, 20)])
def test_prefill_and_step_match_forward(dtype, tol, window, prompt, total):
    torch.manual_seed(window + prompt)
    layer = RAttention(32, 4, 2, window, head_dim=8, learned_init_state=True, dtype=dtype)
    _randomise(layer, 5)
    x = torch.randn(2, total, 32, dtype=dtype)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(2)
        outs = [layer.prefill(x[:, :prompt], cache)]
        for t in range(prompt, total):
            outs.append(layer.step(x[:, t:t + 1], cache))
    dec = torch.cat(outs, dim=1)
    assert dec.shape == full.shape and torch.isfinite(dec).all()
    assert _rel(dec, full) < tol


# ---- training -----------------------------------------------------------------------------
@pytest.mark.parametrize("local", ["rattention", "swa"])
def test_tiny_lm_training_lowers_loss(local):
    from tiny_lm import TinyLM, TinyLMConfig

    torch.manual_seed(0)
    V = 32
    cfg = TinyLMConfig(vocab_size=V, hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=1,
                       window_size=6, local=local, layer_pattern="LLLG",
                       learned_init_state=local == "rattention", tie_embeddings=False)
    model = TinyLM(cfg)
    assert model.layer_kinds == [local] * 3 + ["global"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(40):
        # learnable structure: each sequence counts up by a random stride mod V
        start = torch.randint(0, V, (8, 1), generator=gen)
        stride = torch.randint(1, 4, (8, 1), generator=gen)
        tok = (start + stride * torch.arange(40)) % V
        logits = model(tok[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), tok[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
