// Host entry point of the CUDA decode-step kernel (torch-free).
#pragma once
#include <cuda_runtime_api.h>

#include "core/params.h"

namespace rattention::cuda {

// One decode step for the batch (SPEC.md "Decoding"): ring/state update, SWA over the ring,
// RLA from the state (+H0), mixing, then pos[b] += 1 (second, one-thread-per-sequence
// kernel, so no CTA of a sequence can see the new position early). A position past the
// rotary table writes NaN outputs (never an out-of-bounds read).
cudaError_t decode_step(const DecodeParams& p, cudaStream_t stream);
// Dynamic shared memory per block the kernel needs (grows with the GQA group).
int64_t decode_smem_bytes(const DecodeParams& p);

}  // namespace rattention::cuda
