// Mixing of the two branches on CUDA (SPEC.md "Mixing"), float32 accumulation:
//   o = rms(a) * g_a + rms(b) * g_b,  rms(x) = x / sqrt(mean(x^2) + eps) over D.
// Forward: one warp per row (token, head). Backward: one CTA per (head, split of the rows of
// that head), so the weight gradient of a head is summed inside the CTA in a fixed order,
// written as a per-split partial and added over the splits by a second small kernel:
// deterministic, no atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/rms_mix.h"
#include "core/window.h"
#include "cuda/launch.cuh"
#include "mix_launch.h"
#include "mix_plan.h"

namespace rattention::cuda {
// Named (not anonymous) so the kernel names stay readable in tools/cuda_check.py.
namespace mix_impl {

constexpr int kMaxPerLane = kMixMaxHeadDim / 32;

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f(float x) { return x; }
template <> __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f(float x) { return __float2half(x); }

__device__ __forceinline__ float mix_warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Lane l owns entries d = l + 32 * e (e < kMaxPerLane, d < D): coalesced row reads.
template <typename OutT>
__global__ void __launch_bounds__(256) mix_fwd_kernel(const MixParams p) {
  RATT_COVER("run");
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= p.rows) return;
  const int D = static_cast<int>(p.head_dim);
  const int64_t h = row % p.heads_q;
  const float* a = static_cast<const float*>(p.o_swa) + row * D;
  const float* bb = static_cast<const float*>(p.o_rla) + row * D;
  const float* ga = static_cast<const float*>(p.swa_weight) + h * D;
  const float* gb = static_cast<const float*>(p.rla_weight) + h * D;
  float xa[kMaxPerLane], xb[kMaxPerLane];
  float ssa = 0.f, ssb = 0.f;
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int d = lane + 32 * e;
    xa[e] = d < D ? a[d] : 0.f;
    xb[e] = d < D ? bb[d] : 0.f;
    ssa += xa[e] * xa[e];
    ssb += xb[e] * xb[e];
  }
  const float eps = static_cast<float>(p.eps);
  // An all-zero row (e.g. o_rla for t <= w without H0) gives a finite factor and zeros; a row
  // with an Inf a NaN factor (rms_factor).
  ssa = mix_warp_sum(ssa);
  ssb = mix_warp_sum(ssb);
  const float ra = rms_factor(rsqrtf(ssa / D + eps), ssa);
  const float rb = rms_factor(rsqrtf(ssb / D + eps), ssb);
  OutT* o = static_cast<OutT*>(p.out) + row * D;
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int d = lane + 32 * e;
    if (d < D) o[d] = from_f<OutT>(xa[e] * ra * ga[d] + xb[e] * rb * gb[d]);
  }
}

// CTA (split, h): rows r = h + Hq * j for j in the split's range; warp w takes j = j0 + w,
// j0 + w + 4, ... . Per row: dx = r (dy g - xh mean(dy g xh)), dg += dy xh (xh = x r).
template <typename GradT>
__global__ void __launch_bounds__(kMixBwdWarps * 32) mix_bwd_kernel(const MixBwdParams p,
                                                                     float* partial,
                                                                     int64_t n_splits) {
  __shared__ float sDg[kMixBwdWarps][2][kMixMaxHeadDim];
  RATT_COVER("run");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int D = static_cast<int>(p.head_dim);
  const int64_t Hq = p.heads_q, h = blockIdx.y, split = blockIdx.x;
  const int64_t per_head = p.rows / Hq;
  const int64_t per_split = ceil_div(per_head, n_splits);
  const int64_t j0 = split * per_split, j1 = imin(per_head, j0 + per_split);
  const float eps = static_cast<float>(p.eps);
  const float* ga = static_cast<const float*>(p.swa_weight) + h * D;
  const float* gb = static_cast<const float*>(p.rla_weight) + h * D;
  float wa[kMaxPerLane], wb[kMaxPerLane], dga[kMaxPerLane], dgb[kMaxPerLane];
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int d = lane + 32 * e;
    wa[e] = d < D ? ga[d] : 0.f;
    wb[e] = d < D ? gb[d] : 0.f;
    dga[e] = dgb[e] = 0.f;
  }
  for (int64_t j = j0 + warp; j < j1; j += kMixBwdWarps) {
    const int64_t row = h + Hq * j;
    const GradT* dy_row = static_cast<const GradT*>(p.grad_out) + row * D;
    const float* a = static_cast<const float*>(p.o_swa) + row * D;
    const float* bb = static_cast<const float*>(p.o_rla) + row * D;
    float dy[kMaxPerLane], xa[kMaxPerLane], xb[kMaxPerLane];
    float ssa = 0.f, ssb = 0.f;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int d = lane + 32 * e;
      dy[e] = d < D ? to_f(dy_row[d]) : 0.f;
      xa[e] = d < D ? a[d] : 0.f;
      xb[e] = d < D ? bb[d] : 0.f;
      ssa += xa[e] * xa[e];
      ssb += xb[e] * xb[e];
    }
    ssa = mix_warp_sum(ssa);
    ssb = mix_warp_sum(ssb);
    const float ra = rms_factor(rsqrtf(ssa / D + eps), ssa);  // the forward's factors
    const float rb = rms_factor(rsqrtf(ssb / D + eps), ssb);
    float dota = 0.f, dotb = 0.f;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      dota += dy[e] * wa[e] * xa[e] * ra;
      dotb += dy[e] * wb[e] * xb[e] * rb;
    }
    const float ma = mix_warp_sum(dota) / D, mb = mix_warp_sum(dotb) / D;
    float* gxa = static_cast<float*>(p.grad_o_swa) + row * D;
    float* gxb = static_cast<float*>(p.grad_o_rla) + row * D;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int d = lane + 32 * e;
      const float xha = xa[e] * ra, xhb = xb[e] * rb;
      if (d < D) {
        gxa[d] = ra * (dy[e] * wa[e] - xha * ma);
        gxb[d] = rb * (dy[e] * wb[e] - xhb * mb);
      }
      dga[e] += dy[e] * xha;
      dgb[e] += dy[e] * xhb;
    }
  }
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int d = lane + 32 * e;
    if (d < D) {
      sDg[warp][0][d] = dga[e];
      sDg[warp][1][d] = dgb[e];
    }
  }
  __syncthreads();
  // Fixed-order sum over the warps; partial layout [split][2][Hq][D].
  for (int i = threadIdx.x; i < 2 * D; i += blockDim.x) {
    const int which = i / D, d = i % D;
    float s = 0.f;
    for (int w = 0; w < kMixBwdWarps; ++w) s += sDg[w][which][d];
    partial[((split * 2 + which) * Hq + h) * D + d] = s;
  }
}

// grad weight[which][h][d] = sum over splits (in order) of the partials.
__global__ void __launch_bounds__(256) mix_bwd_reduce_kernel(const MixBwdParams p,
                                                             const float* partial,
                                                             int64_t n_splits) {
  const int64_t n = p.heads_q * p.head_dim;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= 2 * n) return;
  const int64_t which = i / n, hd = i % n;
  RATT_COVER("run");
  if (n_splits > 1) RATT_COVER_ANY("several_splits");
  float s = 0.f;
  for (int64_t sp = 0; sp < n_splits; ++sp) s += partial[(sp * 2 + which) * n + hd];
  float* dst = static_cast<float*>(which == 0 ? p.grad_swa_weight : p.grad_rla_weight);
  dst[hd] = s;
}

}  // namespace mix_impl
using namespace mix_impl;

cudaError_t mix_fwd(const MixParams& p, cudaStream_t stream) {
  if (p.acc_dtype != DType::kFloat32 || p.head_dim > kMixMaxHeadDim || p.head_dim < 1)
    return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  const KernelLaunch l = mix_fwd_plan(p).fwd;
  switch (p.out_dtype) {
    case DType::kFloat32: RATT_LAUNCH_PLANNED(l, stream, mix_fwd_kernel<float>)(p); break;
    case DType::kBFloat16: RATT_LAUNCH_PLANNED(l, stream, mix_fwd_kernel<__nv_bfloat16>)(p); break;
    case DType::kFloat16: RATT_LAUNCH_PLANNED(l, stream, mix_fwd_kernel<__half>)(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

int64_t mix_bwd_splits(const MixBwdParams& p) { return mix_bwd_plan(p).n_splits; }

int64_t mix_bwd_workspace_floats(const MixBwdParams& p) { return mix_bwd_plan(p).workspace_floats; }

cudaError_t mix_bwd(const MixBwdParams& p, float* workspace, cudaStream_t stream) {
  if (p.acc_dtype != DType::kFloat32 || p.head_dim > kMixMaxHeadDim || p.head_dim < 1)
    return cudaErrorInvalidValue;
  if (p.heads_q == 0) return cudaSuccess;
  const MixBwdPlan plan = mix_bwd_plan(p);
  const int64_t n_splits = plan.n_splits;
  switch (p.grad_dtype) {
    case DType::kFloat32: RATT_LAUNCH_PLANNED(plan.bwd, stream, mix_bwd_kernel<float>)(p, workspace, n_splits); break;
    case DType::kBFloat16: RATT_LAUNCH_PLANNED(plan.bwd, stream, mix_bwd_kernel<__nv_bfloat16>)(p, workspace, n_splits); break;
    case DType::kFloat16: RATT_LAUNCH_PLANNED(plan.bwd, stream, mix_bwd_kernel<__half>)(p, workspace, n_splits); break;
    default: return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  RATT_LAUNCH_PLANNED(plan.reduce, stream, mix_bwd_reduce_kernel)(p, workspace, n_splits);
  return cudaGetLastError();
}

}  // namespace rattention::cuda
