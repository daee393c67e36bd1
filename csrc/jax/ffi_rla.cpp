// XLA FFI handlers of the residual linear attention kernels (CPU):
//   rattention_rla_fwd_cpu: q, k, v, initial_state -> out (acc), final_state, checkpoints
//   rattention_rla_bwd_cpu: grad_out, grad_final_state, q, k, v, initial_state, checkpoints
//                           -> grad_q, grad_k, grad_v, grad_initial_state
// Attributes: window_size, feature_map ("softmax" | "relu"), chunk_size, checkpoint_every.
// An empty initial_state / grad_final_state is absent; grad_initial_state is then empty too,
// otherwise one gradient per batch element [B, Hq, 2D, D] (the caller sums a broadcast H0).
#include <string>

#include "core/window.h"
#include "cpu/kernels.h"
#include "jax/ffi_rla_params.h"

namespace rattention::jax_ffi {
namespace {

struct RlaChecked {
  QkvInfo info;
  FeatureMap fm;
  int64_t n_checkpoints;
  const void* h0;
  int64_t h0_bstride;
};

RlaChecked check_rla(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                     const ffi::AnyBuffer& h0, const RlaConfig& cfg, Backend backend) {
  RlaChecked c{check_qkv(q, k, v, backend), FeatureMap::kSoftmax, 0, nullptr, 0};
  check_window(cfg.window_size);
  if (cfg.feature_map == "relu") {
    c.fm = FeatureMap::kRelu;
  } else if (cfg.feature_map != "softmax") {
    throw InvalidArgument("feature_map must be 'softmax' or 'relu', got '" +
                          std::string(cfg.feature_map) + "'");
  }
  if (cfg.chunk_size < 1 || cfg.chunk_size > 1024) {
    throw InvalidArgument("chunk_size must be in [1, 1024], got " + std::to_string(cfg.chunk_size));
  }
  if (cfg.checkpoint_every < 1) {
    throw InvalidArgument("checkpoint_every must be >= 1, got " +
                          std::to_string(cfg.checkpoint_every));
  }
  const AttnDims& d = c.info.dims;
  c.n_checkpoints =
      rla_num_checkpoints(ceil_div(d.seqlen, cfg.chunk_size), cfg.checkpoint_every);
  if (h0.element_count() > 0) {
    const auto hd = h0.dimensions();
    const int64_t hb = hd.size() == 4 ? hd[0] : -1;
    if (hb != 1 && hb != d.batch) {
      throw InvalidArgument("initial_state must be [B or 1, Hq, 2D, D] = [" +
                            std::to_string(d.batch) + " or 1, " + std::to_string(d.heads_q) +
                            ", " + std::to_string(2 * d.head_dim) + ", " +
                            std::to_string(d.head_dim) + "], got " + dims_str(hd));
    }
    check_buffer(h0, "initial_state", c.info.acc, {hb, d.heads_q, 2 * d.head_dim, d.head_dim});
    c.h0 = h0.untyped_data();
    c.h0_bstride = hb > 1 ? d.heads_q * 2 * d.head_dim * d.head_dim : 0;
  }
  return c;
}

}  // namespace

RlaFwdParams rla_fwd_params(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                            const ffi::AnyBuffer& v, const ffi::AnyBuffer& initial_state,
                            ffi::AnyBuffer& out, ffi::AnyBuffer& final_state,
                            ffi::AnyBuffer& checkpoints, const RlaConfig& cfg, Backend backend) {
  const RlaChecked c = check_rla(q, k, v, initial_state, cfg, backend);
  const AttnDims& d = c.info.dims;
  const int64_t D2 = 2 * d.head_dim;
  check_buffer(out, "out", c.info.acc, {d.batch, d.seqlen, d.heads_q, d.head_dim});
  check_buffer(final_state, "final_state", c.info.acc, {d.batch, d.heads_kv, D2, d.head_dim});
  check_buffer(checkpoints, "checkpoints", c.info.acc,
               {d.batch, d.heads_kv, c.n_checkpoints, D2, d.head_dim});
  RlaFwdParams p{};
  p.dims = d;
  p.dtype = c.info.dtype;
  p.feature_map = c.fm;
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.q_stride = contiguous_strides(d, d.heads_q);
  p.k_stride = contiguous_strides(d, d.heads_kv);
  p.v_stride = p.k_stride;
  p.out = out.untyped_data();
  p.out_stride = p.q_stride;
  p.initial_state = c.h0;
  p.initial_state_bstride = c.h0_bstride;
  p.final_state = final_state.untyped_data();
  p.checkpoints = checkpoints.untyped_data();
  p.window_size = cfg.window_size;
  p.chunk_size = cfg.chunk_size;
  p.checkpoint_every = cfg.checkpoint_every;
  p.cu_seqlens = nullptr;
  return p;
}

RlaBwdParams rla_bwd_params(const ffi::AnyBuffer& grad_out, const ffi::AnyBuffer& grad_final_state,
                            const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                            const ffi::AnyBuffer& v, const ffi::AnyBuffer& initial_state,
                            const ffi::AnyBuffer& checkpoints, ffi::AnyBuffer& grad_q,
                            ffi::AnyBuffer& grad_k, ffi::AnyBuffer& grad_v,
                            ffi::AnyBuffer& grad_initial_state, const RlaConfig& cfg,
                            Backend backend) {
  const RlaChecked c = check_rla(q, k, v, initial_state, cfg, backend);
  const AttnDims& d = c.info.dims;
  const int64_t D2 = 2 * d.head_dim;
  check_buffer(grad_out, "grad_out", c.info.acc, {d.batch, d.seqlen, d.heads_q, d.head_dim});
  const bool has_gfs = check_optional(grad_final_state, "grad_final_state", c.info.acc,
                                      {d.batch, d.heads_kv, D2, d.head_dim});
  check_buffer(checkpoints, "checkpoints", c.info.acc,
               {d.batch, d.heads_kv, c.n_checkpoints, D2, d.head_dim});
  check_buffer(grad_q, "grad_q", c.info.ffi_dtype, {d.batch, d.seqlen, d.heads_q, d.head_dim});
  check_buffer(grad_k, "grad_k", c.info.ffi_dtype, {d.batch, d.seqlen, d.heads_kv, d.head_dim});
  check_buffer(grad_v, "grad_v", c.info.ffi_dtype, {d.batch, d.seqlen, d.heads_kv, d.head_dim});
  if (c.h0 != nullptr) {
    check_buffer(grad_initial_state, "grad_initial_state", c.info.acc,
                 {d.batch, d.heads_q, D2, d.head_dim});
  }
  RlaBwdParams p{};
  p.dims = d;
  p.dtype = c.info.dtype;
  p.feature_map = c.fm;
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.q_stride = contiguous_strides(d, d.heads_q);
  p.k_stride = contiguous_strides(d, d.heads_kv);
  p.v_stride = p.k_stride;
  p.grad_out = grad_out.untyped_data();
  p.grad_out_stride = p.q_stride;
  p.initial_state = c.h0;
  p.initial_state_bstride = c.h0_bstride;
  p.checkpoints = checkpoints.untyped_data();
  p.grad_final_state = has_gfs ? grad_final_state.untyped_data() : nullptr;
  p.grad_q = grad_q.untyped_data();
  p.grad_k = grad_k.untyped_data();
  p.grad_v = grad_v.untyped_data();
  p.grad_initial_state = c.h0 != nullptr ? grad_initial_state.untyped_data() : nullptr;
  p.window_size = cfg.window_size;
  p.chunk_size = cfg.chunk_size;
  p.checkpoint_every = cfg.checkpoint_every;
  p.cu_seqlens = nullptr;
  return p;
}

namespace {

ffi::Error rla_fwd_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer h0,
                       ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> final_state,
                       ffi::Result<ffi::AnyBuffer> checkpoints, int64_t window_size,
                       std::string_view feature_map, int64_t chunk_size,
                       int64_t checkpoint_every) {
  return guarded("rla_fwd", [&] {
    const RlaConfig cfg{window_size, feature_map, chunk_size, checkpoint_every};
    cpu::rla_fwd(rla_fwd_params(q, k, v, h0, *out, *final_state, *checkpoints, cfg));
  });
}

ffi::Error rla_bwd_cpu(ffi::AnyBuffer grad_out, ffi::AnyBuffer grad_final_state, ffi::AnyBuffer q,
                       ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer h0,
                       ffi::AnyBuffer checkpoints, ffi::Result<ffi::AnyBuffer> grad_q,
                       ffi::Result<ffi::AnyBuffer> grad_k, ffi::Result<ffi::AnyBuffer> grad_v,
                       ffi::Result<ffi::AnyBuffer> grad_h0, int64_t window_size,
                       std::string_view feature_map, int64_t chunk_size,
                       int64_t checkpoint_every) {
  return guarded("rla_bwd", [&] {
    const RlaConfig cfg{window_size, feature_map, chunk_size, checkpoint_every};
    cpu::rla_bwd(rla_bwd_params(grad_out, grad_final_state, q, k, v, h0, checkpoints, *grad_q,
                                *grad_k, *grad_v, *grad_h0, cfg));
  });
}

}  // namespace
}  // namespace rattention::jax_ffi

namespace rj = rattention::jax_ffi;

RATT_FFI_HANDLER(rattention_rla_fwd_cpu, rj::rla_fwd_cpu,
                 rj::ffi::Ffi::Bind()
                     .Arg<rj::ffi::AnyBuffer>()  // q
                     .Arg<rj::ffi::AnyBuffer>()  // k
                     .Arg<rj::ffi::AnyBuffer>()  // v
                     .Arg<rj::ffi::AnyBuffer>()  // initial_state
                     .Ret<rj::ffi::AnyBuffer>()  // out
                     .Ret<rj::ffi::AnyBuffer>()  // final_state
                     .Ret<rj::ffi::AnyBuffer>()  // checkpoints
                     .Attr<int64_t>("window_size")
                     .Attr<std::string_view>("feature_map")
                     .Attr<int64_t>("chunk_size")
                     .Attr<int64_t>("checkpoint_every"))

RATT_FFI_HANDLER(rattention_rla_bwd_cpu, rj::rla_bwd_cpu,
                 rj::ffi::Ffi::Bind()
                     .Arg<rj::ffi::AnyBuffer>()  // grad_out
                     .Arg<rj::ffi::AnyBuffer>()  // grad_final_state
                     .Arg<rj::ffi::AnyBuffer>()  // q
                     .Arg<rj::ffi::AnyBuffer>()  // k
                     .Arg<rj::ffi::AnyBuffer>()  // v
                     .Arg<rj::ffi::AnyBuffer>()  // initial_state
                     .Arg<rj::ffi::AnyBuffer>()  // checkpoints
                     .Ret<rj::ffi::AnyBuffer>()  // grad_q
                     .Ret<rj::ffi::AnyBuffer>()  // grad_k
                     .Ret<rj::ffi::AnyBuffer>()  // grad_v
                     .Ret<rj::ffi::AnyBuffer>()  // grad_initial_state
                     .Attr<int64_t>("window_size")
                     .Attr<std::string_view>("feature_map")
                     .Attr<int64_t>("chunk_size")
                     .Attr<int64_t>("checkpoint_every"))
