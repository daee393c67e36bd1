// XLA FFI handlers of the sliding-window attention kernels (CPU):
//   rattention_swa_fwd_cpu: q, k, v, rotary_cos, rotary_sin -> out (acc), lse (acc)
//   rattention_swa_bwd_cpu: grad_out, grad_lse, q, k, v, out, lse, rotary_cos, rotary_sin
//                           -> grad_q, grad_k, grad_v (q's dtype)
// Attributes: window_size (int64), softmax_scale (float64). Empty rotary / grad_lse = absent.
#include "cpu/kernels.h"
#include "jax/ffi_swa_params.h"

namespace rattention::jax_ffi {

SwaFwdParams swa_fwd_params(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                            const ffi::AnyBuffer& v, const ffi::AnyBuffer& cos,
                            const ffi::AnyBuffer& sin, ffi::AnyBuffer& out, ffi::AnyBuffer& lse,
                            int64_t window_size, double softmax_scale, Backend backend) {
  const QkvInfo info = check_qkv(q, k, v, backend);
  check_window(window_size);
  check_finite_positive(softmax_scale, "softmax_scale");
  const AttnDims& d = info.dims;
  const Rotary rot = check_rotary(cos, sin, info);
  check_buffer(out, "out", info.acc, {d.batch, d.seqlen, d.heads_q, d.head_dim});
  check_buffer(lse, "lse", info.acc, {d.batch, d.heads_q, d.seqlen});
  SwaFwdParams p{};
  p.dims = d;
  p.dtype = info.dtype;
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.q_stride = contiguous_strides(d, d.heads_q);
  p.k_stride = contiguous_strides(d, d.heads_kv);
  p.v_stride = p.k_stride;
  p.out = out.untyped_data();
  p.out_stride = p.q_stride;
  p.lse = lse.untyped_data();
  p.rotary_cos = rot.cos;
  p.rotary_sin = rot.sin;
  p.window_size = window_size;
  p.softmax_scale = softmax_scale;
  p.cu_seqlens = nullptr;
  return p;  // p.mix stays off (out == nullptr): the JAX binding mixes in its own call
}

SwaBwdParams swa_bwd_params(const ffi::AnyBuffer& grad_out, const ffi::AnyBuffer& grad_lse,
                            const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                            const ffi::AnyBuffer& v, const ffi::AnyBuffer& out,
                            const ffi::AnyBuffer& lse, const ffi::AnyBuffer& cos,
                            const ffi::AnyBuffer& sin, ffi::AnyBuffer& grad_q,
                            ffi::AnyBuffer& grad_k, ffi::AnyBuffer& grad_v, int64_t window_size,
                            double softmax_scale, Backend backend) {
  const QkvInfo info = check_qkv(q, k, v, backend);
  check_window(window_size);
  check_finite_positive(softmax_scale, "softmax_scale");
  const AttnDims& d = info.dims;
  const Rotary rot = check_rotary(cos, sin, info);
  check_buffer(grad_out, "grad_out", info.acc, {d.batch, d.seqlen, d.heads_q, d.head_dim});
  check_buffer(out, "out", info.acc, {d.batch, d.seqlen, d.heads_q, d.head_dim});
  check_buffer(lse, "lse", info.acc, {d.batch, d.heads_q, d.seqlen});
  const bool has_glse =
      check_optional(grad_lse, "grad_lse", info.acc, {d.batch, d.heads_q, d.seqlen});
  check_buffer(grad_q, "grad_q", info.ffi_dtype, {d.batch, d.seqlen, d.heads_q, d.head_dim});
  check_buffer(grad_k, "grad_k", info.ffi_dtype, {d.batch, d.seqlen, d.heads_kv, d.head_dim});
  check_buffer(grad_v, "grad_v", info.ffi_dtype, {d.batch, d.seqlen, d.heads_kv, d.head_dim});
  SwaBwdParams p{};
  p.dims = d;
  p.dtype = info.dtype;
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.q_stride = contiguous_strides(d, d.heads_q);
  p.k_stride = contiguous_strides(d, d.heads_kv);
  p.v_stride = p.k_stride;
  p.out = out.untyped_data();
  p.out_stride = p.q_stride;
  p.grad_out = grad_out.untyped_data();
  p.grad_out_stride = p.q_stride;
  p.lse = lse.untyped_data();
  p.grad_lse = has_glse ? grad_lse.untyped_data() : nullptr;
  p.grad_q = grad_q.untyped_data();
  p.grad_k = grad_k.untyped_data();
  p.grad_v = grad_v.untyped_data();
  p.rotary_cos = rot.cos;
  p.rotary_sin = rot.sin;
  p.window_size = window_size;
  p.softmax_scale = softmax_scale;
  p.deterministic = true;  // the CPU backward is deterministic either way
  p.cu_seqlens = nullptr;
  return p;
}

namespace {

ffi::Error swa_fwd_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer cos,
                       ffi::AnyBuffer sin, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::AnyBuffer> lse, int64_t window_size,
                       double softmax_scale) {
  return guarded("swa_fwd", [&] {
    cpu::swa_fwd(swa_fwd_params(q, k, v, cos, sin, *out, *lse, window_size, softmax_scale));
  });
}

ffi::Error swa_bwd_cpu(ffi::AnyBuffer grad_out, ffi::AnyBuffer grad_lse, ffi::AnyBuffer q,
                       ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                       ffi::AnyBuffer cos, ffi::AnyBuffer sin, ffi::Result<ffi::AnyBuffer> grad_q,
                       ffi::Result<ffi::AnyBuffer> grad_k, ffi::Result<ffi::AnyBuffer> grad_v,
                       int64_t window_size, double softmax_scale) {
  return guarded("swa_bwd", [&] {
    cpu::swa_bwd(swa_bwd_params(grad_out, grad_lse, q, k, v, out, lse, cos, sin, *grad_q,
                                *grad_k, *grad_v, window_size, softmax_scale));
  });
}

}  // namespace
}  // namespace rattention::jax_ffi

namespace rj = rattention::jax_ffi;

RATT_FFI_HANDLER(rattention_swa_fwd_cpu, rj::swa_fwd_cpu,
                 rj::ffi::Ffi::Bind()
                     .Arg<rj::ffi::AnyBuffer>()  // q
                     .Arg<rj::ffi::AnyBuffer>()  // k
                     .Arg<rj::ffi::AnyBuffer>()  // v
                     .Arg<rj::ffi::AnyBuffer>()  // rotary_cos
                     .Arg<rj::ffi::AnyBuffer>()  // rotary_sin
                     .Ret<rj::ffi::AnyBuffer>()  // out
                     .Ret<rj::ffi::AnyBuffer>()  // lse
                     .Attr<int64_t>("window_size")
                     .Attr<double>("softmax_scale"))

RATT_FFI_HANDLER(rattention_swa_bwd_cpu, rj::swa_bwd_cpu,
                 rj::ffi::Ffi::Bind()
                     .Arg<rj::ffi::AnyBuffer>()  // grad_out
                     .Arg<rj::ffi::AnyBuffer>()  // grad_lse
                     .Arg<rj::ffi::AnyBuffer>()  // q
                     .Arg<rj::ffi::AnyBuffer>()  // k
                     .Arg<rj::ffi::AnyBuffer>()  // v
                     .Arg<rj::ffi::AnyBuffer>()  // out
                     .Arg<rj::ffi::AnyBuffer>()  // lse
                     .Arg<rj::ffi::AnyBuffer>()  // rotary_cos
                     .Arg<rj::ffi::AnyBuffer>()  // rotary_sin
                     .Ret<rj::ffi::AnyBuffer>()  // grad_q
                     .Ret<rj::ffi::AnyBuffer>()  // grad_k
                     .Ret<rj::ffi::AnyBuffer>()  // grad_v
                     .Attr<int64_t>("window_size")
                     .Attr<double>("softmax_scale"))
