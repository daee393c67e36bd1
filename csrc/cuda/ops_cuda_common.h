// Shared by the CUDA op files (ops_cuda_swa.cpp, ops_cuda_rla.cpp).
#pragma once
#include <ATen/cuda/CUDAContext.h>

#include <cstdint>

namespace rattention {

// A clear error, before any launch, when an op's kernels need more dynamic shared memory per
// block than this GPU can give (e.g. the RLA kernels at head dim 128 on sm_86 / sm_89, whose
// opt-in limit is 99 KiB), instead of an opaque launch failure.
// The current GPU's opt-in dynamic shared memory per block (bytes).
inline int64_t device_smem_per_block() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

inline void check_smem_fits(int64_t need, const char* op, int64_t head_dim) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const auto have = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  TORCH_CHECK(need <= have, op, ": the CUDA kernels for head dim ", head_dim, " need ", need,
              " bytes of shared memory per block; this GPU (", prop->name, ", sm_", prop->major,
              prop->minor, ") allows ", have,
              ". Use head dim 64 (or a smaller GQA group for decode_step), or CPU tensors");
}

}  // namespace rattention
