// Params filling for the SWA handlers, shared by the CPU handlers (ffi_swa.cpp) and the CUDA
// ones (ffi_cuda_swa.cpp): checks the buffers, then fills the kernels' params structs.
#pragma once
#include "jax/ffi_common.h"

namespace rattention::jax_ffi {

SwaFwdParams swa_fwd_params(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                            const ffi::AnyBuffer& v, const ffi::AnyBuffer& cos,
                            const ffi::AnyBuffer& sin, ffi::AnyBuffer& out, ffi::AnyBuffer& lse,
                            int64_t window_size, double softmax_scale,
                            Backend backend = Backend::kCpu);

SwaBwdParams swa_bwd_params(const ffi::AnyBuffer& grad_out, const ffi::AnyBuffer& grad_lse,
                            const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                            const ffi::AnyBuffer& v, const ffi::AnyBuffer& out,
                            const ffi::AnyBuffer& lse, const ffi::AnyBuffer& cos,
                            const ffi::AnyBuffer& sin, ffi::AnyBuffer& grad_q,
                            ffi::AnyBuffer& grad_k, ffi::AnyBuffer& grad_v, int64_t window_size,
                            double softmax_scale, Backend backend = Backend::kCpu);

}  // namespace rattention::jax_ffi
