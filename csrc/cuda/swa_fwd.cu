// Host launcher of the SWA forward: picks the (dtype, head dim) instantiation; T, window,
// GQA group, scale and rotary are runtime. Grid, block and shared memory: swa_fwd_plan.
#include "cuda/swa_fwd_kernel.cuh"
#include "cuda/swa_launch.h"
#include "cuda/swa_plan.h"

namespace rattention::cuda {
namespace {

template <typename Element, int kHeadDim>
cudaError_t launch_fwd(const SwaFwdParams& p, cudaStream_t stream) {
  using Traits = SwaFwdTraits<Element, kHeadDim>;
  if (p.dims.seqlen == 0 || p.dims.batch == 0 || p.dims.heads_q == 0) return cudaSuccess;
  const SwaFwdPlan plan = swa_fwd_plan<Traits>(p);
  auto kernel = swa_fwd_kernel<Traits>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(plan.fwd.smem_bytes));
  if (err != cudaSuccess) return err;
  RATT_LAUNCH_PLANNED(plan.fwd, stream, kernel)(p);
  return cudaGetLastError();
}

}  // namespace

int64_t swa_fwd_smem_bytes(const SwaFwdParams& p) { return swa_fwd_plan(p).fwd.smem_bytes; }

cudaError_t swa_fwd(const SwaFwdParams& p, cudaStream_t stream) {
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (!bf16 && p.dtype != DType::kFloat16) return cudaErrorInvalidValue;
  if (p.dims.head_dim == 64) {
    return bf16 ? launch_fwd<cutlass::bfloat16_t, 64>(p, stream)
                : launch_fwd<cutlass::half_t, 64>(p, stream);
  }
  if (p.dims.head_dim == 128) {
    return bf16 ? launch_fwd<cutlass::bfloat16_t, 128>(p, stream)
                : launch_fwd<cutlass::half_t, 128>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rattention::cuda
