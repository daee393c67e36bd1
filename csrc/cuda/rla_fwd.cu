// Instantiations and launcher of the RLA forward kernel: (bf16, fp16) x (D = 64, 128).
#include "rla_fwd_kernel.cuh"
#include "rla_launch.h"

namespace rattention::cuda {
namespace {

template <class Tr>
cudaError_t launch_rla_fwd(const RlaFwdParams& p, cudaStream_t stream) {
  const int64_t bh = p.dims.batch * p.dims.heads_kv;
  if (bh == 0) return cudaSuccess;
  auto kernel = &rla_fwd_kernel<Tr>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         Tr::kSmemFwd);
  if (err != cudaSuccess) return err;
  dim3 grid(Tr::kNVBlocks, static_cast<unsigned>(bh));
  kernel<<<grid, Tr::kNThreads, Tr::kSmemFwd, stream>>>(p);
  return cudaGetLastError();
}

template <typename Element>
cudaError_t dispatch_head_dim(const RlaFwdParams& p, cudaStream_t stream) {
  switch (p.dims.head_dim) {
    case 64: return launch_rla_fwd<RlaTraits<Element, 64, 64>>(p, stream);
    case 128: return launch_rla_fwd<RlaTraits<Element, 128, 64>>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t rla_fwd(const RlaFwdParams& p, cudaStream_t stream) {
  if (p.chunk_size != kRlaChunk) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kBFloat16: return dispatch_head_dim<cutlass::bfloat16_t>(p, stream);
    case DType::kFloat16: return dispatch_head_dim<cutlass::half_t>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace rattention::cuda
