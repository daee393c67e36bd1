// SWA forward, flash-attention-2 structure on CuTe (sm_80 MMA atoms; also runs on sm_90).
//
// Grid (ceil(T / kBlockM), Hq, B); one CTA per query tile of one head. Query head h reads
// kv head h / G. The CTA visits only the key tiles inside the window
// (swa_key_tiles_for_query_tile), right to left, in three phases:
//   1. right edge: tiles with keys after the tile's first query (causal mask, masked)
//   2. interior: every key visible to every query (no mask unless the tail is ragged)
//   3. left edge: tiles holding keys older than the window of the tile's last query (masked)
// K for tile n-1 is loaded (cp.async) while tile n's P V runs; V while Q K^T runs.
// Rotary (half-split) is applied to Q once and to each K tile in smem after it lands.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include <cmath>

#include "core/params.h"
#include "core/window.h"
#include "cuda/swa_traits.cuh"

namespace rattention {
namespace cuda {

using namespace cute;

// acc ((2,2),MMA_M,MMA_N) -> (rows=(2,MMA_M), cols=(2,MMA_N)) for SM80 16x8 C fragments.
template <class Layout>
__forceinline__ __device__ auto acc_rowcol(Layout acc_layout) {
  static_assert(decltype(size<0>(acc_layout))::value == 4);
  static_assert(decltype(rank(acc_layout))::value == 3);
  auto l = logical_divide(acc_layout, Shape<_2>{});  // ((2,2),MMA_M,MMA_N)
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// acc ((2,2),MMA_M,MMA_N) -> A-operand ((2,2,2),MMA_M,MMA_N/2): two 16x8 C tiles make one
// 16x16 A tile, so P goes from the S accumulator straight into the P V MMA.
template <class Layout>
__forceinline__ __device__ auto acc_to_a_regs(Layout acc_layout) {
  static_assert(decltype(size<0>(acc_layout))::value == 4);
  auto l = logical_divide(acc_layout, Shape<Underscore, Underscore, _2>{});
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

template <typename To, typename Engine, typename Layout>
__forceinline__ __device__ auto convert_type(const Tensor<Engine, Layout>& t) {
  using From = typename Engine::value_type;
  constexpr int N = decltype(size(t))::value;
  cutlass::NumericArrayConverter<To, From, N> conv;
  auto frag = conv(*reinterpret_cast<const cutlass::Array<From, N>*>(t.data()));
  return make_tensor(make_rmem_ptr<To>(&frag), t.layout());
}

// C += A B with both operands from smem; the next k slice is loaded (ldmatrix) while the
// current one multiplies.
template <class Acc, class TA, class TB, class SA, class SB, class Mma, class CA, class CB,
          class TCA, class TCB>
__forceinline__ __device__ void gemm_ss(Acc& acc, TA& tCrA, TB& tCrB, SA const& tCsA,
                                        SB const& tCsB, Mma& mma, CA const& copy_a,
                                        CB const& copy_b, TCA const& thr_copy_a,
                                        TCB const& thr_copy_b) {
  Tensor tCrA_view = thr_copy_a.retile_D(tCrA);
  Tensor tCrB_view = thr_copy_b.retile_D(tCrB);
  copy(copy_a, tCsA(_, _, _0{}), tCrA_view(_, _, _0{}));
  copy(copy_b, tCsB(_, _, _0{}), tCrB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(tCrA); ++i) {
    if (i < size<2>(tCrA) - 1) {
      copy(copy_a, tCsA(_, _, i + 1), tCrA_view(_, _, i + 1));
      copy(copy_b, tCsB(_, _, i + 1), tCrB_view(_, _, i + 1));
    }
    gemm(mma, tCrA(_, _, i), tCrB(_, _, i), acc);
  }
}

// C += A B with A in registers (P), B from smem.
template <class Acc, class TA, class TB, class SB, class Mma, class CB, class TCB>
__forceinline__ __device__ void gemm_rs(Acc& acc, TA const& tCrA, TB& tCrB, SB const& tCsB,
                                        Mma& mma, CB const& copy_b, TCB const& thr_copy_b) {
  Tensor tCrB_view = thr_copy_b.retile_D(tCrB);
  copy(copy_b, tCsB(_, _, _0{}), tCrB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(tCrA); ++i) {
    if (i < size<2>(tCrA) - 1) copy(copy_b, tCsB(_, _, i + 1), tCrB_view(_, _, i + 1));
    gemm(mma, tCrA(_, _, i), tCrB(_, _, i), acc);
  }
}

// Predicated tile copy gmem -> smem: rows >= max_row are zero-filled (never read past T).
template <class TiledCopy, class S, class D, class C>
__forceinline__ __device__ void copy_rows_pred(TiledCopy const& tiled_copy, S const& tS, D& tD,
                                               C const& tC, int max_row) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tS); ++m) {
    if (get<0>(tC(0, m, 0)) < max_row) {
      copy(tiled_copy, tS(_, m, _), tD(_, m, _));
    } else {
      clear(tD(_, m, _));
    }
  }
}

// Half-split rotary on a [rows, D] smem tile in place: row r is token row0 + r. Float32
// math, one rounding to Element (as a bf16 PyTorch rope would round).
template <int kRows, int kHeadDim, int kNThreads, class STensor>
__forceinline__ __device__ void rotary_smem(STensor& sX, const float* cos, const float* sin,
                                            int64_t row0, int64_t T, bool inverse) {
  using Element = typename STensor::value_type;
  constexpr int kHalf = kHeadDim / 2;
  for (int idx = threadIdx.x; idx < kRows * kHalf; idx += kNThreads) {
    const int r = idx / kHalf, i = idx % kHalf;
    const int64_t t = row0 + r;
    if (t >= T) continue;
    const float c = cos[t * kHalf + i];
    const float s = inverse ? -sin[t * kHalf + i] : sin[t * kHalf + i];
    const float x1 = static_cast<float>(sX(r, i)), x2 = static_cast<float>(sX(r, i + kHalf));
    sX(r, i) = Element(x1 * c - x2 * s);
    sX(r, i + kHalf) = Element(x2 * c + x1 * s);
  }
}

template <typename Traits, typename Smem = DynSmem<Traits::kSmemSize>>
__global__ void __launch_bounds__(Traits::kNThreads)
    swa_fwd_kernel(const __grid_constant__ SwaFwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;
  extern __shared__ __align__(128) char smem_[];

  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x;
  const int64_t T = p.dims.seqlen, W = p.window_size;
  const int hk = h / static_cast<int>(p.dims.heads_q / p.dims.heads_kv);
  const int64_t m0 = int64_t(m_block) * kBlockM;
  const TileRange tiles = swa_key_tiles_for_query_tile(m_block, kBlockM, kBlockN, T, W);
  const int n_begin = static_cast<int>(tiles.begin), n_end = static_cast<int>(tiles.end);

  // gQ: [T, D] of (b, h); gK/gV: [T, D] of (b, hk). Rows are contiguous (stride_d == 1).
  const Element* q_ptr = static_cast<const Element*>(p.q) + b * p.q_stride.b + h * p.q_stride.h;
  const Element* k_ptr = static_cast<const Element*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h;
  const Element* v_ptr = static_cast<const Element*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h;
  Tensor mQ = make_tensor(make_gmem_ptr(q_ptr), make_shape(T, Int<kHeadDim>{}),
                          make_stride(p.q_stride.t, _1{}));
  Tensor mK = make_tensor(make_gmem_ptr(k_ptr), make_shape(T, Int<kHeadDim>{}),
                          make_stride(p.k_stride.t, _1{}));
  Tensor mV = make_tensor(make_gmem_ptr(v_ptr), make_shape(T, Int<kHeadDim>{}),
                          make_stride(p.v_stride.t, _1{}));
  Tensor gQ = local_tile(mQ, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));  // (N,D,n)
  Tensor gV = local_tile(mV, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem_)),
                          typename Traits::SmemLayoutQ{});  // (M, D)
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});  // (N, D)
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});  // (D, N)
  Tensor sVtNoSwizzle = make_tensor(sV.data(), typename Traits::SmemLayoutVtNoSwizzle{});

  typename Traits::GmemTiledCopyQKV gmem_tiled_copy;
  auto gmem_thr_copy = gmem_tiled_copy.get_thread_slice(tid);
  Tensor tQgQ = gmem_thr_copy.partition_S(gQ);
  Tensor tQsQ = gmem_thr_copy.partition_D(sQ);
  Tensor tKgK = gmem_thr_copy.partition_S(gK);  // (CPY, CPY_N, CPY_D, n)
  Tensor tKsK = gmem_thr_copy.partition_D(sK);
  Tensor tVgV = gmem_thr_copy.partition_S(gV);
  Tensor tVsV = gmem_thr_copy.partition_D(sV);
  // Row coordinates of each thread's copies, for the ragged-T predicate.
  Tensor cQ = make_identity_tensor(make_shape(Int<kBlockM>{}, Int<kHeadDim>{}));
  Tensor cKV = make_identity_tensor(make_shape(Int<kBlockN>{}, Int<kHeadDim>{}));
  Tensor tQcQ = gmem_thr_copy.partition_S(cQ);
  Tensor tKVcKV = gmem_thr_copy.partition_S(cKV);

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);             // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_mma.partition_fragment_B(sK);             // (MMA, MMA_N, MMA_K)
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);  // (MMA, MMA_D, MMA_K)
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_o);

  auto smem_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_copy_q = smem_copy_q.get_thread_slice(tid);
  Tensor tSsQ = smem_thr_copy_q.partition_S(sQ);
  auto smem_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_copy_k = smem_copy_k.get_thread_slice(tid);
  Tensor tSsK = smem_thr_copy_k.partition_S(sK);
  auto smem_copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  auto smem_thr_copy_v = smem_copy_v.get_thread_slice(tid);
  Tensor tOsVt = smem_thr_copy_v.partition_S(sVt);

  // Element coordinates (row, col) of this thread's S accumulator entries.
  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_mma.partition_C(cS);

  const int q_rows = static_cast<int>(imin(kBlockM, T - m0));
  const bool rotary = p.rotary_cos != nullptr;
  const float* rcos = static_cast<const float*>(p.rotary_cos);
  const float* rsin = static_cast<const float*>(p.rotary_sin);

  // Prologue: Q and the first (rightmost) K tile in flight together.
  copy_rows_pred(gmem_tiled_copy, tQgQ, tQsQ, tQcQ, q_rows);
  {
    const int n = n_end - 1;
    copy_rows_pred(gmem_tiled_copy, tKgK(_, _, _, n), tKsK, tKVcKV,
                   static_cast<int>(imin(kBlockN, T - int64_t(n) * kBlockN)));
  }
  cute::cp_async_fence();

  // Online softmax state: rows = (2, MMA_M) per thread.
  Tensor row_max = make_tensor<float>(Shape<Int<2 * size<1>(acc_o)>>{});
  Tensor row_sum = make_fragment_like(row_max);
  fill(row_max, -INFINITY);
  clear(row_sum);
  const float scale_log2 = static_cast<float>(p.softmax_scale * M_LOG2E);

  auto body = [&](const int n, const bool masked) {
    const int64_t n0 = int64_t(n) * kBlockN;
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    cute::cp_async_wait<0>();
    __syncthreads();  // K[n] (and Q) landed; everyone is done with V[n+1]
    if (rotary) {
      if (n == n_end - 1) rotary_smem<kBlockM, kHeadDim, kNThreads>(sQ, rcos, rsin, m0, T, false);
      rotary_smem<kBlockN, kHeadDim, kNThreads>(sK, rcos, rsin, n0, T, false);
      __syncthreads();
    }
    copy_rows_pred(gmem_tiled_copy, tVgV(_, _, _, n), tVsV, tKVcKV,
                   static_cast<int>(imin(kBlockN, T - n0)));
    cute::cp_async_fence();

    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, smem_copy_q, smem_copy_k, smem_thr_copy_q,
            smem_thr_copy_k);

    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));  // (rows, cols)
    if (masked) {
      Tensor c = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
      CUTE_UNROLL
      for (int i = 0; i < size<0>(s); ++i) {
        CUTE_UNROLL
        for (int j = 0; j < size<1>(s); ++j) {
          const int64_t t = m0 + get<0>(c(i, j)), key = n0 + get<1>(c(i, j));
          if (key >= T || !swa_visible(t, key, W)) s(i, j) = -INFINITY;
        }
      }
    }

    cute::cp_async_wait<0>();
    __syncthreads();  // V[n] landed; everyone is done with K[n]
    if (n > n_begin) {
      const int64_t nn0 = int64_t(n - 1) * kBlockN;
      copy_rows_pred(gmem_tiled_copy, tKgK(_, _, _, n - 1), tKsK, tKVcKV,
                     static_cast<int>(imin(kBlockN, T - nn0)));
      cute::cp_async_fence();
    }

    // Online softmax: new row max (quad reduce: a row lives in 4 threads), rescale acc_o.
    Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
    CUTE_UNROLL
    for (int i = 0; i < size<0>(s); ++i) {
      float mx = row_max(i);
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s); ++j) mx = fmaxf(mx, s(i, j));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      // A row with no visible key yet keeps max -inf: use 0 so -inf - -inf never happens.
      const float mx_scaled = (mx == -INFINITY) ? 0.f : mx * scale_log2;
      const float factor = (row_max(i) == -INFINITY) ? 0.f
                                                     : exp2f(row_max(i) * scale_log2 - mx_scaled);
      row_max(i) = mx;
      row_sum(i) *= factor;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(o); ++j) o(i, j) *= factor;
      float sum = 0.f;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s); ++j) {
        s(i, j) = exp2f(s(i, j) * scale_log2 - mx_scaled);
        sum += s(i, j);
      }
      row_sum(i) += sum;  // per-thread partial; reduced across the quad at the end
    }

    Tensor rP = convert_type<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_to_a_regs(rP.layout()));
    gemm_rs(acc_o, tOrP, tOrVt, tOsVt, tiled_mma, smem_copy_v, smem_thr_copy_v);
  };

  // Phase boundaries (see the header comment); [n_begin, n_end) is split into
  // [n_begin, n_left) masked, [n_left, n_right) interior, [n_right, n_end) masked.
  const int64_t m_last = m0 + kBlockM - 1;
  int n_right = static_cast<int>(imax(n_begin, imin(n_end, (m0 + 1) / kBlockN)));
  int n_left = static_cast<int>(imin(n_right, imax(n_begin, ceil_div(imax(0, m_last - W),
                                                                       kBlockN))));
  int n = n_end - 1;
  for (; n >= n_right; --n) body(n, true);
  for (; n >= n_left; --n) {
    // Interior tiles only need a mask when a tile is ragged in T (the last query tile).
    body(n, swa_tile_needs_mask(m_block, n, kBlockM, kBlockN, T, W));
  }
  for (; n >= n_begin; --n) body(n, true);

  // Epilogue: o = acc_o / l (float32 out), lse = m * scale + log(l).
  Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
  Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor tOcO = thr_mma.partition_C(cO);
  Tensor c = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
  float* out_ptr = static_cast<float*>(p.out) + b * p.out_stride.b + h * p.out_stride.h;
  float* lse_ptr = static_cast<float*>(p.lse) + (int64_t(b) * p.dims.heads_q + h) * T;
  CUTE_UNROLL
  for (int i = 0; i < size<0>(o); ++i) {
    float sum = row_sum(i);
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    sum += __shfl_xor_sync(0xffffffff, sum, 2);
    const float inv = (sum == 0.f || sum != sum) ? 1.f : 1.f / sum;
    const int64_t t = m0 + get<0>(c(i, 0));
    if (t < T) {
      CUTE_UNROLL
      for (int j = 0; j < size<1>(o); j += 2) {
        // columns j, j+1 are adjacent in D: one 8-byte store
        const int d = get<1>(c(i, j));
        *reinterpret_cast<float2*>(out_ptr + t * p.out_stride.t + d) =
            make_float2(o(i, j) * inv, o(i, j + 1) * inv);
      }
      if ((tid & 3) == 0) {
        lse_ptr[t] = (sum == 0.f || sum != sum)
                         ? INFINITY
                         : row_max(i) * static_cast<float>(p.softmax_scale) + logf(sum);
      }
    }
  }
}

}  // namespace cuda
}  // namespace rattention
