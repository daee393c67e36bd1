// One decode step of RAttention on CUDA (SPEC.md "Decoding"), same semantics as the CPU
// decode (csrc/cpu/decode.cpp). Memory-bound: one CTA per (sequence b, kv head) reads the
// ring of w + 1 keys/values and the fp32 state [2D, D] once per step and serves the G
// query heads of the group.
//
// Per CTA, at p = pos[b], ring slot(s) = s mod (w + 1):
//   1. p >= w + 1: the token p - w - 1 leaves the window (ring slot(p)); S += phi(k) v^T
//      (folded into the state sweep of step 4);
//   2. the new raw k, v are written into slot(p) (after the old row was read);
//   3. SWA: softmax over positions max(0, p - w) .. p of scale <rope_p(q), rope_s(k_s)>,
//      per head, warps split the keys (online softmax, merged across warps);
//   4. RLA: o_rla = phi(q)^T (S + H0_h) in one sweep over S (threads own columns);
//   5. mixing: rms(o_swa) g_swa + rms(o_rla) g_rla -> out (input dtype).
// pos[b] += 1 runs in a second kernel (decode_pos_kernel) so no CTA of b reads a new pos.
// A negative position, or a position past the rotary table, writes NaN for that sequence's
// outputs instead of reading out of bounds (the negative case leaves the cache untouched).
#include <cutlass/bfloat16.h>
#include <cutlass/half.h>

#include <cmath>

#include "core/window.h"
#include "cuda/launch.cuh"
#include "decode_launch.h"
#include "decode_plan.h"

namespace rattention::cuda {
// Named (not anonymous) so the kernel names stay readable in tools/cuda_check.py.
namespace decode_impl {

constexpr int kHeadBlock = kDecodeHeadBlock;  // query heads accumulated together in the state sweep

__device__ __forceinline__ float dec_warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float dec_warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float dec_warp_min(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fminf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// phi of one D-row held in fp32 shared memory, by one warp, into y (2D, fp32 smem).
template <int D>
__device__ void warp_phi(FeatureMap fm, const float* x, float* y) {
  constexpr int E = D / 32;
  const int lane = threadIdx.x % 32;
  float v[E];
#pragma unroll
  for (int e = 0; e < E; ++e) v[e] = x[lane * E + e];
  if (fm == FeatureMap::kRelu) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      y[lane * E + e] = fmaxf(v[e], 0.f);
      y[D + lane * E + e] = fmaxf(-v[e], 0.f);
    }
    return;
  }
  float mx = v[0], mn = v[0];
#pragma unroll
  for (int e = 1; e < E; ++e) {
    mx = fmaxf(mx, v[e]);
    mn = fminf(mn, v[e]);
  }
  mx = dec_warp_max(mx);
  mn = dec_warp_min(mn);
  float ep[E], en[E], sp = 0.f, sn = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    ep[e] = __expf(v[e] - mx);
    en[e] = __expf(mn - v[e]);
    sp += ep[e];
    sn += en[e];
  }
  const float ip = 1.f / dec_warp_sum(sp), in = 1.f / dec_warp_sum(sn);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    y[lane * E + e] = ep[e] * ip;
    y[D + lane * E + e] = en[e] * in;
  }
}

// Dynamic shared memory: decode_step_smem_floats (decode_plan.h) has the carving.
template <typename Element, int D>
__global__ void __launch_bounds__(kDecodeThreads) decode_step_kernel(const DecodeParams p) {
  RATT_DYNAMIC_SMEM(float, smem);
  const int64_t Hq = p.heads_q, Hkv = p.heads_kv, G = Hq / Hkv;
  const int64_t b = blockIdx.x / Hkv, hk = blockIdx.x % Hkv;
  float* sQ = smem;
  float* sPhiQ = sQ + G * D;
  float* sOs = sPhiQ + G * 2 * D;
  float* sOr = sOs + G * D;
  float* sKold = sOr + G * D;
  float* sVold = sKold + D;
  float* sPhiK = sVold + D;
  float* sRed = sPhiK + 2 * D;  // [kDecodeWarps][D + 2]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t pos = p.pos[b];
  const int64_t W1 = p.window_size + 1;
  const float* gCos = static_cast<const float*>(p.rotary_cos);
  const float* gSin = static_cast<const float*>(p.rotary_sin);
  const bool bad = pos < 0 || (gCos != nullptr && pos >= p.rotary_positions);
  Element* gO = static_cast<Element*>(p.out) + (b * Hq + hk * G) * D;  // [G, D] of this CTA
  if (pos < 0) {
    RATT_COVER_ANY("negative_position");
    for (int i = tid; i < G * D; i += kDecodeThreads) gO[i] = Element(NAN);
    return;
  }
  if (bad) RATT_COVER_ANY("position_past_rotary_table");
  const int64_t slot = pos % W1;
  Element* kc = static_cast<Element*>(p.k_cache);
  Element* vc = static_cast<Element*>(p.v_cache);
  Element* kc_slot = kc + ((b * W1 + slot) * Hkv + hk) * D;
  Element* vc_slot = vc + ((b * W1 + slot) * Hkv + hk) * D;
  const bool evict = pos >= W1;

  // ---- 1. the leaving token (read before step 2 overwrites its slot)
  if (evict) {
    RATT_COVER("evict");
    for (int i = tid; i < D; i += kDecodeThreads) {
      sKold[i] = float(kc_slot[i]);
      sVold[i] = float(vc_slot[i]);
    }
  }
  // raw queries of the group
  const Element* gQ = static_cast<const Element*>(p.q);
  for (int i = tid; i < G * D; i += kDecodeThreads) {
    const int64_t g = i / D, d = i % D;
    sQ[i] = float(gQ[b * p.q_bstride + (hk * G + g) * p.q_hstride + d]);
  }
  __syncthreads();
  // ---- 2. new k, v into the slot (raw; rotary is applied when read)
  {
    const Element* gK = static_cast<const Element*>(p.k) + b * p.k_bstride + hk * p.k_hstride;
    const Element* gV = static_cast<const Element*>(p.v) + b * p.v_bstride + hk * p.v_hstride;
    for (int i = tid; i < D; i += kDecodeThreads) {
      kc_slot[i] = gK[i];
      vc_slot[i] = gV[i];
    }
  }
  if (evict && warp == 0) warp_phi<D>(p.feature_map, sKold, sPhiK);
  for (int64_t g = warp; g < G; g += kDecodeWarps) warp_phi<D>(p.feature_map, sQ + g * D, sPhiQ + g * 2 * D);
  __syncthreads();  // phi done (reads raw sQ) before the rotation below; cache writes visible
  if (gCos == nullptr) RATT_COVER("no_rotary");
  if (gCos != nullptr && !bad) {
    RATT_COVER("rotary");
    const int d2 = D / 2;
    const float* c = gCos + pos * d2;
    const float* s = gSin + pos * d2;
    for (int i = tid; i < G * d2; i += kDecodeThreads) {
      const int64_t g = i / d2, j = i % d2;
      float* q = sQ + g * D;
      const float x1 = q[j], x2 = q[d2 + j];
      q[j] = x1 * c[j] - x2 * s[j];
      q[d2 + j] = x2 * c[j] + x1 * s[j];
    }
  }
  __syncthreads();

  // ---- 3. SWA over positions s0 .. pos. Lane owns pairs (i, i + D/2), i = lane*E2 + e.
  constexpr int E2 = D / 64;
  const int64_t s0 = imax(0, pos - p.window_size);
  const float scale = static_cast<float>(p.softmax_scale);
  for (int64_t g = 0; g < G; ++g) {
    const float* q = sQ + g * D;
    float qa[E2], qb[E2];
#pragma unroll
    for (int e = 0; e < E2; ++e) {
      qa[e] = q[lane * E2 + e];
      qb[e] = q[D / 2 + lane * E2 + e];
    }
    float m = -INFINITY, l = 0.f, acc_a[E2], acc_b[E2];
#pragma unroll
    for (int e = 0; e < E2; ++e) acc_a[e] = acc_b[e] = 0.f;
    if (!bad) {
      for (int64_t s = s0 + warp; s <= pos; s += kDecodeWarps) {
        const int64_t sl = s % W1;
        const Element* kr = kc + ((b * W1 + sl) * Hkv + hk) * D;
        const Element* vr = vc + ((b * W1 + sl) * Hkv + hk) * D;
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < E2; ++e) {
          const int i = lane * E2 + e;
          float k1 = float(kr[i]), k2 = float(kr[D / 2 + i]);
          if (gCos != nullptr) {
            const float c = gCos[s * (D / 2) + i], sn = gSin[s * (D / 2) + i];
            const float r1 = k1 * c - k2 * sn, r2 = k2 * c + k1 * sn;
            k1 = r1;
            k2 = r2;
          }
          dot += qa[e] * k1 + qb[e] * k2;
        }
        const float score = dec_warp_sum(dot) * scale;
        const float m_new = fmaxf(m, score);
        const float f = (m == -INFINITY) ? 0.f : __expf(m - m_new);
        const float pr = __expf(score - m_new);
        l = l * f + pr;
#pragma unroll
        for (int e = 0; e < E2; ++e) {
          const int i = lane * E2 + e;
          acc_a[e] = acc_a[e] * f + pr * float(vr[i]);
          acc_b[e] = acc_b[e] * f + pr * float(vr[D / 2 + i]);
        }
        m = m_new;
      }
    }
    // merge the warps' partial softmax states (fixed order)
    float* red = sRed + warp * (D + 2);
#pragma unroll
    for (int e = 0; e < E2; ++e) {
      red[lane * E2 + e] = acc_a[e];
      red[D / 2 + lane * E2 + e] = acc_b[e];
    }
    if (lane == 0) {
      red[D] = m;
      red[D + 1] = l;
    }
    __syncthreads();
    for (int d = tid; d < D; d += kDecodeThreads) {
      float mm = -INFINITY;
      for (int w = 0; w < kDecodeWarps; ++w) mm = fmaxf(mm, sRed[w * (D + 2) + D]);
      float ll = 0.f, o = 0.f;
      for (int w = 0; w < kDecodeWarps; ++w) {
        const float mw = sRed[w * (D + 2) + D];
        const float f = (mw == -INFINITY) ? 0.f : __expf(mw - mm);
        ll += sRed[w * (D + 2) + D + 1] * f;
        o += sRed[w * (D + 2) + d] * f;
      }
      sOs[g * D + d] = bad ? NAN : o / ll;
    }
    __syncthreads();
  }

  // ---- 1 + 4. one sweep over S: update (first head block only), read out for the heads.
  // Thread owns column d = tid % D and rows f = rg, rg + NR, ... (NR = threads / D groups).
  constexpr int NR = kDecodeThreads / D;
  static_assert(kDecodeThreads % D == 0, "columns tile the CTA");
  float* S = static_cast<float*>(p.state) + (b * Hkv + hk) * 2 * D * D;
  const float* gH0 = static_cast<const float*>(p.initial_state);
  const int d = tid % D, rg = tid / D;
  if (gH0 != nullptr) {
    RATT_COVER("h0");
  } else {
    RATT_COVER("no_h0");
  }
  for (int64_t g0 = 0; g0 < G; g0 += kHeadBlock) {
    const int ng = static_cast<int>(imin(kHeadBlock, G - g0));
    if (ng == kHeadBlock) RATT_COVER_ANY("full_head_block");
    if (G == 1) RATT_COVER_ANY("single_head_group");
    float acc[kHeadBlock];
#pragma unroll
    for (int j = 0; j < kHeadBlock; ++j) acc[j] = 0.f;
    for (int f = rg; f < 2 * D; f += NR) {
      float s = S[f * D + d];
      if (g0 == 0 && evict) {
        s += sPhiK[f] * sVold[d];
        S[f * D + d] = s;
      }
#pragma unroll
      for (int j = 0; j < kHeadBlock; ++j) {
        if (j < ng) {
          const int64_t h = hk * G + g0 + j;
          float x = s;
          if (gH0 != nullptr) x += gH0[b * p.initial_state_bstride + (h * 2 * D + f) * D + d];
          acc[j] += sPhiQ[(g0 + j) * 2 * D + f] * x;
        }
      }
    }
    // reduce the NR row groups through sRed (fixed order)
    // (unrolled with a uniform guard: acc[] must stay in registers, not local memory)
#pragma unroll
    for (int j = 0; j < kHeadBlock; ++j) {
      if (j >= ng) break;
      sRed[rg * D + d] = acc[j];
      __syncthreads();
      if (rg == 0) {
        float o = 0.f;
        for (int r = 0; r < NR; ++r) o += sRed[r * D + d];
        sOr[(g0 + j) * D + d] = o;
      }
      __syncthreads();
    }
  }

  // ---- 5. mixing, one warp per head
  const float eps = static_cast<float>(p.eps);
  const float* ga = static_cast<const float*>(p.swa_weight);
  const float* gb = static_cast<const float*>(p.rla_weight);
  constexpr int E = D / 32;
  for (int64_t g = warp; g < G; g += kDecodeWarps) {
    const int64_t h = hk * G + g;
    float a[E], r[E], ssa = 0.f, ssr = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      a[e] = sOs[g * D + lane * E + e];
      r[e] = sOr[g * D + lane * E + e];
      ssa += a[e] * a[e];
      ssr += r[e] * r[e];
    }
    const float ia = rsqrtf(dec_warp_sum(ssa) / D + eps), ir = rsqrtf(dec_warp_sum(ssr) / D + eps);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int i = lane * E + e;
      const float o = a[e] * ia * ga[h * D + i] + r[e] * ir * gb[h * D + i];
      gO[g * D + i] = Element(bad ? NAN : o);
    }
  }
}

__global__ void decode_pos_kernel(int64_t* pos, int64_t batch) {
  RATT_COVER("run");
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < batch && pos[b] >= 0) pos[b] += 1;
}

template <typename Element, int D>
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  const DecodePlan plan = decode_plan(p);
  auto kernel = &decode_step_kernel<Element, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(plan.step.smem_bytes));
  if (err != cudaSuccess) return err;
  RATT_LAUNCH_PLANNED(plan.step, stream, kernel)(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  RATT_LAUNCH_PLANNED(plan.pos, stream, decode_pos_kernel)(p.pos, p.batch);
  return cudaGetLastError();
}

template <typename Element>
cudaError_t dispatch_head_dim(const DecodeParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_decode<Element, 64>(p, stream);
    case 128: return launch_decode<Element, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace decode_impl
using namespace decode_impl;

int64_t decode_smem_bytes(const DecodeParams& p) {
  return p.head_dim == 64 || p.head_dim == 128 ? decode_plan(p).step.smem_bytes : 0;
}

cudaError_t decode_step(const DecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads_kv == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kBFloat16: return dispatch_head_dim<cutlass::bfloat16_t>(p, stream);
    case DType::kFloat16: return dispatch_head_dim<cutlass::half_t>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace rattention::cuda
