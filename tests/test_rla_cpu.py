"""CPU residual linear attention (rla_fwd / rla_bwd) against the float64 reference:
outputs, final state and gradients (q, k, v, initial state, final-state gradient), over
ragged lengths, windows, GQA, feature maps, chunk sizes and checkpoint intervals."""
import pytest
import torch

import rattention_ext
from conftest import make_qkv, rel_err
from rattention_ext import reference as ref

ops = torch.ops.rattention_ext

# B, T, Hq, Hkv, D, window, feature_map, chunk, every, h0_batch
GRID = [
    (1, 1, 2, 2, 32, 0, "softmax", 64, 1, None),
    (2, 97, 8, 1, 32, 5, "relu", 16, 3, 1),
    (2, 97, 2, 2, 64, 0, "softmax", 1, 1, 2),
    (1, 97, 2, 1, 16, 200, "relu", 16, 1, 1),
    (1, 1025, 8, 1, 32, 5, "softmax", 64, 3, None),
    (1, 1025, 2, 2, 128, 64, "relu", 64, 1, 1),
    (2, 130, 4, 2, 64, 17, "softmax", 16, 3, 1),
]


def _grads(out, state, leaves, go, gs):
    loss = (out * go).sum() + (state * gs).sum()
    gr = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(l) if g is None else g for g, l in zip(gr, leaves)]


def _close(a, b, tol):
    if b.abs().max() == 0:
        return a.abs().max().item() == 0
    return rel_err(a, b) < tol


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(map(str, c)))
def test_rla_float64_values_state_grads(case):
    B, T, Hq, Hkv, D, w, fm, C, E, h0b = case
    q, k, v = make_qkv(B, T, Hq, Hkv, D, torch.float64, seed=T * 7 + w)
    h0 = None if h0b is None else 0.3 * torch.randn(h0b, Hq, 2 * D, D, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (q, k, v)] + ([h0.requires_grad_(True)] if h0b else [])
    out, st = rattention_ext.residual_linear_attention(
        q, k, v, window_size=w, feature_map=fm, initial_state=h0, return_final_state=True,
        chunk_size=C, checkpoint_every=E)
    eo, es = ref.residual_linear_attention(q, k, v, window_size=w, feature_map=fm,
                                           initial_state=h0, return_final_state=True)
    assert out.shape == (B, T, Hq, D) and st.shape == (B, Hkv, 2 * D, D)
    assert _close(out, eo, 1e-10) and _close(st, es, 1e-10)
    go, gs = torch.randn_like(out), torch.randn_like(st)
    for a, b in zip(_grads(out, st, leaves, go, gs), _grads(eo, es, leaves, go, gs)):
        assert _close(a, b, 1e-10)


@pytest.mark.parametrize("fm", ["softmax", "relu"])
def test_rla_float32(fm):
    B, T, Hq, Hkv, D, w = 2, 300, 4, 2, 64, 21
    q, k, v = make_qkv(B, T, Hq, Hkv, D, torch.float32, seed=3, layout="perm")
    h0 = 0.3 * torch.randn(1, Hq, 2 * D, D)
    leaves = [t.requires_grad_(True) for t in (q, k, v, h0)]
    out = rattention_ext.residual_linear_attention(q, k, v, window_size=w, feature_map=fm,
                                                   initial_state=h0)
    d64 = [t.detach().double().requires_grad_(True) for t in leaves]
    eo = ref.residual_linear_attention(*d64[:3], window_size=w, feature_map=fm, initial_state=d64[3])
    assert out.dtype == torch.float32
    assert rel_err(out, eo) < 1e-5
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, go), torch.autograd.grad(eo, d64, go.double())):
        assert rel_err(a, b) < 1e-5


def test_rla_bfloat16_within_twice_plain_pytorch():
    q, k, v = make_qkv(1, 257, 4, 1, 64, torch.bfloat16, seed=9)
    out = rattention_ext.residual_linear_attention(q, k, v, window_size=30)
    exact = ref.residual_linear_attention(q.double(), k.double(), v.double(), window_size=30)
    # Plain PyTorch in bf16: the feature maps, products and state in bf16.
    phi = lambda x: torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1)  # noqa: E731
    pq, pk = phi(q).transpose(1, 2), phi(k).repeat_interleave(4, 2).transpose(1, 2)
    vv = v.repeat_interleave(4, 2).transpose(1, 2)
    t = torch.arange(257)
    mask = ((t[:, None] - t[None, :]) >= 31).to(torch.bfloat16)
    plain = ((pq @ pk.transpose(-1, -2)) * mask @ vv).transpose(1, 2)
    assert torch.isfinite(out).all()
    assert rel_err(out, exact) <= 2 * rel_err(plain, exact) + 1e-3


def test_rla_long_sequence_float32_state_accuracy():
    # T = 65536: the float32 state accumulates 65k outer products and must stay accurate.
    q, k, v = make_qkv(1, 65536, 1, 1, 8, torch.float32, seed=1)
    out, st = rattention_ext.residual_linear_attention(q, k, v, window_size=512,
                                                       return_final_state=True)
    eo, es = ref.residual_linear_attention(q.double(), k.double(), v.double(), window_size=512,
                                           return_final_state=True)
    assert rel_err(out, eo) < 1e-5
    assert rel_err(st, es) < 1e-5


def test_rla_checkpoint_count_and_chunking_invariance():
    q, k, v = make_qkv(1, 200, 2, 2, 16, torch.float64, seed=4)
    outs = []
    for C, E in [(1, 1), (16, 1), (16, 5), (64, 2), (1024, 1)]:
        o, st, ck = ops.rla_fwd(q, k, v, 3, "softmax", None, C, E)
        n_chunks = -(-200 // C)
        assert ck.shape == (1, 2, -(-n_chunks // E), 32, 16)
        assert ck[:, :, 0].abs().max() == 0  # the state before the first chunk is empty
        outs.append(o)
    for o in outs[1:]:
        assert rel_err(o, outs[0]) < 1e-12


@pytest.mark.parametrize("kwargs,msg", [
    (dict(feature_map="gelu"), "feature_map"),
    (dict(initial_state=torch.zeros(1, 3, 16, 8)), "initial_state must be"),
    (dict(initial_state=torch.zeros(2, 4, 16, 8, dtype=torch.int32)), "floating-point"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(checkpoint_every=0), "checkpoint_every"),
    (dict(window_size=-3), "window_size"),
])
def test_rla_bad_input(kwargs, msg):
    q, k, v = make_qkv(2, 10, 4, 2, 8, torch.float32, seed=0)
    kw = dict(window_size=2)
    kw.update(kwargs)
    with pytest.raises((ValueError, RuntimeError)) as e:
        rattention_ext.residual_linear_attention(q, k, v, **kw)
    assert msg in str(e.value)
