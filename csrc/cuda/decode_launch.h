// Host entry point of the CUDA decode-step kernels (torch-free).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/params.h"

namespace rattention::cuda {

// One decode step for the batch (SPEC.md "Decoding"): ring/state update, SWA over the ring,
// RLA from the state (+H0), mixing, then pos[b] += 1. Flash-decoding: each (sequence, kv
// head) is split across CTAs (decode_plan.h), whose partials a combine kernel merges; the
// combine kernel also writes the new k, v into the ring and advances the positions, after
// every split CTA has read them. `workspace`: decode_workspace_bytes(p) bytes of device
// memory, 16-byte aligned, on the stream's device (no initial contents needed). A position
// past the rotary table writes NaN outputs (never an out-of-bounds read).
cudaError_t decode_step(const DecodeParams& p, void* workspace, cudaStream_t stream);
// Dynamic shared memory per block the split kernel needs (grows with the GQA group).
int64_t decode_smem_bytes(const DecodeParams& p);
// Bytes of workspace decode_step needs (the splits' partials and the positions they saw).
int64_t decode_workspace_bytes(const DecodeParams& p);

}  // namespace rattention::cuda
