// Instantiations and launcher of the RLA forward kernel: (bf16, fp16) x (D = 64, 128).
#include "rla_fwd_kernel.cuh"
#include "rla_launch.h"

namespace rattention::cuda {
namespace {

template <class Tr>
cudaError_t launch_rla_fwd(const RlaFwdParams& p, cudaStream_t stream) {
  const int64_t bh = p.dims.batch * p.dims.heads_kv;
  if (bh == 0) return cudaSuccess;
  if (p.dims.seqlen == 0) {  // no tokens: the final state is empty (zero), no checkpoints
    return cudaMemsetAsync(p.final_state, 0, sizeof(float) * bh * 2 * p.dims.head_dim * p.dims.head_dim,
                           stream);
  }
  const int64_t n_ckpt = rla_num_checkpoints(ceil_div(p.dims.seqlen, Tr::kChunk), p.checkpoint_every);
  const dim3 grid(Tr::kNVBlocks, static_cast<unsigned>(bh), static_cast<unsigned>(n_ckpt));
  cudaError_t err;
  // 1. local state sum per segment
  auto state = &rla_fwd_state_kernel<Tr>;
  if ((err = cudaFuncSetAttribute(state, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  Tr::kSmemState)) != cudaSuccess)
    return err;
  RATT_LAUNCH(grid, Tr::kNThreads, Tr::kSmemState, stream, state)(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  // 2. prefix over segments -> checkpoints, final state
  const int64_t n = bh * 2 * p.dims.head_dim * p.dims.head_dim;
  RATT_LAUNCH(static_cast<unsigned>(ceil_div(n, 256)), 256, 0, stream, rla_fwd_prefix_reduce_kernel)(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  // 3. outputs, every segment from its checkpoint
  auto kernel = &rla_fwd_kernel<Tr>;
  if ((err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  Tr::kSmemFwd)) != cudaSuccess)
    return err;
  RATT_LAUNCH(grid, Tr::kNThreads, Tr::kSmemFwd, stream, kernel)(p);
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

int64_t rla_fwd_smem_bytes(const RlaFwdParams& p) {
  auto need = [](auto traits) {
    using Tr = decltype(traits);
    return int64_t(Tr::kSmemState > Tr::kSmemFwd ? Tr::kSmemState : Tr::kSmemFwd);
  };
  switch (p.dims.head_dim) {  // bf16 and fp16 need the same
    case 64: return need(RlaTraits<cutlass::bfloat16_t, 64, 64>{});
    case 128: return need(RlaTraits<cutlass::bfloat16_t, 128, 64>{});
    default: return 0;
  }
}

cudaError_t rla_fwd(const RlaFwdParams& p, cudaStream_t stream) {
  if (p.chunk_size != kRlaChunk) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kBFloat16: return dispatch_head_dim<cutlass::bfloat16_t>(p, stream);
    case DType::kFloat16: return dispatch_head_dim<cutlass::half_t>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace rattention::cuda
