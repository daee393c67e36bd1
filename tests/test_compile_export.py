"""torch.export and torch.compile without specialisation: a dynamic sequence length exports
once and matches eager at other lengths; compile(dynamic=True) and a changing window_size
compile once; prefill and the layer's decoding step trace as one graph (no host sync)."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import rattention_ext
from helpers import make_qkv
from rattention_ext import RAttentionCache
from rattention_ext import nn as rnn

W = 16


def _inputs(T, seed):
    return make_qkv(1, T, 4, 2, 16, torch.float32, seed=seed)


class _Forward(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v):
        return rattention_ext.forward(q, k, v, window_size=W, **self.kw)


@pytest.mark.parametrize("kw", [{}, dict(feature_map="relu", chunk_size=16, checkpoint_every=2)])
def test_export_with_dynamic_length_matches_eager(kw):
    """Exported at T=100 with T dynamic, then run at lengths with one, several and a ragged
    number of chunks and checkpoints (the fake kernels are symbolic in T)."""
    T = torch.export.Dim("T", min=2, max=8192)
    m = _Forward(**kw)
    ep = torch.export.export(m, _inputs(100, 0), dynamic_shapes=({1: T}, {1: T}, {1: T}))
    for t in (3, 65, 257, 1000):
        x = _inputs(t, t)
        assert torch.equal(ep.module()(*x), m(*x)), t


def test_export_decomposed_graph_keeps_the_custom_ops():
    """Decomposing the exported program keeps our ops as single calls (they have no
    decomposition) and T symbolic: the decomposed program still runs at other lengths."""
    T = torch.export.Dim("T", min=2, max=8192)

    class Loss(torch.nn.Module):
        def forward(self, q, k, v):
            return rattention_ext.forward(q, k, v, window_size=W).square().sum()

    ep = torch.export.export(Loss(), _inputs(100, 1), dynamic_shapes=({1: T}, {1: T}, {1: T}))
    joint = ep.run_decompositions()
    names = {str(n.target) for n in joint.graph.nodes if n.op == "call_function"}
    assert any("rla_fwd" in s for s in names) and any("swa_mix_fwd" in s for s in names)
    x = _inputs(333, 4)
    assert torch.equal(joint.module()(*x), Loss()(*x))


def _compiled(fn, **kw):
    cc = CompileCounter()
    return torch.compile(fn, backend=cc, fullgraph=True, **kw), cc


def test_compile_dynamic_does_not_recompile_as_length_varies():
    f, cc = _compiled(lambda q, k, v: rattention_ext.forward(q, k, v, window_size=W),
                      dynamic=True)
    for t in (100, 300, 700, 1500):
        x = _inputs(t, t)
        assert torch.equal(f(*x), rattention_ext.forward(*x, window_size=W))
    assert cc.frame_count == 1, f"{cc.frame_count} compilations"


def test_compile_dynamic_gradients_match_eager():
    def loss(q, k, v):
        return rattention_ext.forward(q, k, v, window_size=W).square().sum()

    f, cc = _compiled(loss, dynamic=True)
    for t in (90, 400):
        x = [a.requires_grad_() for a in _inputs(t, t)]
        g_c = torch.autograd.grad(f(*x), x)
        g_e = torch.autograd.grad(loss(*x), x)
        for a, b in zip(g_c, g_e):
            assert torch.equal(a, b)
    assert cc.frame_count == 1


@pytest.mark.parametrize("dynamic,max_frames", [(True, 1), (None, 2)])
def test_changing_window_size_does_not_recompile(dynamic, max_frames):
    """window_size is a SymInt in the op schemas (the fake kernels' shapes do not depend on
    it), so a new window reuses the graph: with dynamic=True at once, by default after the
    one automatic-dynamic recompilation."""
    f, cc = _compiled(lambda q, k, v, w: rattention_ext.forward(q, k, v, window_size=w),
                      dynamic=dynamic)
    x = _inputs(100, 2)
    for w in (4, 8, 16, 33, 200):
        assert torch.equal(f(*x, w), rattention_ext.forward(*x, window_size=w)), w
    assert cc.frame_count <= max_frames, f"{cc.frame_count} compilations"


def test_prefill_compiles_fullgraph_and_fills_the_cache_like_eager():
    q, k, v = make_qkv(2, 40, 4, 2, 8, torch.float32, seed=3)
    lens = torch.tensor([23, 40])
    eager = RAttentionCache.empty(2, 5, 2, 8, dtype=torch.float32)
    comp = RAttentionCache.empty(2, 5, 2, 8, dtype=torch.float32)
    f, cc = _compiled(lambda q, k, v, c, n: rattention_ext.prefill(q, k, v, c, seq_lens=n))
    out_e = rattention_ext.prefill(q, k, v, eager, seq_lens=lens)
    out_c = f(q, k, v, comp, lens)
    assert torch.equal(out_e[0, :23], out_c[0, :23]) and torch.equal(out_e[1], out_c[1])
    for name in ("keys", "values", "state", "positions"):
        assert torch.equal(getattr(eager, name), getattr(comp, name)), name
    assert cc.frame_count == 1


def test_layer_step_traces_as_one_graph():
    """RAttention.step has no host synchronisation (no .item(), no data-dependent branch):
    it compiles with fullgraph=True, which is what CUDA-graph capture needs too, and decodes
    like eager."""
    torch.manual_seed(0)
    layer = rnn.RAttention(32, 4, 2, 5).eval()
    x = torch.randn(2, 9, 32)
    c_e, c_c = layer.new_cache(2), layer.new_cache(2)
    step, cc = _compiled(lambda x, c: layer.step(x, c))
    with torch.no_grad():
        for t in range(x.shape[1]):
            a = layer.step(x[:, t:t + 1], c_e)
            b = step(x[:, t:t + 1], c_c)
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), t
    assert cc.frame_count <= 2, f"{cc.frame_count} compilations"


def test_padded_prefill_compiles_once_as_length_varies():
    f, cc = _compiled(lambda q, k, v, c, n: rattention_ext.prefill(q, k, v, c, seq_lens=n),
                      dynamic=True)
    for T in (7, 70, 130, 200):
        q, k, v = make_qkv(2, T, 2, 1, 8, torch.float32, seed=T)
        lens = torch.tensor([T, T // 2])
        c_e = RAttentionCache.empty(2, 5, 1, 8, dtype=torch.float32)
        c_c = RAttentionCache.empty(2, 5, 1, 8, dtype=torch.float32)
        out_e = rattention_ext.prefill(q, k, v, c_e, seq_lens=lens)
        out_c = f(q, k, v, c_c, lens)
        assert torch.equal(out_e[0], out_c[0]) and torch.equal(out_e[1, :T // 2], out_c[1, :T // 2])
        assert torch.allclose(c_e.state, c_c.state, rtol=1e-6, atol=1e-6)
    assert cc.frame_count == 1, f"{cc.frame_count} compilations"
