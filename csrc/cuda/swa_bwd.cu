// Host launcher of the SWA backward: preprocess (Di), dK/dV, dQ, then the fp32 -> dtype
// conversion with inverse rotary. Workspace (fp32): Di [B, Hq, T], dQ [B, T, Hq, D],
// dK [B, T, Hkv, D]; every entry that is read is written first (no zeroing needed).
#include "cuda/swa_bwd_kernel.cuh"
#include "cuda/swa_launch.h"

namespace rattention::cuda {
namespace {

template <typename Element, int kHeadDim>
cudaError_t launch_bwd(const SwaBwdParams& p, float* ws, cudaStream_t stream) {
  using Traits = SwaTraits<Element, kHeadDim>;
  const int64_t B = p.dims.batch, T = p.dims.seqlen, Hq = p.dims.heads_q, Hkv = p.dims.heads_kv;
  float* di = ws;
  float* dq_ws = di + B * Hq * T;
  float* dk_ws = dq_ws + B * T * Hq * kHeadDim;

  const int64_t rows = B * Hq * T;
  RATT_LAUNCH(unsigned(ceil_div(rows, 8)), 256, 0, stream, swa_bwd_preprocess_kernel)(p, di);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  constexpr int smem_dkdv = Traits::kSmemBwdDkdv;
  auto dkdv = swa_bwd_dkdv_kernel<Traits>;
  err = cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_dkdv);
  if (err != cudaSuccess) return err;
  const dim3 grid_kv(unsigned(ceil_div(T, Traits::kBlockN) * (kHeadDim / kBwdDSlice)), unsigned(B),
                     unsigned(Hkv));
  RATT_LAUNCH(grid_kv, Traits::kNThreads, smem_dkdv, stream, dkdv)(p, di, dk_ws);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  constexpr int smem_dq = Traits::kSmemBwdDq;
  auto dq = swa_bwd_dq_kernel<Traits>;
  err = cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_dq);
  if (err != cudaSuccess) return err;
  const dim3 grid_q(unsigned(ceil_div(T, Traits::kBlockM)), unsigned(B), unsigned(Hq));
  RATT_LAUNCH(grid_q, Traits::kNThreads, smem_dq, stream, dq)(p, di, dq_ws);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const auto* cos = static_cast<const float*>(p.rotary_cos);
  const auto* sin = static_cast<const float*>(p.rotary_sin);
  const int64_t q_rows = B * T * Hq, k_rows = B * T * Hkv;
  RATT_LAUNCH(unsigned(ceil_div(q_rows * kHeadDim / 2, 256)), 256, 0, stream, swa_bwd_convert_kernel<Element>)(
      dq_ws, static_cast<Element*>(p.grad_q), q_rows, Hq, T, kHeadDim, cos, sin);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  RATT_LAUNCH(unsigned(ceil_div(k_rows * kHeadDim / 2, 256)), 256, 0, stream, swa_bwd_convert_kernel<Element>)(
      dk_ws, static_cast<Element*>(p.grad_k), k_rows, Hkv, T, kHeadDim, cos, sin);
  return cudaGetLastError();
}

}  // namespace

int64_t swa_bwd_workspace_floats(const SwaBwdParams& p) {
  const int64_t B = p.dims.batch, T = p.dims.seqlen, D = p.dims.head_dim;
  return B * p.dims.heads_q * T + B * T * (p.dims.heads_q + p.dims.heads_kv) * D;
}

int64_t swa_bwd_smem_bytes(const SwaBwdParams& p) {
  switch (p.dims.head_dim) {  // bf16 and fp16 need the same
    case 64: return SwaTraits<cutlass::bfloat16_t, 64>::kSmemBwdDkdv;
    case 128: return SwaTraits<cutlass::bfloat16_t, 128>::kSmemBwdDkdv;
    default: return 0;
  }
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
