// Host entry points of the CUDA RLA kernels (torch-free: params structs and a stream).
// Each returns the launch's cudaError_t; the op layer checks it.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/params.h"

namespace rattention::cuda {

// Chunk size the CUDA RLA kernels are compiled for (RlaFwdParams::chunk_size must equal it).
constexpr int kRlaChunk = 64;
// Value columns per CTA of the default configuration: D = 128 runs as two 64-column slices
// (the configuration for 99 KB of shared memory per block: four of 32, rla_plan.h).
constexpr int kRlaBlockV = 64;

// The value slices of a CTA grid add their shares of dphi(q) (and, with G == 1, of dphi(k))
// into fp32 workspace slots with atomicAdd: two slices per slot, because two terms added onto
// zero give the same sum in either order, so the backward stays deterministic; the
// post-process adds the slots in a fixed order. Slice x adds into slot x / 2.
constexpr int64_t kRlaSlicesPerAtomicSlot = 2;
constexpr int64_t rla_atomic_slots(int64_t n_vblocks) {
  return (n_vblocks + kRlaSlicesPerAtomicSlot - 1) / kRlaSlicesPerAtomicSlot;
}
// Slots of the backward's dphi(q) workspace, each [tokens, Hq, 2D] floats.
constexpr int64_t rla_dq_slots(int64_t n_vblocks) { return rla_atomic_slots(n_vblocks); }
// Slots of the backward's dphi(k) workspace, each [tokens, Hkv, 2D] floats. With G > 1 query
// heads per kv head every value slice sums its G heads into its own slot (plain
// read-modify-write by the owning thread, fixed order); with G == 1 the slices share slots
// as dphi(q) does.
constexpr int64_t rla_dk_slots(int64_t group, int64_t n_vblocks) {
  return group == 1 ? rla_atomic_slots(n_vblocks) : n_vblocks;
}

// The forward's and the backward's passes split each sequence into segments (and parts of
// segments) sized from the GPU's SM count (rla_fwd_plan, rla_bwd_plan): the op passes the
// device's count, launch.json plans for an H200's.
constexpr int kRlaReferenceSms = 132;
// and its opt-in shared memory per block (227 KiB), for which launch.json plans the RLA
// configuration (rla_plan.h with_rla_traits, rla_state_halves_fit)
constexpr int64_t kRlaReferenceSmemPerBlock = 227 * 1024;
// Longest segment in chunks: bounds the serial chain of one dk/dv CTA and keeps the waves of
// a large batch short.
constexpr int64_t kRlaMaxSegmentChunks = 16;

// The forward needs an fp32 workspace of rla_fwd_workspace_floats(p, num_sms) entries (often
// none: null is fine then); num_sms as for the backward.
int64_t rla_fwd_workspace_floats(const RlaFwdParams& p, int num_sms);
cudaError_t rla_fwd(const RlaFwdParams& p, int num_sms, float* workspace, cudaStream_t stream);
// Dynamic shared memory per block the kernels of an op need in the configuration chosen for
// p.max_smem_per_block (the op sets it to the device's opt-in limit and checks the need
// against it, for a clear error where even the smallest configuration does not fit).
int64_t rla_fwd_smem_bytes(const RlaFwdParams& p);
int64_t rla_bwd_smem_bytes(const RlaBwdParams& p);
// What the RLA temporaries of one layer may take while its backward runs: the backward's
// fp32 workspace plus the forward's checkpoints and final state (live until the backward
// ends). The backward runs a dense batch in sub-batches sized to stay under it
// (rla_bwd_plan, rla_plan.h); never fewer than one batch element per launch, so a single
// sequence above it still runs (in one launch); a packed batch runs in one launch.
constexpr int64_t kRlaTemporariesCapBytes = int64_t(1) << 30;

// The backward needs an fp32 workspace of rla_bwd_workspace_floats(p, num_sms, cap) entries
// (one sub-batch's; it zeroes what it accumulates into); num_sms is the SM count of the GPU it
// runs on (> 0), and num_sms and cap the same in both calls. The cap (bytes, see
// kRlaTemporariesCapBytes) is a parameter only so that tests can force several sub-batches.
int64_t rla_bwd_workspace_floats(const RlaBwdParams& p, int num_sms,
                                 int64_t temporaries_cap_bytes = kRlaTemporariesCapBytes);
cudaError_t rla_bwd(const RlaBwdParams& p, int num_sms, float* workspace, cudaStream_t stream,
                    int64_t temporaries_cap_bytes = kRlaTemporariesCapBytes);

}  // namespace rattention::cuda
