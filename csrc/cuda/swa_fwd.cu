// SWA forward launcher: dispatch dtype x head dim, dynamic smem, grid (m tiles, Hq, B).
#include "cuda/swa_fwd_kernel.cuh"
#include "cuda/swa_launch.h"

namespace rattention {
namespace {

template <typename Element, int kHeadDim>
cudaError_t launch_fwd(const SwaFwdParams& p, cudaStream_t stream) {
  using Traits = cuda::SwaFwdTraitsFor<Element, kHeadDim>;
  auto kernel = &cuda::swa_fwd_kernel<Traits>;
  constexpr int smem = Traits::kSmemSize;
  if (smem > 48 * 1024) {
    cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(p.dims.seqlen, Traits::kBlockM)),
                  static_cast<unsigned>(p.dims.heads_q), static_cast<unsigned>(p.dims.batch));
  if (p.dims.seqlen == 0 || p.dims.batch == 0) return cudaSuccess;
  kernel<<<grid, Traits::kNThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t swa_fwd_cuda(const SwaFwdParams& p, cudaStream_t stream) {
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return cudaErrorInvalidValue;
  switch (p.dims.head_dim) {
    case 64:
      return bf16 ? launch_fwd<cutlass::bfloat16_t, 64>(p, stream)
                  : launch_fwd<cutlass::half_t, 64>(p, stream);
    case 128:
      return bf16 ? launch_fwd<cutlass::bfloat16_t, 128>(p, stream)
                  : launch_fwd<cutlass::half_t, 128>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace rattention
