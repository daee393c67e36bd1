"""Autograd corners: torch.func transforms work (grad, vjp, jacrev, vmap, functional_call);
forward-mode AD and double backward raise an error naming the package, never zeros."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import rattention_ext
from helpers import make_qkv
from rattention_ext import reference as ref

W = 3


def _fns():
    """(name, fn(q, k, v) -> tensor, reference fn) for every differentiable public function."""
    return [
        ("forward", lambda q, k, v: rattention_ext.forward(q, k, v, window_size=W),
         lambda q, k, v: ref.forward(q, k, v, window_size=W)),
        ("swa", lambda q, k, v: rattention_ext.sliding_window_attention(q, k, v, window_size=W),
         lambda q, k, v: ref.sliding_window_attention(q, k, v, window_size=W)),
        ("rla", lambda q, k, v: rattention_ext.residual_linear_attention(q, k, v, window_size=1,
                                                                         feature_map="relu"),
         lambda q, k, v: ref.residual_linear_attention(q, k, v, window_size=1,
                                                       feature_map="relu")),
    ]


FN_IDS = [f[0] for f in _fns()]


def _inputs(seed=0, T=9):
    return make_qkv(2, T, 4, 2, 8, torch.float64, seed)


@pytest.mark.parametrize("idx", range(3), ids=FN_IDS)
def test_func_grad_vjp_match_reference(idx):
    _, fn, rfn = _fns()[idx]
    q, k, v = _inputs(idx)
    go = torch.randn_like(q)
    loss = lambda f: (lambda q, k, v: (f(q, k, v) * go).sum())  # noqa: E731
    got = torch.func.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
    want = torch.func.grad(loss(rfn), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        assert (g - r).abs().max().item() < 1e-10
    out, pull = torch.func.vjp(fn, q, k, v)
    for g, r in zip(pull(go), want):
        assert (g - r).abs().max().item() < 1e-10
    assert (out - rfn(q, k, v)).abs().max().item() < 1e-10


@pytest.mark.parametrize("idx", range(3), ids=FN_IDS)
def test_func_jacrev_matches_reference(idx):
    _, fn, rfn = _fns()[idx]
    q, k, v = make_qkv(1, 4, 2, 1, 4, torch.float64, 10 + idx)
    j = torch.func.jacrev(fn, argnums=1)(q, k, v)
    jr = torch.func.jacrev(rfn, argnums=1)(q, k, v)
    assert j.shape == q.shape + k.shape
    assert (j - jr).abs().max().item() < 1e-10


def test_vmap_matches_batched_call():
    q, k, v = _inputs(3)
    per_sample = torch.vmap(lambda q, k, v: rattention_ext.forward(
        q[None], k[None], v[None], window_size=W)[0])(q, k, v)
    assert (per_sample - rattention_ext.forward(q, k, v, window_size=W)).abs().max() < 1e-12


def test_functional_call_grad_matches_backward():
    torch.manual_seed(0)
    layer = rattention_ext.nn.RAttention(16, 4, 2, 3, learned_init_state=True,
                                         dtype=torch.float64)
    with torch.no_grad():
        layer.initial_state.normal_()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    params = {n: p.detach() for n, p in layer.named_parameters()}
    g = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).square().sum())(params)
    layer(x).square().sum().backward()
    for n, p in layer.named_parameters():
        assert (g[n] - p.grad).abs().max().item() < 1e-10, n


FORWARD_AD = ["jvp", "jacfwd", "make_dual"]


@pytest.mark.parametrize("mode", FORWARD_AD)
@pytest.mark.parametrize("idx", range(3), ids=FN_IDS)
def test_forward_mode_ad_raises(idx, mode):
    _, fn, _ = _fns()[idx]
    q, k, v = _inputs(idx)
    with pytest.raises(NotImplementedError, match="rattention_ext.*forward-mode AD"):
        if mode == "jvp":
            torch.func.jvp(lambda q: fn(q, k, v), (q,), (torch.randn_like(q),))
        elif mode == "jacfwd":
            torch.func.jacfwd(lambda v: fn(q, k, v))(v)
        else:
            with fwAD.dual_level():
                fn(q, k, fwAD.make_dual(v, torch.randn_like(v)))


def test_forward_mode_ad_raises_in_layer_and_prefill():
    layer = rattention_ext.nn.RAttention(16, 2, 1, 2, dtype=torch.float64)
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="rattention_ext.*forward-mode"):
        torch.func.jvp(layer, (x,), (torch.randn_like(x),))
    q, k, v = make_qkv(1, 5, 2, 1, 8, torch.float64, 0)
    cache = rattention_ext.RAttentionCache.empty(1, 2, 1, 8, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="rattention_ext.*forward-mode"):
        torch.func.jvp(lambda q: rattention_ext.prefill(q, k, v, cache), (q,), (q,))


@pytest.mark.parametrize("idx", range(3), ids=FN_IDS)
def test_double_backward_raises(idx):
    _, fn, _ = _fns()[idx]
    q, k, v = [x.requires_grad_() for x in _inputs(idx)]
    g, = torch.autograd.grad(fn(q, k, v).square().sum(), v, create_graph=True)
    assert g.requires_grad  # the first gradient is fine and may be kept in a graph
    with pytest.raises(NotImplementedError, match="rattention_ext.*double backward"):
        torch.autograd.grad(g.square().sum(), (q, k, v))


def test_nested_func_grad_raises():
    q, k, v = _inputs(5)
    f = lambda q: rattention_ext.forward(q, k, v, window_size=W).square().sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match="rattention_ext.*double backward"):
        torch.func.grad(lambda q: torch.func.grad(f)(q).square().sum())(q)


def test_gradient_penalty_style_first_grad_is_right():
    """create_graph=True alone (no second backward) still gives the right first gradient."""
    q, k, v = [x.requires_grad_() for x in _inputs(6)]
    g1, = torch.autograd.grad(rattention_ext.forward(q, k, v, window_size=W).sum(), q,
                              create_graph=True)
    g2, = torch.autograd.grad(ref.forward(q, k, v, window_size=W).sum(), q)
    assert (g1 - g2).abs().max().item() < 1e-10


def test_raw_op_under_func_transform_names_the_package():
    q, k, v = _inputs(7)
    op = torch.ops.rattention_ext.swa_fwd
    with pytest.raises(Exception, match="rattention_ext"):
        torch.func.grad(lambda q: op(q, k, v, W, 0.3, None, None)[0].sum())(q)
