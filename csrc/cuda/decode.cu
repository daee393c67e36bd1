// One decode step of RAttention on CUDA (SPEC.md "Decoding"), same semantics as the CPU
// decode (csrc/cpu/decode.cpp). Memory-bound: per step the ring of w + 1 keys/values and the
// fp32 state [2D, D] of every (sequence b, kv head) are read once. Flash-decoding: the work of
// one (b, kv head) is split over `splits` CTAs (decode_plan.h chooses the count from the ring
// length and a target CTA count), then a combine kernel merges them.
//
// decode_split_kernel, CTA (b, kv head, split j), at p = pos[b], ring slot(s) = s mod (w + 1):
//   1. p >= w + 1: the token p - w - 1 leaves the window (ring slot(p)); every split reads
//      that old row (k whole for phi(k), v at its own state columns). No split writes the
//      ring: the new k, v enter it in the combine kernel, after every split has read it;
//   2. SWA partial over the split's range of window positions (the newest, p, read from the
//      new k, v): key tiles of 32 brought in by cp.async in two stages (tile i + 1 in
//      flight while tile i is used; keys and values as separate groups, so the values land
//      while the keys are rotated), rotary applied once per tile
//      into fp32, then one warp per query head scores the tile (a lane per key), updates its
//      running max / sum and accumulates P V. The unnormalised o, max and sum of each of the
//      G query heads go to the workspace;
//   3. RLA over the split's own state columns: S += phi(k_old) v_old^T for those columns and
//      o_rla = phi(q)^T (S + H0_h) for them, in one sweep (float4 of columns per thread,
//      rows spread over the CTA, up to 8 heads per sweep). Columns are owned, so no sum
//      crosses CTAs.
// decode_combine_kernel, CTA (b, kv head): merges the splits' partials by log-sum-exp in a
// fixed order (deterministic), applies the rms mixing, writes out, writes the new k, v into
// slot(p), and its kv head 0 advances pos[b]: it reads the position the splits saw from the
// workspace, never pos itself, so no CTA can see the new position early (stream order puts
// every split CTA before it). No CTA waits on another.
// A negative position, or a position past the rotary table, writes NaN for that sequence's
// outputs instead of reading out of bounds (the negative case leaves the cache untouched).
#include <cute/arch/copy_sm80.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/half.h>

#include <cmath>
#include <cstdint>

#include "core/rms_mix.h"
#include "core/window.h"
#include "cuda/launch.cuh"
#include "decode_launch.h"
#include "decode_plan.h"

namespace rattention::cuda {
// Named (not anonymous) so the kernel names stay readable in tools/cuda_check.py.
namespace decode_impl {

using cute::cp_async_fence;  // unqualified, as tools/emu/mutants.py finds the waits
using cute::cp_async_wait;

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
    // by select, so that NaN maps to NaN in both halves (fmaxf(NaN, 0) would be 0)
#pragma unroll
    for (int e = 0; e < E; ++e) {
      y[lane * E + e] = v[e] <= 0.f ? 0.f : v[e];
      y[D + lane * E + e] = v[e] >= 0.f ? 0.f : -v[e];
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

// 16-byte global -> shared copy (cp.async, lands at the wait of its group) or, when the
// row is not 16-byte aligned, a plain copy of its 8 elements.
template <typename Element>
__device__ __forceinline__ void copy16(const Element* src, Element* dst, bool async16) {
  if (async16) {
    cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>::copy(
        *reinterpret_cast<const cute::uint128_t*>(src), *reinterpret_cast<cute::uint128_t*>(dst));
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[e] = src[e];
  }
}

__device__ __forceinline__ bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

// Four consecutive floats, as one float4 access when `vec` (16-byte aligned rows).
__device__ __forceinline__ float4 load4(const float* ptr, bool vec) {
  if (vec) return *reinterpret_cast<const float4*>(ptr);
  return make_float4(ptr[0], ptr[1], ptr[2], ptr[3]);
}
__device__ __forceinline__ void store4(float* ptr, float4 x, bool vec) {
  if (vec) {
    *reinterpret_cast<float4*>(ptr) = x;
  } else {
    ptr[0] = x.x;
    ptr[1] = x.y;
    ptr[2] = x.z;
    ptr[3] = x.w;
  }
}

// The rows of ring positions t0 .. t0 + nk - 1 of one kv head into a shared tile [nk, D]:
// the newest position p comes from the new token (its ring slot still holds the old row).
template <typename Element, int D>
__device__ void load_tile(Element* tile, const Element* cache, const Element* fresh, int64_t t0,
                          int nk, int64_t pos, int64_t row0, int64_t W1, int64_t Hkv,
                          bool async16) {
  constexpr int kChunks = D / 8;  // 16-byte pieces of a row
  for (int i = threadIdx.x; i < nk * kChunks; i += kDecodeThreads) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const int64_t s = t0 + r;
    const Element* src = s == pos ? fresh : cache + ((row0 + s % W1) * Hkv) * D;
    copy16(src + c, tile + r * D + c, async16);
  }
}

// Dynamic shared memory: decode_smem_layout (decode_plan.h) has the carving.
template <typename Element, int D>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_split_kernel(const DecodeParams p, const DecodeSplit sp, const DecodeSmem L,
                        const DecodeWorkspace wl, float* ws) {
  RATT_DYNAMIC_SMEM(float, smem);
  constexpr int KT = kDecodeKeyTile;
  constexpr int KF = D + 4;  // padded row of sKf
  const int64_t Hq = p.heads_q, Hkv = p.heads_kv, G = Hq / Hkv;
  const int64_t bh = blockIdx.x, b = bh / Hkv, hk = bh % Hkv;
  const int split = blockIdx.y;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  float* sQ = smem + L.q;
  float* sPhiQ = smem + L.phi_q;
  float* sO = smem + L.o;
  float* sM = smem + L.m;
  float* sL = smem + L.l;
  float* sKold = smem + L.k_old;
  float* sPhiK = smem + L.phi_k;
  float* sVold = smem + L.v_old;
  float* sKf = smem + L.kf;
  Element* sKt = reinterpret_cast<Element*>(smem + L.k_tile);
  Element* sVt = reinterpret_cast<Element*>(smem + L.v_tile);
  float* sRed = smem + L.red;  // the tile region, reused after the key tiles

  const int64_t pos = p.pos[b];
  if (split == 0 && hk == 0 && tid == 0) reinterpret_cast<int64_t*>(ws + wl.pos)[b] = pos;
  if (pos < 0) {
    RATT_COVER_ANY("negative_position");
    return;  // the combine kernel writes the NaN outputs
  }
  const int64_t W1 = p.window_size + 1;
  const float* gCos = static_cast<const float*>(p.rotary_cos);
  const float* gSin = static_cast<const float*>(p.rotary_sin);
  const bool bad = gCos != nullptr && pos >= p.rotary_positions;
  if (bad) RATT_COVER_ANY("position_past_rotary_table");
  const bool evict = pos >= W1;
  const int nc = static_cast<int>(sp.columns);
  const int64_t c0 = split * sp.columns;
  const Element* kc = static_cast<const Element*>(p.k_cache);
  const Element* vc = static_cast<const Element*>(p.v_cache);
  const int64_t row0 = b * W1;  // ring rows of sequence b
  const Element* kc_head = kc + hk * D;
  const Element* vc_head = vc + hk * D;
  const Element* gK = static_cast<const Element*>(p.k) + b * p.k_bstride + hk * p.k_hstride;
  const Element* gV = static_cast<const Element*>(p.v) + b * p.v_bstride + hk * p.v_hstride;

  // ---- 1. the leaving token (its slot is rewritten only by the combine kernel)
  if (evict) {
    RATT_COVER("evict");
    const int64_t slot = pos % W1;
    const Element* ko = kc_head + (row0 + slot) * Hkv * D;
    const Element* vo = vc_head + (row0 + slot) * Hkv * D;
    for (int i = tid; i < D; i += kDecodeThreads) sKold[i] = float(ko[i]);
    for (int i = tid; i < nc; i += kDecodeThreads) sVold[i] = float(vo[c0 + i]);
  }
  // raw queries of the group, the SWA state of every head started
  const Element* gQ = static_cast<const Element*>(p.q);
  for (int i = tid; i < G * D; i += kDecodeThreads) {
    const int64_t g = i / D, d = i % D;
    sQ[i] = float(gQ[b * p.q_bstride + (hk * G + g) * p.q_hstride + d]);
    sO[i] = 0.f;
  }
  for (int i = tid; i < G; i += kDecodeThreads) {
    sM[i] = -INFINITY;
    sL[i] = 0.f;
  }
  __syncthreads();  // raw sQ, sKold and the SWA state complete before the warps use them
  // phi of the G raw queries, and of k_old as item G (one warp per row)
  for (int64_t g = warp; g < G + (evict ? 1 : 0); g += kDecodeWarps) {
    const bool key = g == G;
    warp_phi<D>(p.feature_map, key ? sKold : sQ + g * D, key ? sPhiK : sPhiQ + g * 2 * D);
  }
  __syncthreads();  // phi done (reads raw sQ) before the rotation below overwrites it
  if (gCos == nullptr) RATT_COVER("no_rotary");
  if (gCos != nullptr && !bad) {
    RATT_COVER("rotary");
    constexpr int d2 = D / 2;
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
  // (the first key tile's barrier orders the rotation before the scores)

  // ---- 2. SWA partial over window positions [k0, k1) of this split
  constexpr int E = D / 32;  // elements of a D-row per lane
  const int64_t s0 = imax(0, pos - p.window_size);
  const int64_t k0 = s0 + split * sp.keys, k1 = imin(pos + 1, k0 + sp.keys);
  const float scale = static_cast<float>(p.softmax_scale);
  const bool async16 = aligned16(kc) && aligned16(vc) && aligned16(gK) && aligned16(gV);
  if (!async16) RATT_COVER_ANY("unaligned_rows");
  if (k0 >= k1 && !bad) RATT_COVER_ANY("empty_split");
  // Two stages: tile i sits in buffer i % 2, and tile i + 1's copies are in flight while tile
  // i is used. Every iteration commits two groups (keys, values; empty past the last tile),
  // so the waits count the same groups on every thread and iteration.
  const int64_t ntiles = bad ? 0 : ceil_div(imax(0, k1 - k0), KT);
  constexpr int kTileElems = KT * D;
  auto issue = [&](int64_t i) {
    const int64_t t0 = k0 + i * KT;
    const int nk = i < ntiles ? static_cast<int>(imin(KT, k1 - t0)) : 0;
    load_tile<Element, D>(sKt + (i % 2) * kTileElems, kc_head, gK, t0, nk, pos, row0, W1, Hkv, async16);
    cp_async_fence();
    load_tile<Element, D>(sVt + (i % 2) * kTileElems, vc_head, gV, t0, nk, pos, row0, W1, Hkv, async16);
    cp_async_fence();
  };
  if (ntiles > 0) issue(0);
  for (int64_t i = 0; i < ntiles; ++i) {
    RATT_COVER("key_tile");
    if (i + 1 < ntiles) RATT_COVER_ANY("prefetched_tile");
    const int64_t t0 = k0 + i * KT;
    const int nk = static_cast<int>(imin(KT, k1 - t0));
    const Element* kt = sKt + (i % 2) * kTileElems;
    const Element* vt = sVt + (i % 2) * kTileElems;
    issue(i + 1);
    cp_async_wait<3>();  // this thread's copies of keys i landed (values i, tile i + 1 in flight)
    __syncthreads();           // every key copy of tile i (and the rotated sQ) visible
    // rotary once per tile, into fp32: item = 4 rotary pairs (i, i + D/2) of one row
    constexpr int d2 = D / 2, kQuads = d2 / 4;
    for (int it = tid; it < nk * kQuads; it += kDecodeThreads) {
      const int r = it / kQuads, j = (it % kQuads) * 4;
      const int64_t s = t0 + r;
      float* kf = sKf + r * KF;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x1 = float(kt[r * D + j + e]), x2 = float(kt[r * D + d2 + j + e]);
        if (gCos != nullptr) {
          const float c = gCos[s * d2 + j + e], sn = gSin[s * d2 + j + e];
          kf[j + e] = x1 * c - x2 * sn;
          kf[d2 + j + e] = x2 * c + x1 * sn;
        } else {
          kf[j + e] = x1;
          kf[d2 + j + e] = x2;
        }
      }
    }
    cp_async_wait<2>();  // this thread's copies of values i landed (tile i + 1 in flight)
    __syncthreads();           // sKf and every value copy of tile i visible to the head warps
    for (int64_t g = warp; g < G; g += kDecodeWarps) {
      float sc = -INFINITY;
      if (lane < nk) {
        const float* q = sQ + g * D;
        const float* k = sKf + lane * KF;
        float dot = 0.f;
#pragma unroll
        for (int d = 0; d < D; d += 4) {
          const float4 a = *reinterpret_cast<const float4*>(q + d);
          const float4 c = *reinterpret_cast<const float4*>(k + d);
          dot += a.x * c.x + a.y * c.y + a.z * c.z + a.w * c.w;
        }
        sc = dot * scale;
      }
      const float m_old = sM[g], l_old = sL[g];
      const float m_new = fmaxf(m_old, dec_warp_max(sc));
      const float f = (m_old == -INFINITY) ? 0.f : __expf(m_old - m_new);
      const float pr = lane < nk ? __expf(sc - m_new) : 0.f;
      const float l_new = l_old * f + dec_warp_sum(pr);
      float acc[E];
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = sO[g * D + lane * E + e] * f;
      for (int r = 0; r < nk; ++r) {
        const float pk = __shfl_sync(0xffffffffu, pr, r);
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] += pk * float(vt[r * D + lane * E + e]);
      }
#pragma unroll
      for (int e = 0; e < E; ++e) sO[g * D + lane * E + e] = acc[e];
      if (lane == 0) {
        sM[g] = m_new;
        sL[g] = l_new;
      }
    }
    __syncthreads();  // tile i and sKf read before tile i + 2's copies, the next rotation or sRed overwrite them
  }  // outstanding past the loop: only the empty groups issued for tile ntiles
  if (!bad) {
    float* part = ws + wl.swa + (bh * sp.splits + split) * G * (D + 2);
    for (int64_t g = warp; g < G; g += kDecodeWarps) {
#pragma unroll
      for (int e = 0; e < E; ++e) part[g * (D + 2) + lane * E + e] = sO[g * D + lane * E + e];
      if (lane == 0) {
        part[g * (D + 2) + D] = sM[g];
        part[g * (D + 2) + D + 1] = sL[g];
      }
    }
  }

  // ---- 3. RLA over columns c0 .. c0 + nc: one sweep over S per block of up to 8 heads, the
  // update in the first. Thread owns the float4 of columns cv and rows f = rg, rg + NR, ...
  const int ncv = nc / kDecodeColumnVec, NR = kDecodeThreads / ncv;
  const int cv = tid % ncv, rg = tid / ncv;
  float* S = static_cast<float*>(p.state) + (b * Hkv + hk) * 2 * D * D + c0 + cv * 4;
  const float* gH0 = static_cast<const float*>(p.initial_state);
  const bool vec = aligned16(S) && (gH0 == nullptr || (aligned16(gH0) && p.initial_state_bstride % 4 == 0));
  if (!vec) RATT_COVER_ANY("unaligned_state");
  if (gH0 != nullptr) {
    RATT_COVER("h0");
  } else {
    RATT_COVER("no_h0");
  }
  const float4 vold = evict ? make_float4(sVold[cv * 4], sVold[cv * 4 + 1], sVold[cv * 4 + 2], sVold[cv * 4 + 3])
                            : make_float4(0.f, 0.f, 0.f, 0.f);
  float* rla = ws + wl.rla + bh * G * D + c0;
  for (int64_t g0 = 0; g0 < G; g0 += kDecodeHeadBlock) {
    const int ng = static_cast<int>(imin(kDecodeHeadBlock, G - g0));
    if (ng == kDecodeHeadBlock) RATT_COVER_ANY("full_head_block");
    if (G == 1) RATT_COVER_ANY("single_head_group");
    float acc[kDecodeHeadBlock][4];
#pragma unroll
    for (int j = 0; j < kDecodeHeadBlock; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    for (int f = rg; f < 2 * D; f += NR) {
      float4 s = load4(S + f * D, vec);
      if (g0 == 0 && evict) {
        const float pk = sPhiK[f];
        s.x += pk * vold.x;
        s.y += pk * vold.y;
        s.z += pk * vold.z;
        s.w += pk * vold.w;
        store4(S + f * D, s, vec);
      }
#pragma unroll
      for (int j = 0; j < kDecodeHeadBlock; ++j) {
        if (j < ng) {
          const int64_t h = hk * G + g0 + j;
          float4 x = s;
          if (gH0 != nullptr) {
            const float4 h0 = load4(gH0 + b * p.initial_state_bstride + (h * 2 * D + f) * D + c0 + cv * 4, vec);
            x.x += h0.x;
            x.y += h0.y;
            x.z += h0.z;
            x.w += h0.w;
          }
          const float pq = sPhiQ[(g0 + j) * 2 * D + f];
          acc[j][0] += pq * x.x;
          acc[j][1] += pq * x.y;
          acc[j][2] += pq * x.z;
          acc[j][3] += pq * x.w;
        }
      }
    }
    // lanes of a warp that share cv hold other rows: fold them (fixed order), then the
    // warps' partials through sRed
#pragma unroll
    for (int j = 0; j < kDecodeHeadBlock; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        for (int o = 16; o >= ncv; o >>= 1) acc[j][e] += __shfl_xor_sync(0xffffffffu, acc[j][e], o);
      }
    }
    if (lane < ncv) {
#pragma unroll
      for (int j = 0; j < kDecodeHeadBlock; ++j) {
        if (j < ng) {
#pragma unroll
          for (int e = 0; e < 4; ++e) sRed[(warp * kDecodeHeadBlock + j) * nc + cv * 4 + e] = acc[j][e];
        }
      }
    }
    __syncthreads();  // every warp's partials in sRed
    for (int it = tid; it < ng * nc; it += kDecodeThreads) {
      const int j = it / nc, c = it % nc;
      float o = 0.f;
      for (int w = 0; w < kDecodeWarps; ++w) o += sRed[(w * kDecodeHeadBlock + j) * nc + c];
      rla[(g0 + j) * D + c] = o;
    }
    __syncthreads();  // sRed read before the next head block overwrites it
  }
}

// Dynamic shared memory: none (a warp per query head, everything in registers). The minimum
// of one CTA per SM lets ptxas use more than 32 registers on sm_90a, where it otherwise spills.
template <typename Element, int D>
__global__ void __launch_bounds__(kDecodeThreads, 1)
    decode_combine_kernel(const DecodeParams p, const DecodeSplit sp, const DecodeWorkspace wl,
                          const float* ws) {
  const int64_t Hq = p.heads_q, Hkv = p.heads_kv, G = Hq / Hkv;
  const int64_t bh = blockIdx.x, b = bh / Hkv, hk = bh % Hkv;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t pos = reinterpret_cast<const int64_t*>(ws + wl.pos)[b];  // what the splits saw
  Element* gO = static_cast<Element*>(p.out) + (b * Hq + hk * G) * D;  // [G, D] of this CTA
  RATT_COVER("run");
  if (pos < 0) {
    for (int i = tid; i < G * D; i += kDecodeThreads) gO[i] = Element(NAN);
    return;
  }
  const int64_t W1 = p.window_size + 1, slot = pos % W1;
  const bool bad = p.rotary_cos != nullptr && pos >= p.rotary_positions;
  // the new k, v into slot(p): every split CTA, which read the old row, ran before this kernel
  {
    const Element* gK = static_cast<const Element*>(p.k) + b * p.k_bstride + hk * p.k_hstride;
    const Element* gV = static_cast<const Element*>(p.v) + b * p.v_bstride + hk * p.v_hstride;
    Element* kc_slot = static_cast<Element*>(p.k_cache) + ((b * W1 + slot) * Hkv + hk) * D;
    Element* vc_slot = static_cast<Element*>(p.v_cache) + ((b * W1 + slot) * Hkv + hk) * D;
    for (int i = tid; i < D; i += kDecodeThreads) {
      kc_slot[i] = gK[i];
      vc_slot[i] = gV[i];
    }
  }
  if (hk == 0 && tid == 0) p.pos[b] = pos + 1;  // no CTA reads pos after the splits

  const int splits = static_cast<int>(sp.splits);
  const float eps = static_cast<float>(p.eps);
  const float* ga = static_cast<const float*>(p.swa_weight);
  const float* gb = static_cast<const float*>(p.rla_weight);
  constexpr int E = D / 32;
  const int64_t part_stride = G * (D + 2);  // between the splits of one head
  for (int64_t g = warp; g < G; g += kDecodeWarps) {
    const int64_t h = hk * G + g;
    float a[E], r[E], ssa = 0.f, ssr = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) a[e] = 0.f;
    if (!bad) {
      // lane j holds split j's max and sum (splits <= 32, decode_plan.h)
      const float* part = ws + wl.swa + bh * splits * part_stride + g * (D + 2);
      const float mj = lane < splits ? part[lane * part_stride + D] : -INFINITY;
      const float lj = lane < splits ? part[lane * part_stride + D + 1] : 0.f;
      const float mm = dec_warp_max(mj);
      const float wj = lane < splits && mj != -INFINITY ? __expf(mj - mm) : 0.f;
      const float ll = dec_warp_sum(lj * wj);
      for (int j = 0; j < splits; ++j) {
        const float w = __shfl_sync(0xffffffffu, wj, j);
#pragma unroll
        for (int e = 0; e < E; ++e) a[e] += w * part[j * part_stride + lane * E + e];
      }
#pragma unroll
      for (int e = 0; e < E; ++e) a[e] /= ll;
    }
    const float* o_rla = ws + wl.rla + (bh * G + g) * D;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      r[e] = o_rla[lane * E + e];
      ssa += a[e] * a[e];
      ssr += r[e] * r[e];
    }
    ssa = dec_warp_sum(ssa);
    ssr = dec_warp_sum(ssr);
    const float ia = rsqrtf(ssa / D + eps), ir = rsqrtf(ssr / D + eps);
    // a branch row with an Inf or NaN makes the whole row NaN (rms_factor's rule, here as a
    // predicate)
    const bool row_bad = bad || !rms_row_finite(ssa) || !rms_row_finite(ssr);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int i = lane * E + e;
      const float o = a[e] * ia * ga[h * D + i] + r[e] * ir * gb[h * D + i];
      gO[g * D + i] = Element(row_bad ? NAN : o);
    }
  }
}

template <typename Element, int D>
cudaError_t launch_decode(const DecodeParams& p, void* workspace, cudaStream_t stream) {
  const DecodePlan plan = decode_plan(p);
  const int64_t G = p.heads_q / p.heads_kv;
  const DecodeSmem smem = decode_smem_layout(D, G, plan.shape.columns);
  const DecodeWorkspace wl = decode_workspace_layout(p, plan.shape);
  float* ws = static_cast<float*>(workspace);
  auto split = &decode_split_kernel<Element, D>;
  cudaError_t err = cudaFuncSetAttribute(split, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(plan.split.smem_bytes));
  if (err != cudaSuccess) return err;
  RATT_LAUNCH_PLANNED(plan.split, stream, split)(p, plan.shape, smem, wl, ws);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  auto combine = &decode_combine_kernel<Element, D>;
  RATT_LAUNCH_PLANNED(plan.combine, stream, combine)(p, plan.shape, wl, ws);
  return cudaGetLastError();
}

template <typename Element>
cudaError_t dispatch_head_dim(const DecodeParams& p, void* workspace, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_decode<Element, 64>(p, workspace, stream);
    case 128: return launch_decode<Element, 128>(p, workspace, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace decode_impl
using namespace decode_impl;

int64_t decode_smem_bytes(const DecodeParams& p) {
  return p.head_dim == 64 || p.head_dim == 128 ? decode_plan(p).split.smem_bytes : 0;
}

int64_t decode_workspace_bytes(const DecodeParams& p) {
  return p.batch == 0 || p.heads_kv == 0 ? 0 : decode_plan(p).workspace_bytes;
}

cudaError_t decode_step(const DecodeParams& p, void* workspace, cudaStream_t stream) {
  if (p.batch == 0 || p.heads_kv == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kBFloat16: return dispatch_head_dim<cutlass::bfloat16_t>(p, workspace, stream);
    case DType::kFloat16: return dispatch_head_dim<cutlass::half_t>(p, workspace, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace rattention::cuda
