// Instantiations and launcher of the RLA backward kernels: (bf16, fp16) x (D = 64, 128), and
// at D = 128 the configuration for 99 KB of shared memory per block (with_rla_traits); the dq
// pass with and without the state's halves in shared memory (rla_state_halves_fit).
// Grids, blocks, shared memory, the dk/dv segments and the fp32 workspace: rla_bwd_plan.
#include "rla_bwd_kernel.cuh"
#include "rla_bwd_state_kernel.cuh"
#include "rla_launch.h"
#include "rla_plan.h"

namespace rattention::cuda {
namespace {

// The five launches over the sequences of `p` (one sub-batch of the plan), in `workspace`.
template <class Tr>
cudaError_t launch_rla_bwd_batch(const RlaBwdParams& p, const RlaBwdPlan& plan, float* workspace,
                                 cudaStream_t stream) {
  const int64_t B = p.dims.batch, T = p.dims.seqlen, Hq = p.dims.heads_q, Hkv = p.dims.heads_kv;
  const int64_t D = p.dims.head_dim;
  const int64_t tokens = p.packed() ? T : B * T;  // rows of q / k (packed: all documents)
  float* wsQ = workspace + plan.ws_q;
  float* wsK = workspace + plan.ws_k;
  float* dH0part = p.grad_initial_state != nullptr ? workspace + plan.ws_dh0 : nullptr;
  float* dS = workspace + plan.ws_ds;
  cudaError_t err;
  // Zeros: wsQ and wsK (accumulation targets), dv (keys that never enter a state keep 0),
  // dH0 (an empty packed document has no segment to write it), each of this sub-batch only.
  // The kernels write the per-segment buffers in full.
  if ((err = cudaMemsetAsync(workspace, 0, sizeof(float) * plan.zeroed_floats, stream)) != cudaSuccess)
    return err;
  if ((err = cudaMemsetAsync(p.grad_v, 0, sizeof(typename Tr::Element) * tokens * Hkv * D, stream)) != cudaSuccess)
    return err;
  if (p.grad_initial_state != nullptr &&
      (err = cudaMemsetAsync(p.grad_initial_state, 0, sizeof(float) * B * Hq * 2 * D * D, stream)) != cudaSuccess)
    return err;
  if (B * Hkv == 0 || T == 0) return cudaGetLastError();

  // with the state's halves in shared memory where the plan found room for them
  auto dq = &rla_bwd_dq_kernel<Tr, false>;
  if constexpr (kRlaHalvesVariant<Tr>) {
    if (plan.dq_state_halves) dq = &rla_bwd_dq_kernel<Tr, true>;
  }
  if ((err = cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(plan.dq.smem_bytes))) != cudaSuccess)
    return err;
  RATT_LAUNCH_PLANNED(plan.dq, stream, dq)(p, plan.dq_parts, wsQ);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  // dS at every dk/dv segment start: local sums, then the suffix scan (and dH0)
  auto state = &rla_bwd_state_kernel<Tr>;
  if ((err = cudaFuncSetAttribute(state, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(plan.state.smem_bytes))) != cudaSuccess)
    return err;
  RATT_LAUNCH_PLANNED(plan.state, stream, state)(p, plan.segments, dS, dH0part);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  RATT_LAUNCH_PLANNED(plan.scan, stream, rla_bwd_suffix_reduce_kernel)(p, plan.segments, dS, dH0part);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  auto dkv = &rla_bwd_dkv_kernel<Tr>;
  if ((err = cudaFuncSetAttribute(dkv, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(plan.dkv.smem_bytes))) != cudaSuccess)
    return err;
  RATT_LAUNCH_PLANNED(plan.dkv, stream, dkv)(p, plan.segments, dS, wsK);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  RATT_LAUNCH_PLANNED(plan.postprocess, stream, rla_bwd_phi_postprocess_kernel<Tr>)(p, wsQ, wsK);
  return cudaGetLastError();
}

// The batch in the plan's sub-batches, one after another on the stream: they share the
// workspace (sized for one sub-batch), each zeroing it first.
template <class Tr>
cudaError_t launch_rla_bwd(const RlaBwdParams& p, int num_sms, int64_t cap, float* workspace,
                           cudaStream_t stream) {
  const RlaBwdPlan plan = rla_bwd_plan<Tr>(p, num_sms, cap);
  if (plan.sub_batches == 1) return launch_rla_bwd_batch<Tr>(p, plan, workspace, stream);
  for (int64_t i = 0; i < plan.sub_batches; ++i) {
    const RlaBwdParams sub = rla_bwd_sub_batch(p, i * plan.batch_per_launch, plan.batch_per_launch);
    const cudaError_t err = launch_rla_bwd_batch<Tr>(sub, plan, workspace, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

int64_t rla_bwd_workspace_floats(const RlaBwdParams& p, int num_sms, int64_t temporaries_cap_bytes) {
  return rla_bwd_plan(p, num_sms, temporaries_cap_bytes).workspace_floats;
}

int64_t rla_bwd_smem_bytes(const RlaBwdParams& p) {
  const RlaBwdPlan plan = rla_bwd_plan(p, kRlaReferenceSms);  // the segmentation changes no smem
  return imax(imax(plan.dq.smem_bytes, plan.state.smem_bytes), plan.dkv.smem_bytes);
}

cudaError_t rla_bwd(const RlaBwdParams& p, int num_sms, float* workspace, cudaStream_t stream,
                    int64_t temporaries_cap_bytes) {
  if (p.chunk_size != kRlaChunk || num_sms <= 0) return cudaErrorInvalidValue;
  if (!rla_has_kernels(p)) return cudaErrorInvalidValue;
  // the configuration for p.max_smem_per_block (rla_plan.h)
  return with_rla_traits<cudaError_t>(p, [&](auto tr) {
    return launch_rla_bwd<decltype(tr)>(p, num_sms, temporaries_cap_bytes, workspace, stream);
  });
}

}  // namespace rattention::cuda
