// Params filling for the mixing handlers, shared by the CPU handlers (ffi_mix.cpp) and the
// CUDA ones (ffi_cuda_mix.cpp): checks the buffers, then fills the kernels' params structs.
#pragma once
#include "jax/ffi_common.h"

namespace rattention::jax_ffi {

MixParams mix_fwd_params(const ffi::AnyBuffer& o_swa, const ffi::AnyBuffer& o_rla,
                         const ffi::AnyBuffer& swa_weight, const ffi::AnyBuffer& rla_weight,
                         ffi::AnyBuffer& out, double eps,
                         Backend backend = Backend::kCpu);

MixBwdParams mix_bwd_params(const ffi::AnyBuffer& grad_out, const ffi::AnyBuffer& o_swa,
                            const ffi::AnyBuffer& o_rla, const ffi::AnyBuffer& swa_weight,
                            const ffi::AnyBuffer& rla_weight, ffi::AnyBuffer& grad_o_swa,
                            ffi::AnyBuffer& grad_o_rla, ffi::AnyBuffer& grad_swa_weight,
                            ffi::AnyBuffer& grad_rla_weight, double eps,
                            Backend backend = Backend::kCpu);

}  // namespace rattention::jax_ffi
