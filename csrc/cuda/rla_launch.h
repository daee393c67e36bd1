// Host entry points of the CUDA RLA kernels (torch-free: params structs and a stream).
// Each returns the launch's cudaError_t; the op layer checks it.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/params.h"

namespace rattention::cuda {

// Chunk size the CUDA RLA kernels are compiled for (RlaFwdParams::chunk_size must equal it).
constexpr int kRlaChunk = 64;

cudaError_t rla_fwd(const RlaFwdParams& p, cudaStream_t stream);
// The backward needs an fp32 workspace of rla_bwd_workspace_floats(p) entries (it zeroes it).
int64_t rla_bwd_workspace_floats(const RlaBwdParams& p);
cudaError_t rla_bwd(const RlaBwdParams& p, float* workspace, cudaStream_t stream);

}  // namespace rattention::cuda
