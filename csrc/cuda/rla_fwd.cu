// Instantiations and launcher of the RLA forward kernels: (bf16, fp16) x (D = 64, 128), and
// at D = 128 the configuration for 99 KB of shared memory per block (with_rla_traits); pass 3
// with and without the state's halves in shared memory (rla_state_halves_fit).
// Grids, blocks and shared memory: rla_fwd_plan.
#include "rla_fwd_kernel.cuh"
#include "rla_launch.h"
#include "rla_plan.h"

namespace rattention::cuda {
namespace {

template <class Tr>
cudaError_t launch_rla_fwd(const RlaFwdParams& p, int num_sms, float* workspace,
                           cudaStream_t stream) {
  const int64_t bh = p.dims.batch * p.dims.heads_kv;
  if (bh == 0) return cudaSuccess;
  if (p.dims.seqlen == 0) {  // no tokens: the final state is empty (zero), no checkpoints
    return cudaMemsetAsync(p.final_state, 0, sizeof(float) * bh * 2 * p.dims.head_dim * p.dims.head_dim,
                           stream);
  }
  const RlaFwdPlan plan = rla_fwd_plan<Tr>(p, num_sms);
  cudaError_t err;
  // Packed: an empty document has no segment to write its final state; it is zero.
  if (p.packed() &&
      (err = cudaMemsetAsync(p.final_state, 0,
                             sizeof(float) * bh * 2 * p.dims.head_dim * p.dims.head_dim,
                             stream)) != cudaSuccess)
    return err;
  // 1. local state sum per segment (or per part of one, into the workspace)
  auto state = &rla_fwd_state_kernel<Tr>;
  if ((err = cudaFuncSetAttribute(state, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(plan.state.smem_bytes))) != cudaSuccess)
    return err;
  RATT_LAUNCH_PLANNED(plan.state, stream, state)(p, plan.parts, workspace);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  // 2. prefix over segments -> checkpoints, final state
  RATT_LAUNCH_PLANNED(plan.prefix, stream, rla_fwd_prefix_reduce_kernel)(p, plan.parts, workspace);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  // 3. outputs, every segment (part) from its checkpoint; the state's halves in shared memory
  // where the plan found room for them
  auto kernel = &rla_fwd_kernel<Tr, false>;
  if constexpr (kRlaHalvesVariant<Tr>) {
    if (plan.state_halves) kernel = &rla_fwd_kernel<Tr, true>;
  }
  if ((err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(plan.fwd.smem_bytes))) != cudaSuccess)
    return err;
  RATT_LAUNCH_PLANNED(plan.fwd, stream, kernel)(p, plan.parts);
  return cudaGetLastError();
}

}  // namespace

int64_t rla_fwd_smem_bytes(const RlaFwdParams& p) {
  const RlaFwdPlan plan = rla_fwd_plan(p, kRlaReferenceSms);  // the SM count changes no smem
  return imax(plan.state.smem_bytes, plan.fwd.smem_bytes);
}

int64_t rla_fwd_workspace_floats(const RlaFwdParams& p, int num_sms) {
  return rla_fwd_plan(p, num_sms).workspace_floats;
}

cudaError_t rla_fwd(const RlaFwdParams& p, int num_sms, float* workspace, cudaStream_t stream) {
  if (p.chunk_size != kRlaChunk || !rla_has_kernels(p)) return cudaErrorInvalidValue;
  // the configuration for p.max_smem_per_block (rla_plan.h)
  return with_rla_traits<cudaError_t>(
      p, [&](auto tr) { return launch_rla_fwd<decltype(tr)>(p, num_sms, workspace, stream); });
}

}  // namespace rattention::cuda
