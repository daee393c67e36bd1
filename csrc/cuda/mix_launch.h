// Host entry points of the CUDA mixing kernels (torch-free). rms over D per (token, head),
// two learned scales [Hq, D]; accumulation type float32 only (CUDA inputs are bf16/fp16).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/params.h"

namespace rattention::cuda {

constexpr int kMixMaxHeadDim = 256;

cudaError_t mix_fwd(const MixParams& p, cudaStream_t stream);

// The weight gradients are reduced deterministically: kernel 1 writes per-(split, head)
// partial sums into `workspace` (float, mix_bwd_workspace_floats(p) entries), kernel 2
// adds the splits in a fixed order.
int64_t mix_bwd_splits(const MixBwdParams& p);
int64_t mix_bwd_workspace_floats(const MixBwdParams& p);
cudaError_t mix_bwd(const MixBwdParams& p, float* workspace, cudaStream_t stream);

}  // namespace rattention::cuda
