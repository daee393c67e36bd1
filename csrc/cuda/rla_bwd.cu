// Instantiations and launcher of the RLA backward kernels: (bf16, fp16) x (D = 64, 128).
#include "rla_bwd_kernel.cuh"
#include "rla_launch.h"

namespace rattention::cuda {
namespace {

template <class Tr>
cudaError_t launch_rla_bwd(const RlaBwdParams& p, float* workspace, cudaStream_t stream) {
  using Sm = RlaBwdSmem<Tr>;
  const int64_t B = p.dims.batch, T = p.dims.seqlen, Hq = p.dims.heads_q, Hkv = p.dims.heads_kv;
  const int64_t D = p.dims.head_dim;
  const int64_t bh = B * Hkv;
  static_assert(Tr::kBlockV == kRlaBlockV, "rla_dk_slots assumes kRlaBlockV value columns");
  const int64_t n_wsQ = B * T * Hq * 2 * D;
  float* wsQ = workspace;
  float* wsK = workspace + n_wsQ;
  cudaError_t err;
  // Zeros: the workspaces (accumulation targets), dv (keys that never enter a state keep
  // 0), dH0 (accumulated in place).
  if ((err = cudaMemsetAsync(workspace, 0, sizeof(float) * rla_bwd_workspace_floats(p), stream)) !=
      cudaSuccess)
    return err;
  if ((err = cudaMemsetAsync(p.grad_v, 0, sizeof(typename Tr::Element) * B * T * Hkv * D, stream)) != cudaSuccess)
    return err;
  if (p.grad_initial_state != nullptr &&
      (err = cudaMemsetAsync(p.grad_initial_state, 0, sizeof(float) * B * Hq * 2 * D * D, stream)) != cudaSuccess)
    return err;
  if (bh == 0 || T == 0) return cudaGetLastError();

  const int64_t n_chunks = ceil_div(T, Tr::kChunk);
  const int64_t n_ckpt = rla_num_checkpoints(n_chunks, p.checkpoint_every);
  auto dq = &rla_bwd_dq_kernel<Tr>;
  if ((err = cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize, Sm::kDq)) != cudaSuccess)
    return err;
  RATT_LAUNCH(dim3(Tr::kNVBlocks, bh, n_ckpt), Tr::kNThreads, Sm::kDq, stream, dq)(p, wsQ);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  auto dkv = &rla_bwd_dkv_kernel<Tr>;
  if ((err = cudaFuncSetAttribute(dkv, cudaFuncAttributeMaxDynamicSharedMemorySize, Sm::kDkv)) != cudaSuccess)
    return err;
  RATT_LAUNCH(dim3(Tr::kNVBlocks, bh), Tr::kNThreads, Sm::kDkv, stream, dkv)(p, wsK);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  const int64_t rows = B * T * (Hq + Hkv);
  RATT_LAUNCH(static_cast<unsigned>(ceil_div(rows, 8)), 256, 0, stream, rla_bwd_phi_postprocess_kernel<Tr>)(p, wsQ, wsK);
  return cudaGetLastError();
}

template <typename Element>
cudaError_t dispatch_head_dim(const RlaBwdParams& p, float* ws, cudaStream_t stream) {
  switch (p.dims.head_dim) {
    case 64: return launch_rla_bwd<RlaTraits<Element, 64, 64>>(p, ws, stream);
    case 128: return launch_rla_bwd<RlaTraits<Element, 128, 64>>(p, ws, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// wsQ [B, T, Hq, 2D] (dphi(q)) + wsK [slots, B, T, Hkv, 2D] (dphi(k)).
int64_t rla_bwd_workspace_floats(const RlaBwdParams& p) {
  const auto& d = p.dims;
  const int64_t row = d.batch * d.seqlen * 2 * d.head_dim;
  return row * d.heads_q + rla_dk_slots(d.group(), d.head_dim) * row * d.heads_kv;
}

int64_t rla_bwd_smem_bytes(const RlaBwdParams& p) {
  auto need = [](auto traits) {
    using Sm = RlaBwdSmem<decltype(traits)>;
    return int64_t(Sm::kDq > Sm::kDkv ? Sm::kDq : Sm::kDkv);
  };
  switch (p.dims.head_dim) {  // bf16 and fp16 need the same
    case 64: return need(RlaTraits<cutlass::bfloat16_t, 64, 64>{});
    case 128: return need(RlaTraits<cutlass::bfloat16_t, 128, 64>{});
    default: return 0;
  }
}

cudaError_t rla_bwd(const RlaBwdParams& p, float* workspace, cudaStream_t stream) {
  if (p.chunk_size != kRlaChunk) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kBFloat16: return dispatch_head_dim<cutlass::bfloat16_t>(p, workspace, stream);
    case DType::kFloat16: return dispatch_head_dim<cutlass::half_t>(p, workspace, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace rattention::cuda
