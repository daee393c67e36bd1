// Host launcher of the SWA forward: picks the (dtype, head dim) instantiation; T, window,
// GQA group, scale and rotary are runtime.
#include "cuda/swa_fwd_kernel.cuh"
#include "cuda/swa_launch.h"

namespace rattention::cuda {
namespace {

template <typename Element, int kHeadDim>
cudaError_t launch_fwd(const SwaFwdParams& p, cudaStream_t stream) {
  using Traits = SwaTraits<Element, kHeadDim>;
  const int64_t T = p.dims.seqlen;
  if (T == 0 || p.dims.batch == 0 || p.dims.heads_q == 0) return cudaSuccess;
  auto kernel = swa_fwd_kernel<Traits>;
  constexpr int smem = Traits::kSmemFwd;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(ceil_div(T, Traits::kBlockM)), unsigned(p.dims.batch),
                  unsigned(p.dims.heads_q));
  RATT_LAUNCH(grid, Traits::kNThreads, smem, stream, kernel)(p);
  return cudaGetLastError();
}

}  // namespace

int64_t swa_fwd_smem_bytes(const SwaFwdParams& p) {
  switch (p.dims.head_dim) {  // bf16 and fp16 need the same
    case 64: return SwaTraits<cutlass::bfloat16_t, 64>::kSmemFwd;
    case 128: return SwaTraits<cutlass::bfloat16_t, 128>::kSmemFwd;
    default: return 0;
  }
}

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
