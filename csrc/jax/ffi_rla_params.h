// Params filling for the RLA handlers, shared by the CPU handlers (ffi_rla.cpp) and the CUDA
// ones (ffi_cuda_rla.cpp): checks the buffers, then fills the kernels' params structs.
#pragma once
#include <string_view>

#include "jax/ffi_common.h"

namespace rattention::jax_ffi {

// The tiling attributes of both RLA handlers.
struct RlaConfig {
  int64_t window_size;
  std::string_view feature_map;
  int64_t chunk_size;
  int64_t checkpoint_every;
};

RlaFwdParams rla_fwd_params(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                            const ffi::AnyBuffer& v, const ffi::AnyBuffer& initial_state,
                            ffi::AnyBuffer& out, ffi::AnyBuffer& final_state,
                            ffi::AnyBuffer& checkpoints, const RlaConfig& cfg,
                            Backend backend = Backend::kCpu);

RlaBwdParams rla_bwd_params(const ffi::AnyBuffer& grad_out, const ffi::AnyBuffer& grad_final_state,
                            const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                            const ffi::AnyBuffer& v, const ffi::AnyBuffer& initial_state,
                            const ffi::AnyBuffer& checkpoints, ffi::AnyBuffer& grad_q,
                            ffi::AnyBuffer& grad_k, ffi::AnyBuffer& grad_v,
                            ffi::AnyBuffer& grad_initial_state, const RlaConfig& cfg,
                            Backend backend = Backend::kCpu);

}  // namespace rattention::jax_ffi
