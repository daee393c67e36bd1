// Host entry points of the CUDA sliding-window attention kernels (torch-free: params structs
// and a stream). Each returns the launch's cudaError_t; the op layer checks it.
//
// Requirements the op layer guarantees (ops_cuda_swa.cpp): dtype bfloat16 or float16, head
// dim 64 or 128, q/k/v rows contiguous along D with 16-byte aligned base pointers and
// B/T/H strides that are multiples of 8 elements (cp.async moves 16 bytes).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/params.h"

namespace rattention::cuda {

cudaError_t swa_fwd(const SwaFwdParams& p, cudaStream_t stream);
// Dynamic shared memory per block the kernels of an op need (checked by the op layer).
int64_t swa_fwd_smem_bytes(const SwaFwdParams& p);
int64_t swa_bwd_smem_bytes(const SwaBwdParams& p);
// The backward needs an fp32 workspace of swa_bwd_workspace_floats(p) entries (Di per row).
int64_t swa_bwd_workspace_floats(const SwaBwdParams& p);
cudaError_t swa_bwd(const SwaBwdParams& p, float* workspace, cudaStream_t stream);

}  // namespace rattention::cuda
