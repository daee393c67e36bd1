"""Fake (meta) kernels and autograd for the compiled ops in ``torch.ops.rattention_ext``.

The schemas live in C++ (csrc/ops.cpp); this file only teaches PyTorch how to trace
them (``register_fake``), differentiate them (an autograd.Function per op, in the form
torch.func supports) and vmap them. Input validation is the op layer's (C++); the fake
kernels check only that every tensor is on q's device, since they also serve as the Meta
kernels and a meta tensor mixed with CPU tensors would otherwise get them.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library and registers the ops)

ops = torch.ops.rattention_ext
lib = "rattention_ext"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _num_checkpoints(T: int, chunk: int, every: int) -> int:
    n_chunks = (T + chunk - 1) // chunk
    return (n_chunks + every - 1) // every


# Shapes of a dense ([B, T, H, D]) or packed ([total, H, D] with cu_seqlens) call. Sizes stay
# SymInts under tracing (floor division and sums only), so nothing specialises on T, total
# or the number of documents.
def _lse_shape(q, cu_seqlens):
    if cu_seqlens is None:
        B, T, H, _ = q.shape
        return (B, H, T)
    total, H, _ = q.shape
    return (H, total)


def _num_seqs(q, cu_seqlens):
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _checkpoint_shape(q, k, cu_seqlens, chunk, every):
    """[B (1 packed), Hkv, slots * 2D, D]: the slots' [2D, D] states stacked along rows, so
    no dimension is the slot count alone (which is 1 for short T and would make tracing
    guard on it: csrc/op_common.cpp checkpoint_shape)."""
    D, Hkv = q.shape[-1], k.shape[-2]
    if cu_seqlens is None:
        B, T = q.shape[0], q.shape[1]
        return (B, Hkv, _num_checkpoints(T, chunk, every) * 2 * D, D)
    # csrc/core/params.h RlaCheckpointLayout: document b starts at slot cu[b] // (C*every) + b.
    total = q.shape[0]
    return (1, Hkv, (total // (chunk * every) + _num_seqs(q, cu_seqlens)) * 2 * D, D)


def _same_device(op: str, q, **tensors) -> None:
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != q.device:
            raise RuntimeError(f"rattention_ext.{op}: {name} must be on the same device as q "
                               f"({q.device}), got {t.device}")


# ---- fake kernels -----------------------------------------------------------------------
@torch.library.register_fake(f"{lib}::swa_fwd")
def _swa_fwd_fake(q, k, v, window_size, softmax_scale, rotary_cos, rotary_sin, cu_seqlens=None):
    _same_device("swa_fwd", q, k=k, v=v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                 cu_seqlens=cu_seqlens)
    acc = _acc(q.dtype)
    return q.new_empty(q.shape, dtype=acc), q.new_empty(_lse_shape(q, cu_seqlens), dtype=acc)


@torch.library.register_fake(f"{lib}::swa_mix_fwd")
def _swa_mix_fwd_fake(q, k, v, window_size, softmax_scale, rotary_cos, rotary_sin, o_rla,
                      swa_weight, rla_weight, eps, out_dtype, save_for_backward, cu_seqlens=None):
    _same_device("swa_mix_fwd", q, k=k, v=v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                 o_rla=o_rla, swa_norm_weight=swa_weight, rla_norm_weight=rla_weight,
                 cu_seqlens=cu_seqlens)
    acc = _acc(q.dtype)
    out = q.new_empty(q.shape, dtype=out_dtype)
    if not save_for_backward:
        return out, q.new_empty(0, dtype=acc), q.new_empty(0, dtype=acc)
    return (out, q.new_empty(q.shape, dtype=acc),
            q.new_empty(_lse_shape(q, cu_seqlens), dtype=acc))


@torch.library.register_fake(f"{lib}::swa_bwd")
def _swa_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, window_size, softmax_scale,
                  rotary_cos, rotary_sin, deterministic, cu_seqlens=None):
    _same_device("swa_bwd", q, grad_out=grad_out, grad_lse=grad_lse, k=k, v=v, out=out, lse=lse,
                 rotary_cos=rotary_cos, rotary_sin=rotary_sin, cu_seqlens=cu_seqlens)
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


@torch.library.register_fake(f"{lib}::rla_fwd")
def _rla_fwd_fake(q, k, v, window_size, feature_map, initial_state, chunk_size, checkpoint_every,
                  cu_seqlens=None, carried_state=None):
    _same_device("rla_fwd", q, k=k, v=v, initial_state=initial_state, cu_seqlens=cu_seqlens,
                 carried_state=carried_state)
    D, Hkv = q.shape[-1], k.shape[-2]
    acc = _acc(q.dtype)
    return (q.new_empty(q.shape, dtype=acc),
            q.new_empty(_num_seqs(q, cu_seqlens), Hkv, 2 * D, D, dtype=acc),
            q.new_empty(_checkpoint_shape(q, k, cu_seqlens, chunk_size, checkpoint_every),
                        dtype=acc))


@torch.library.register_fake(f"{lib}::rla_bwd")
def _rla_bwd_fake(grad_out, grad_final_state, q, k, v, initial_state, checkpoints, window_size,
                  feature_map, chunk_size, checkpoint_every, cu_seqlens=None, carried_state=None):
    _same_device("rla_bwd", q, grad_out=grad_out, grad_final_state=grad_final_state, k=k, v=v,
                 initial_state=initial_state, checkpoints=checkpoints, cu_seqlens=cu_seqlens,
                 carried_state=carried_state)
    acc = _acc(q.dtype)
    gh0 = q.new_empty(0 if initial_state is None else initial_state.shape, dtype=acc)
    gcs = q.new_empty(0 if carried_state is None else carried_state.shape, dtype=acc)
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device), gh0, gcs)


@torch.library.register_fake(f"{lib}::mix_fwd")
def _mix_fwd_fake(o_swa, o_rla, swa_weight, rla_weight, eps, out_dtype):
    _same_device("mix_fwd", o_swa, o_rla=o_rla, swa_norm_weight=swa_weight,
                 rla_norm_weight=rla_weight)
    return torch.empty(o_swa.shape, dtype=out_dtype, device=o_swa.device)


@torch.library.register_fake(f"{lib}::mix_bwd")
def _mix_bwd_fake(grad_out, o_swa, o_rla, swa_weight, rla_weight, eps):
    _same_device("mix_bwd", o_swa, grad_out=grad_out, o_rla=o_rla, swa_norm_weight=swa_weight,
                 rla_norm_weight=rla_weight)
    H, D = o_swa.shape[-2], o_swa.shape[-1]
    return (torch.empty_like(o_swa, memory_format=torch.contiguous_format),
            torch.empty_like(o_swa, memory_format=torch.contiguous_format),
            o_swa.new_empty(H, D), o_swa.new_empty(H, D))


@torch.library.register_fake(f"{lib}::decode_step")
def _decode_step_fake(q, k, v, k_cache, v_cache, state, pos, feature_map, softmax_scale,
                      initial_state, rotary_cos, rotary_sin, swa_weight, rla_weight, eps):
    _same_device("decode_step", q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, state=state,
                 positions=pos, initial_state=initial_state, rotary_cos=rotary_cos,
                 rotary_sin=rotary_sin, swa_norm_weight=swa_weight, rla_norm_weight=rla_weight)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


# ---- autograd ---------------------------------------------------------------------------
# Each differentiable op gets an Autograd kernel that runs a torch.autograd.Function in the
# form torch.func supports (forward without ctx + setup_context), so plain autograd,
# torch.func.grad / vjp / jacrev / functional_call, torch.compile and torch.export all go
# through the same backward. (torch.library.register_autograd generates a Function in the
# older ctx-in-forward form, which torch.func transforms refuse.)
#
# Not supported, and refused with an error naming the package: forward-mode AD (jvp,
# jacfwd, forward_ad.make_dual) and double backward (the backward ops have an Autograd
# kernel whose own backward raises, so a gradient of a gradient never comes out as zeros).
_impl_lib = torch.library.Library(lib, "IMPL")

_FORWARD_AD_MSG = (
    "rattention_ext.{op}: forward-mode AD (torch.func.jvp, torch.func.jacfwd, "
    "torch.autograd.forward_ad.make_dual) is not supported; use reverse mode (backward, "
    "torch.autograd.grad, torch.func.grad / vjp / jacrev)")
_DOUBLE_BACKWARD_MSG = (
    "rattention_ext.{op}: double backward (differentiating a gradient, e.g. "
    "torch.autograd.grad(..., create_graph=True) followed by another backward, or nested "
    "torch.func.grad) is not supported")


def _tensors(args):
    return [a for a in args if isinstance(a, torch.Tensor)]


def _has_forward_grad(args) -> bool:
    import torch.autograd.forward_ad as fwAD

    for t in _tensors(args):
        if fwAD.unpack_dual(t).tangent is not None:
            return True
    return False


def _below_autograd(op, args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _register_autograd_kernel(op_name: str, fn_cls) -> None:
    """Autograd kernel of the raw op (``torch.ops.rattention_ext.<op>`` called directly): the
    same Function as the public functions use."""
    op = getattr(ops, op_name).default

    def autograd_kernel(*args):
        if _has_forward_grad(args):
            raise NotImplementedError(_FORWARD_AD_MSG.format(op=op_name))
        if torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(args)):
            if torch._C._are_functorch_transforms_active():
                raise NotImplementedError(
                    f"rattention_ext.{op_name}: under torch.func transforms, call the public "
                    f"functions (rattention_ext.forward, sliding_window_attention, "
                    f"residual_linear_attention, prefill) or rattention_ext._ops.call("
                    f"'{op_name}', ...), not torch.ops.rattention_ext.{op_name} directly")
            return fn_cls.apply(*_with_defaults(op_name, args))
        return _below_autograd(op, args)

    _impl_lib.impl(op_name, autograd_kernel, "Autograd")


_FUNCTIONS: dict = {}


_TRAILING_DEFAULTS: dict = {}  # op -> (index of the first defaulted argument, the defaults)


def _trailing_defaults(op_name: str):
    """The schema's trailing defaulted arguments, read once (plain Python values, so that
    torch.compile traces ``call`` without touching the schema)."""
    if op_name not in _TRAILING_DEFAULTS:
        arguments = getattr(ops, op_name).default._schema.arguments
        first = len(arguments)
        while first > 0 and arguments[first - 1].has_default_value():
            first -= 1
        _TRAILING_DEFAULTS[op_name] = (
            first, len(arguments), tuple(a.default_value for a in arguments[first:]))
    return _TRAILING_DEFAULTS[op_name]


def _with_defaults(op_name: str, args: tuple) -> tuple:
    """``args`` completed with the schema's defaults of the trailing arguments left out (as the
    dispatcher would), so every setup_context sees the op's full argument list."""
    first, n, defaults = _TRAILING_DEFAULTS[op_name]
    if len(args) >= n:
        return args
    if len(args) < first:
        raise TypeError(f"rattention_ext.{op_name}: expected at least {first} arguments, "
                        f"got {len(args)}")
    return tuple(args) + defaults[len(args) - first:]


def call(op_name: str, *args):
    """Run differentiable op ``op_name`` through its autograd.Function (what the public
    functions do): differentiable under plain autograd and torch.func transforms alike.
    Trailing arguments with schema defaults may be left out. Under torch.compile the op
    itself is called (Dynamo cannot trace a Function with a custom jvp); its Autograd kernel
    is the same Function."""
    if torch.compiler.is_compiling():
        return getattr(ops, op_name)(*args)
    return _FUNCTIONS[op_name].apply(*_with_defaults(op_name, args))


def _make_function(op_name: str, setup_context, backward):
    """A torch.func-compatible autograd.Function around op ``op_name``."""
    op = getattr(ops, op_name).default
    _trailing_defaults(op_name)

    def forward(*args):
        return _below_autograd(op, args)

    def jvp(ctx, *tangents):
        raise NotImplementedError(_FORWARD_AD_MSG.format(op=op_name))

    cls = type(f"RattentionExt_{op_name}", (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "jvp": staticmethod(jvp),
    })
    _register_autograd_kernel(op_name, cls)
    _FUNCTIONS[op_name] = cls
    return cls


def _refuse_double_backward(op_name: str, n_inputs: int) -> None:
    """Backward op ``op_name`` differentiates only once: its own backward raises."""

    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)

    def backward(ctx, *grads):
        raise NotImplementedError(_DOUBLE_BACKWARD_MSG.format(op=op_name))

    _make_function(op_name, setup_context, backward)


def _swa_setup(ctx, inputs, output):
    q, k, v, window_size, softmax_scale, rotary_cos, rotary_sin, cu_seqlens = inputs
    out, lse = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, lse, rotary_cos, rotary_sin, cu_seqlens)
    ctx.window_size = window_size
    ctx.softmax_scale = softmax_scale


def _swa_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cos, sin, cu_seqlens = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = call("swa_bwd", grad_out, grad_lse, q, k, v, out, lse, ctx.window_size,
                             ctx.softmax_scale, cos, sin, torch.are_deterministic_algorithms_enabled(),
                             cu_seqlens)
    return dq, dk, dv, None, None, None, None, None


_make_function("swa_fwd", _swa_setup, _swa_backward)


def _swa_mix_setup(ctx, inputs, output):
    (q, k, v, window_size, softmax_scale, rotary_cos, rotary_sin, o_rla, swa_weight, rla_weight,
     eps, _out_dtype, save_for_backward, cu_seqlens) = inputs
    _, o_swa, lse = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, rotary_cos, rotary_sin, o_swa, lse, o_rla, swa_weight,
                          rla_weight, cu_seqlens)
    ctx.args = (window_size, softmax_scale, eps, save_for_backward)


def _swa_mix_backward(ctx, grad_out, grad_o_swa, grad_lse):
    q, k, v, cos, sin, o_swa, lse, o_rla, ga, gb, cu_seqlens = ctx.saved_tensors
    window_size, softmax_scale, eps, saved = ctx.args
    if not saved:
        raise RuntimeError("rattention_ext.swa_mix_fwd: called with save_for_backward=False, so "
                           "the SWA output and lse needed for the backward were not kept; call "
                           "it with save_for_backward=True to differentiate")
    if grad_out is None:
        grad_out = torch.zeros_like(o_swa)
    # Mixing backward first: it gives the gradients flowing into both branch outputs.
    da, db, dga, dgb = call("mix_bwd", grad_out, o_swa, o_rla, ga, gb, eps)
    if grad_o_swa is not None:
        da = da + grad_o_swa
    dq, dk, dv = call("swa_bwd", da, grad_lse, q, k, v, o_swa, lse, window_size, softmax_scale, cos,
                             sin, torch.are_deterministic_algorithms_enabled(), cu_seqlens)
    return (dq, dk, dv, None, None, None, None, db, dga.to(ga.dtype), dgb.to(gb.dtype), None,
            None, None, None)


_make_function("swa_mix_fwd", _swa_mix_setup, _swa_mix_backward)


def _rla_setup(ctx, inputs, output):
    (q, k, v, window_size, feature_map, initial_state, chunk_size, checkpoint_every, cu_seqlens,
     carried_state) = inputs
    _, _, checkpoints = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(checkpoints)
    ctx.save_for_backward(q, k, v, initial_state, checkpoints, cu_seqlens, carried_state)
    ctx.args = (window_size, feature_map, chunk_size, checkpoint_every)
    ctx.h0_dtype = None if initial_state is None else initial_state.dtype
    ctx.carried_dtype = None if carried_state is None else carried_state.dtype


def _rla_backward(ctx, grad_out, grad_final_state, _grad_checkpoints):
    q, k, v, h0, checkpoints, cu_seqlens, carried = ctx.saved_tensors
    window_size, feature_map, chunk_size, checkpoint_every = ctx.args
    if grad_out is None:
        grad_out = q.new_zeros(q.shape, dtype=_acc(q.dtype))
    dq, dk, dv, dh0, dcs = call("rla_bwd", grad_out, grad_final_state, q, k, v, h0, checkpoints,
                                       window_size, feature_map, chunk_size, checkpoint_every,
                                       cu_seqlens, carried)
    dh0 = dh0.to(ctx.h0_dtype) if h0 is not None else None
    dcs = dcs.to(ctx.carried_dtype) if carried is not None else None
    return dq, dk, dv, None, None, dh0, None, None, None, dcs


_make_function("rla_fwd", _rla_setup, _rla_backward)


def _mix_setup(ctx, inputs, output):
    o_swa, o_rla, swa_weight, rla_weight, eps, out_dtype = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(o_swa, o_rla, swa_weight, rla_weight)
    ctx.eps = eps


def _mix_backward(ctx, grad_out):
    o_swa, o_rla, ga, gb = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(o_swa)
    da, db, dga, dgb = call("mix_bwd", grad_out, o_swa, o_rla, ga, gb, ctx.eps)
    return da, db, dga.to(ga.dtype), dgb.to(gb.dtype), None, None


_make_function("mix_fwd", _mix_setup, _mix_backward)

for _name, _n in (("swa_bwd", 12), ("rla_bwd", 11), ("mix_bwd", 6)):
    _refuse_double_backward(_name, _n)


def _decode_step_autograd(*args):
    if _has_forward_grad(args) or (torch.is_grad_enabled() and
                                   any(t.requires_grad for t in _tensors(args))):
        raise RuntimeError(
            "rattention_ext.decode_step: gradients through a decode step are not supported "
            "(it updates the cache in place); an input requires grad. Run decoding under "
            "torch.no_grad() or torch.inference_mode(), or use rattention_ext.forward / "
            "prefill to train")
    return _below_autograd(ops.decode_step.default, args)


_impl_lib.impl("decode_step", _decode_step_autograd, "Autograd")


# ---- vmap ---------------------------------------------------------------------------------
# A loop over the vmapped dimension (exact for every op; vmap here serves jacrev / jacobians
# and per-sample transforms, where the batch of calls is small).
def _loop_vmap_rule(op_name: str):
    op = getattr(ops, op_name).default

    def rule(info, in_dims, *args):
        outs = []
        for i in range(info.batch_size):
            outs.append(op(*[a.select(d, i) if d is not None else a
                             for a, d in zip(args, in_dims)]))
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
        return torch.stack(outs), 0

    torch.library.register_vmap(f"{lib}::{op_name}", rule)


for _name in ("swa_fwd", "swa_mix_fwd", "swa_bwd", "rla_fwd", "rla_bwd", "mix_fwd", "mix_bwd"):
    _loop_vmap_rule(_name)
