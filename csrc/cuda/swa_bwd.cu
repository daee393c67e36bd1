// Host launcher of the SWA backward: preprocess (Di), dK/dV, dQ, then the fp32 -> dtype
// conversion with inverse rotary. Grids, blocks, shared memory and the fp32 workspace
// (Di, dQ, dK; no zeroing needed): swa_bwd_plan.
#include "cuda/swa_bwd_kernel.cuh"
#include "cuda/swa_launch.h"
#include "cuda/swa_plan.h"

namespace rattention::cuda {
namespace {

template <typename Element, int kHeadDim>
cudaError_t launch_bwd(const SwaBwdParams& p, float* ws, cudaStream_t stream) {
  using Traits = SwaTraits<Element, kHeadDim>;
  const SwaBwdPlan plan = swa_bwd_plan<Traits>(p);
  float* di = ws + plan.ws_di;
  float* dq_ws = ws + plan.ws_dq;
  float* dk_ws = ws + plan.ws_dk;

  // dO in the input dtype is staged in grad_q until swa_bwd_convert_kernel writes dQ there.
  RATT_LAUNCH_PLANNED(plan.preprocess, stream, swa_bwd_preprocess_kernel)(p, di, p.grad_q);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  auto dkdv = swa_bwd_dkdv_kernel<SwaDkdvTraits<Element, kHeadDim>>;
  err = cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(plan.dkdv.smem_bytes));
  if (err != cudaSuccess) return err;
  RATT_LAUNCH_PLANNED(plan.dkdv, stream, dkdv)(p, di, dk_ws);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  auto dq = swa_bwd_dq_kernel<Traits>;
  err = cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(plan.dq.smem_bytes));
  if (err != cudaSuccess) return err;
  RATT_LAUNCH_PLANNED(plan.dq, stream, dq)(p, di, dq_ws);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const auto* cos = static_cast<const float*>(p.rotary_cos);
  const auto* sin = static_cast<const float*>(p.rotary_sin);
  const int64_t Hq = p.dims.heads_q, Hkv = p.dims.heads_kv;
  const int64_t tokens = p.packed() ? p.dims.seqlen : p.dims.batch * p.dims.seqlen;
  const QkvParams& seq = p;
  RATT_LAUNCH_PLANNED(plan.convert_dq, stream, swa_bwd_convert_kernel<Element>)(
      seq, dq_ws, static_cast<Element*>(p.grad_q), tokens * Hq, Hq, kHeadDim, cos, sin);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  RATT_LAUNCH_PLANNED(plan.convert_dk, stream, swa_bwd_convert_kernel<Element>)(
      seq, dk_ws, static_cast<Element*>(p.grad_k), tokens * Hkv, Hkv, kHeadDim, cos, sin);
  return cudaGetLastError();
}

}  // namespace

int64_t swa_bwd_workspace_floats(const SwaBwdParams& p) { return swa_bwd_plan(p).workspace_floats; }

int64_t swa_bwd_smem_bytes(const SwaBwdParams& p) {
  const SwaBwdPlan plan = swa_bwd_plan(p);
  return imax(plan.dkdv.smem_bytes, plan.dq.smem_bytes);
}

cudaError_t swa_bwd(const SwaBwdParams& p, float* workspace, cudaStream_t stream) {
  if (p.dims.seqlen == 0 || p.dims.batch == 0 || p.dims.heads_q == 0) return cudaSuccess;
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (!bf16 && p.dtype != DType::kFloat16) return cudaErrorInvalidValue;
  if (p.dims.head_dim == 64) {
    return bf16 ? launch_bwd<cutlass::bfloat16_t, 64>(p, workspace, stream)
                : launch_bwd<cutlass::half_t, 64>(p, workspace, stream);
  }
  if (p.dims.head_dim == 128) {
    return bf16 ? launch_bwd<cutlass::bfloat16_t, 128>(p, workspace, stream)
                : launch_bwd<cutlass::half_t, 128>(p, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rattention::cuda
