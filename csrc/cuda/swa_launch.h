// Torch-free launchers of the SWA CUDA kernels (defined in swa_fwd.cu / swa_bwd.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "core/params.h"

namespace rattention {

// Forward: out [B,T,Hq,D] float32, lse [B,Hq,T] float32. Errors: returns the CUDA error of
// the launch (cudaSuccess on success); the caller checks it.
cudaError_t swa_fwd_cuda(const SwaFwdParams& params, cudaStream_t stream);

}  // namespace rattention
