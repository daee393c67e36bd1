// SWA backward on tensor cores. Four launches, all deterministic (no atomics):
//   1. swa_bwd_preprocess_kernel: Di = rowsum(dO * O) - grad_lse (one warp per row), and dO
//      in the input dtype, the copy both MMA kernels load with cp.async. That copy is staged
//      in grad_q (dtype, q-shaped, contiguous), which nothing reads or writes until step 4
//      overwrites it with dQ, so it costs no workspace.
// Packed batches: the tile kernels run over the documents' tile slots (QkvParams::tile_slot0)
// and stay inside their document; the row kernels (1, 4) see the packed rows as one sequence.
//   2. swa_bwd_dkdv_kernel, one CTA of 8 warps per (b, kv head, key tile): loops over the
//      group's query heads and the query tiles that see the key tile
//      (swa_query_tiles_for_key_tile), in the transposed orientation:
//        S^T = K Q^T,  P^T = exp(scale S^T - lse),  dP^T = V dO^T,
//        dS^T = P^T (dP^T - Di) scale  (P^T, dS^T to shared memory in the input dtype),
//        dV += P^T dO,  dK += dS^T Q.
//      The CTA owns all D columns of its keys' dK and dV, so S^T and dP^T are computed once
//      per tile pair (4 GEMMs per pair; with dQ's 3, 7 in all).
//      Pipeline: Q is double-buffered (the next tile's Q loads during the whole iteration);
//      dO, lse and Di are single-buffered and the next tile's load under dK += dS^T Q.
//   3. swa_bwd_dq_kernel, one CTA per (b, q head, query tile) over its key tiles:
//        S = Q K^T, P, dP = dO V^T, dS = P (dP - Di) scale,  dQ += dS K.
//      Pipeline: K is double-buffered (the next tile's K loads during the whole iteration);
//      V is single-buffered and the next tile's V loads once dP = dO V^T is done.
//   4. swa_bwd_convert_kernel: fp32 dQ/dK workspaces -> input dtype, inverse rotary.
#pragma once
#include <cute/tensor.hpp>

#include <cmath>

#include "core/params.h"
#include "core/window.h"
#include "cuda/nan_tiles.cuh"
#include "cuda/swa_traits.cuh"

namespace rattention::cuda {

// dO in the input dtype (the copy the MMA kernels load), and back in fp32.
__device__ __forceinline__ float store_in_dtype(float x, DType dtype, void* dst, int64_t i) {
  if (dtype == DType::kBFloat16) {
    const cutlass::bfloat16_t y(x);
    static_cast<cutlass::bfloat16_t*>(dst)[i] = y;
    return float(y);
  }
  const cutlass::half_t y(x);
  static_cast<cutlass::half_t*>(dst)[i] = y;
  return float(y);
}

// Di[b, h, t] = sum_d dO * O - grad_lse (the -grad_lse term: d lse / d z = P), and dO in the
// input dtype into do_lp (q-shaped, contiguous). Di is summed from that rounded dO, so that
// dP - Di (dP = dO V^T from the same dO) cancels where it should: the row sums of dS stay ~0
// and, e.g., w = 0 (P = 1, O = V) gives dQ = dK = 0 rather than rounding noise (found by the
// host emulator, tests/test_cuda_emulated.py).
__global__ void __launch_bounds__(256)
    swa_bwd_preprocess_kernel(const SwaBwdParams p, float* di, void* do_lp) {
  // Packed: rows (h, r) of the [Hq, total] lse layout, i.e. one sequence of all rows.
  const int64_t B = p.packed() ? 1 : p.dims.batch;
  const int64_t T = p.dims.seqlen, H = p.dims.heads_q, D = p.dims.head_dim;
  const int64_t row = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;  // over (b, h, t)
  const int lane = threadIdx.x % 32;
  if (row >= B * H * T) return;
  const int64_t t = row % T, h = (row / T) % H, b = row / (T * H);
  const float* go = static_cast<const float*>(p.grad_out) + b * p.grad_out_stride.b +
                    t * p.grad_out_stride.t + h * p.grad_out_stride.h;
  const float* o = static_cast<const float*>(p.out) + b * p.out_stride.b + t * p.out_stride.t +
                   h * p.out_stride.h;
  const int64_t lp_row = ((b * T + t) * H + h) * D;  // packed: b == 0, t == the token
  float acc = 0.f;
  for (int64_t d = lane; d < D; d += 32)
    acc += store_in_dtype(go[d * p.grad_out_stride.d], p.dtype, do_lp, lp_row + d) *
           o[d * p.out_stride.d];
  acc = quad_allreduce(acc, SumOp{});
  acc += __shfl_xor_sync(0xffffffffu, acc, 4);
  acc += __shfl_xor_sync(0xffffffffu, acc, 8);
  acc += __shfl_xor_sync(0xffffffffu, acc, 16);
  if (p.grad_lse != nullptr) {
    RATT_COVER("grad_lse");
  } else {
    RATT_COVER("no_grad_lse");
  }
  if (lane == 0) {
    const float g = p.grad_lse ? static_cast<const float*>(p.grad_lse)[row] : 0.f;
    di[row] = acc - g;  // row == (b * H + h) * T + t: the lse layout
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads)
    swa_bwd_dkdv_kernel(const SwaBwdParams p, const float* di, float* dk_ws) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;
  static_assert(kBlockM == 64 && kBlockN == 64, "sPt / sdSt use the 64x64 P layout");

  int n_block = blockIdx.x;
  int64_t b = blockIdx.y;
  const int64_t hk = blockIdx.z;
  if (p.packed()) {
    RATT_COVER_ANY("packed");
    b = p.seq_of_tile_slot(n_block, kBlockN);
    n_block = int(n_block - p.tile_slot0(b, kBlockN));
    if (int64_t(n_block) * kBlockN >= p.seqlen_k(b)) {
      RATT_COVER_ANY("packed_idle_slot");
      return;  // a slot past the document's last key tile (the whole CTA leaves)
    }
  }
  const int64_t T = p.seqlen_q(b);
  const int64_t Hq = p.dims.heads_q;
  const int64_t G = Hq / p.dims.heads_kv;
  const int64_t window = p.window_size;
  const int tid = threadIdx.x;
  const int64_t n0 = int64_t(n_block) * kBlockN;
  const int rows_k = int(imin(kBlockN, T - n0));
  const float scale = float(p.softmax_scale);
  const float scale_log2 = float(p.softmax_scale * M_LOG2E);

  // sK, sV (N, D); sdO (M, D); sQ (M, D) x 2 stages; sPt, sdSt (N, M); lse and Di rows.
  RATT_DYNAMIC_SMEM(char, smem_raw);
  Element* smem = reinterpret_cast<Element*>(smem_raw);
  Tensor sK = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutKV{});     // (N, D)
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});    // (N, D)
  Tensor sdO = make_tensor(sV.data() + size(sV), typename Traits::SmemLayoutQ{});    // (M, D)
  Tensor sQ0 = make_tensor(sdO.data() + size(sdO), typename Traits::SmemLayoutQ{});  // (M, D)
  Tensor sPt = make_tensor(sQ0.data() + 2 * size(sQ0), typename Traits::SmemLayoutP{});  // (N, M)
  Tensor sdSt = make_tensor(sPt.data() + size(sPt), typename Traits::SmemLayoutP{});     // (N, M)
  float* s_lse = reinterpret_cast<float*>(smem_raw + Traits::kSmemQ * 3 + Traits::kSmemKV * 2 +
                                          Traits::kSmemP * 2);
  float* s_di = s_lse + kBlockM;
  // dO^T / Q^T (D, M) views for the B operands of dV += P^T dO and dK += dS^T Q.
  Tensor sdOt = make_tensor(sdO.data(), typename Traits::SmemLayoutQt{});
  Tensor sQtNoSwizzle = make_tensor(sQ0.data(), typename Traits::SmemLayoutQtNoSwizzle{});
  auto sQ_at = [&](int s) { return make_tensor(sQ0.data() + s * size(sQ0), typename Traits::SmemLayoutQ{}); };
  auto sQt_at = [&](int s) { return make_tensor(sQ0.data() + s * size(sQ0), typename Traits::SmemLayoutQt{}); };

  const Element* k_ptr = static_cast<const Element*>(p.k) + p.k_offset(p.k_stride, b, 0, hk);
  const Element* v_ptr = static_cast<const Element*>(p.v) + p.k_offset(p.v_stride, b, 0, hk);
  Tensor mK = make_tensor(make_gmem_ptr(k_ptr), make_shape(T, Int<kHeadDim>{}),
                          make_stride(p.k_stride.t, _1{}));
  Tensor mV = make_tensor(make_gmem_ptr(v_ptr), make_shape(T, Int<kHeadDim>{}),
                          make_stride(p.v_stride.t, _1{}));
  Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gV = local_tile(mV, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));

  typename Traits::GmemTiledCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tKVcKV = gmem_thr.partition_S(make_identity_tensor(make_shape(Int<kBlockN>{}, Int<kHeadDim>{})));
  Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(make_shape(Int<kBlockM>{}, Int<kHeadDim>{})));
  Tensor tKsK = gmem_thr.partition_D(sK);
  Tensor tVsV = gmem_thr.partition_D(sV);
  Tensor tdOsdO = gmem_thr.partition_D(sdO);
  copy_rows_pred(gmem_copy, gmem_thr.partition_S(gK), tKsK, tKVcKV, rows_k);
  copy_rows_pred(gmem_copy, gmem_thr.partition_S(gV), tVsV, tKVcKV, rows_k);
  cp_async_fence();

  // The (query head, query tile) pairs this key tile meets, head-major: pair i is head
  // hk G + i / n_m and query tile mt.begin + i % n_m.
  const TileRange mt = swa_query_tiles_for_key_tile(n_block, kBlockM, kBlockN, T, window);
  const int64_t n_m = mt.end - mt.begin;
  const int64_t n_pairs = G * n_m;
  const float* lse_base = static_cast<const float*>(p.lse);
  const Element* do_lp = static_cast<const Element*>(p.grad_q);  // dO in dtype (preprocess)
  // cp.async of pair i's Q tile into stage s.
  auto load_q = [&](int64_t i, int s) {
    const int64_t hq = hk * G + i / n_m, m0 = (mt.begin + i % n_m) * kBlockM;
    Tensor gQ = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.q) + p.q_offset(p.q_stride, b, m0, hq)),
                            Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_stride(p.q_stride.t, _1{}));
    Tensor tQsQ = gmem_thr.partition_D(sQ_at(s));
    copy_rows_pred(gmem_copy, gmem_thr.partition_S(gQ), tQsQ, tQcQ, int(imin(kBlockM, T - m0)));
  };
  // cp.async of pair i's dO tile, plain loads of its lse (log2 units) and Di.
  auto load_do_lse_di = [&](int64_t i) {
    const int64_t hq = hk * G + i / n_m, m0 = (mt.begin + i % n_m) * kBlockM;
    const int rows_q = int(imin(kBlockM, T - m0));
    Tensor gdO = make_tensor(make_gmem_ptr(do_lp + (p.q_row(b, m0) * Hq + hq) * kHeadDim),
                             Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_stride(Hq * kHeadDim, _1{}));
    copy_rows_pred(gmem_copy, gmem_thr.partition_S(gdO), tdOsdO, tQcQ, rows_q);
    const int64_t row0 = p.lse_index(b, hq, m0);
    for (int r = tid; r < kBlockM; r += kNThreads) {
      s_lse[r] = r < rows_q ? lse_base[row0 + r] * float(M_LOG2E) : 0.f;
      s_di[r] = r < rows_q ? di[row0 + r] : 0.f;
    }
  };
  if (n_pairs > 0) {
    load_q(0, 0);
    load_do_lse_di(0);
  }
  cp_async_fence();

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor tSrK = thr_mma.partition_fragment_A(sK);             // S^T = K Q^T
  Tensor tSrQ = thr_mma.partition_fragment_B(sQ0);
  Tensor tPrV = thr_mma.partition_fragment_A(sV);             // dP^T = V dO^T
  Tensor tPrdO = thr_mma.partition_fragment_B(sdO);
  Tensor tVrPt = thr_mma.partition_fragment_A(sPt);           // dV += P^T dO
  Tensor tVrdOt = thr_mma.partition_fragment_B(sQtNoSwizzle);
  Tensor tKrdSt = thr_mma.partition_fragment_A(sdSt);         // dK += dS^T Q
  Tensor tKrQt = thr_mma.partition_fragment_B(sQtNoSwizzle);

  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto thr_b = copy_b.get_thread_slice(tid);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  auto thr_bt = copy_bt.get_thread_slice(tid);
  Tensor tSsK = thr_a.partition_S(sK);
  Tensor tPsV = thr_a.partition_S(sV);
  Tensor tPsdO = thr_b.partition_S(sdO);
  Tensor tVsPt = thr_a.partition_S(sPt);
  Tensor tVsdOt = thr_bt.partition_S(sdOt);
  Tensor tKsdSt = thr_a.partition_S(sdSt);

  Tensor acc_dk = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);
  // (row = key j, col = query i) coordinates of the S^T accumulator; (key, column) of dK.
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
  Tensor tKcK = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));

  const float* rot_cos = static_cast<const float*>(p.rotary_cos);
  const float* rot_sin = static_cast<const float*>(p.rotary_sin);
  for (int64_t i = 0; i < n_pairs; ++i) {
    const int64_t hq = hk * G + i / n_m, m = mt.begin + i % n_m;
    if (hq > hk * G) RATT_COVER("group_head");
    const int64_t m0 = m * kBlockM;
    const int rows_q = int(imin(kBlockM, T - m0));
    const int stage = int(i & 1);
    Tensor sQ = sQ_at(stage);
    Tensor tQsQ = gmem_thr.partition_D(sQ);
    cp_async_wait<0>();
    // Q(i), dO(i) (and K, V) landed; every warp is past pair i - 1, whose Q stage, sPt and
    // sdSt are now free. The barrier also says whether Q holds a NaN / Inf (nan_tiles.cuh).
    const bool q_nonfinite = __syncthreads_or(tile_chunks_nonfinite<Element>(tQsQ));
    if (i + 1 < n_pairs) {
      RATT_COVER("prefetch_next_q");
      load_q(i + 1, stage ^ 1);
    }
    cp_async_fence();
    if (rot_cos != nullptr) {
      RATT_COVER("rotary");
      if (i == 0) rotate_tile_smem<kBlockN, kHeadDim, kNThreads>(sK, rot_cos, rot_sin, n0, rows_k, false);
      rotate_tile_smem<kBlockM, kHeadDim, kNThreads>(sQ, rot_cos, rot_sin, m0, rows_q, false);
      __syncthreads();
    } else {
      RATT_COVER("no_rotary");
    }

    // S^T (N, M) and dP^T = V dO^T, once per tile pair for all D columns.
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_s);
    gemm_ss(acc_s, tSrK, tSrQ, tSsK, thr_b.partition_S(sQ), tiled_mma, copy_a, copy_b, thr_a,
            thr_b);
    Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_dp);
    gemm_ss(acc_dp, tPrV, tPrdO, tPsV, tPsdO, tiled_mma, copy_a, copy_b, thr_a, thr_b);
    const bool need_mask = swa_tile_needs_mask(m, n_block, kBlockM, kBlockN, T, window);
    if (need_mask) {
      RATT_COVER("masked_tile");
    } else {
      RATT_COVER("unmasked_tile");
    }
    // P^T = exp2(S^T scale log2e - lse log2e) and dS^T = P^T (dP^T - Di) scale, masked
    // pairs by select (dP^T or Di may be NaN there), into sPt / sdSt in the input dtype.
    CUTE_UNROLL
    for (int e = 0; e < size(acc_s); ++e) {
      const int j = get<0>(tScS(e)), qi = get<1>(tScS(e));
      const int64_t t = m0 + qi, sk = n0 + j;
      const bool vis = !need_mask || (t < T && sk < T && swa_visible(t, sk, window));
      const float pt = vis ? exp2f(acc_s(e) * scale_log2 - s_lse[qi]) : 0.f;
      sPt(j, qi) = static_cast<Element>(pt);
      sdSt(j, qi) = static_cast<Element>(vis ? pt * (acc_dp(e) - s_di[qi]) * scale : 0.f);
    }
    // sPt / sdSt complete; every warp is done with S^T = K Q^T, s_lse and s_di.
    __syncthreads();
    gemm_ss(acc_dv, tVrPt, tVrdOt, tVsPt, tVsdOt, tiled_mma, copy_a, copy_bt, thr_a, thr_bt);
    if (q_nonfinite) zero_nonfinite_chunks(tQsQ);  // dS^T Q sees them as zeros
    // Every warp is done with sdO and the zeroed Q tile is complete: the next pair's dO,
    // lse and Di load under dK += dS^T Q.
    __syncthreads();
    if (i + 1 < n_pairs) {
      RATT_COVER("prefetch_next_do");
      load_do_lse_di(i + 1);
    }
    cp_async_fence();
    gemm_ss(acc_dk, tKrdSt, tKrQt, tKsdSt, thr_bt.partition_S(sQt_at(stage)), tiled_mma, copy_a,
            copy_bt, thr_a, thr_bt);
    // ... and the NaN / Inf entries reach only the keys that see those queries (nan_tiles.cuh)
    if (q_nonfinite) {
      const Element* q_ptr = static_cast<const Element*>(p.q) + p.q_offset(p.q_stride, b, m0, hq);
      add_nonfinite_entries<false>(acc_dk, tKcK, q_ptr, p.q_stride.t, rows_q, 0,
                                   rot_cos ? kHeadDim / 2 : 0, [&](int key, int query) {
        const int64_t t = m0 + query, sk = n0 + key;
        return sk < T && swa_visible(t, sk, window);
      });
    }
  }

  // dV straight to the input dtype (no rotary on v); dK (rotated space) to the fp32
  // workspace, rotated back and converted by swa_bwd_convert_kernel.
  const int64_t Hkv = p.dims.heads_kv;
  Element* dv = static_cast<Element*>(p.grad_v);
  CUTE_UNROLL
  for (int e = 0; e < size(acc_dv); ++e) {
    const int64_t sk = n0 + get<0>(tKcK(e));
    const int c = get<1>(tKcK(e));
    if (sk < T) {
      const int64_t off = (p.k_row(b, sk) * Hkv + hk) * kHeadDim + c;
      dv[off] = static_cast<Element>(acc_dv(e));
      dk_ws[off] = acc_dk(e);
    }
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads)
    swa_bwd_dq_kernel(const SwaBwdParams p, const float* di, float* dq_ws) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;

  int m_block = blockIdx.x;
  int64_t b = blockIdx.y;
  const int64_t h = blockIdx.z;
  if (p.packed()) {
    RATT_COVER_ANY("packed");
    b = p.seq_of_tile_slot(blockIdx.x, kBlockM);
    m_block = int(blockIdx.x - p.tile_slot0(b, kBlockM));
    if (int64_t(m_block) * kBlockM >= p.seqlen_q(b)) {
      RATT_COVER_ANY("packed_idle_slot");
      return;  // a slot past the document's last query tile (the whole CTA leaves)
    }
  }
  const int64_t T = p.seqlen_q(b);
  const int64_t Hq = p.dims.heads_q;
  const int64_t hk = h / (Hq / p.dims.heads_kv);
  const int64_t window = p.window_size;
  const int tid = threadIdx.x;
  const int64_t m0 = int64_t(m_block) * kBlockM;
  const int rows_q = int(imin(kBlockM, T - m0));
  const float scale = float(p.softmax_scale);
  const float scale_log2 = float(p.softmax_scale * M_LOG2E);

  // sQ, sdO (M, D); sV (N, D); sK (N, D) x 2 stages.
  RATT_DYNAMIC_SMEM(char, smem_raw);
  Element* smem = reinterpret_cast<Element*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutQ{});      // (M, D)
  Tensor sdO = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutQ{});    // (M, D)
  Tensor sV = make_tensor(sdO.data() + size(sdO), typename Traits::SmemLayoutKV{});  // (N, D)
  Tensor sK0 = make_tensor(sV.data() + size(sV), typename Traits::SmemLayoutKV{});   // (N, D)
  auto sK_at = [&](int s) { return make_tensor(sK0.data() + s * size(sK0), typename Traits::SmemLayoutKV{}); };
  auto sKt_at = [&](int s) { return make_tensor(sK0.data() + s * size(sK0), typename Traits::SmemLayoutKt{}); };
  Tensor sKtNoSwizzle = make_tensor(sK0.data(), typename Traits::SmemLayoutKtNoSwizzle{});

  const Element* q_ptr = static_cast<const Element*>(p.q) + p.q_offset(p.q_stride, b, 0, h);
  const Element* k_ptr = static_cast<const Element*>(p.k) + p.k_offset(p.k_stride, b, 0, hk);
  const Element* v_ptr = static_cast<const Element*>(p.v) + p.k_offset(p.v_stride, b, 0, hk);
  const Element* do_lp = static_cast<const Element*>(p.grad_q);  // dO in dtype (preprocess)
  Tensor mQ = make_tensor(make_gmem_ptr(q_ptr), make_shape(T, Int<kHeadDim>{}),
                          make_stride(p.q_stride.t, _1{}));
  Tensor mK = make_tensor(make_gmem_ptr(k_ptr), make_shape(T, Int<kHeadDim>{}),
                          make_stride(p.k_stride.t, _1{}));
  Tensor mV = make_tensor(make_gmem_ptr(v_ptr), make_shape(T, Int<kHeadDim>{}),
                          make_stride(p.v_stride.t, _1{}));
  Tensor gQ = local_tile(mQ, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  Tensor gdO = make_tensor(make_gmem_ptr(do_lp + (p.q_row(b, m0) * Hq + h) * kHeadDim),
                           Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_stride(Hq * kHeadDim, _1{}));
  Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));
  Tensor gV = local_tile(mV, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));

  typename Traits::GmemTiledCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(make_shape(Int<kBlockM>{}, Int<kHeadDim>{})));
  Tensor tKVcKV = gmem_thr.partition_S(make_identity_tensor(make_shape(Int<kBlockN>{}, Int<kHeadDim>{})));
  Tensor tQsQ = gmem_thr.partition_D(sQ);
  Tensor tdOsdO = gmem_thr.partition_D(sdO);
  Tensor tKgK = gmem_thr.partition_S(gK);
  Tensor tVgV = gmem_thr.partition_S(gV);
  Tensor tVsV = gmem_thr.partition_D(sV);
  const TileRange tiles = swa_key_tiles_for_query_tile(m_block, kBlockM, kBlockN, T, window);
  auto rows_of = [&](int64_t n) { return int(imin(kBlockN, T - n * kBlockN)); };
  copy_rows_pred(gmem_copy, gmem_thr.partition_S(gQ), tQsQ, tQcQ, rows_q);
  copy_rows_pred(gmem_copy, gmem_thr.partition_S(gdO), tdOsdO, tQcQ, rows_q);
  if (tiles.begin < tiles.end) {
    Tensor tKsK0 = gmem_thr.partition_D(sK0);
    copy_rows_pred(gmem_copy, tKgK(_, _, _, tiles.begin), tKsK0, tKVcKV, rows_of(tiles.begin));
    copy_rows_pred(gmem_copy, tVgV(_, _, _, tiles.begin), tVsV, tKVcKV, rows_of(tiles.begin));
  }
  cp_async_fence();

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);             // S = Q K^T
  Tensor tSrK = thr_mma.partition_fragment_B(sK0);
  Tensor tPrdO = thr_mma.partition_fragment_A(sdO);           // dP = dO V^T
  Tensor tPrV = thr_mma.partition_fragment_B(sV);
  Tensor tQrKt = thr_mma.partition_fragment_B(sKtNoSwizzle);  // dQ += dS K

  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto thr_b = copy_b.get_thread_slice(tid);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  auto thr_bt = copy_bt.get_thread_slice(tid);
  Tensor tSsQ = thr_a.partition_S(sQ);
  Tensor tPsdO = thr_a.partition_S(sdO);
  Tensor tPsV = thr_b.partition_S(sV);

  Tensor acc_dq = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_dq);
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  Tensor tQcQ_acc = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));

  // Per-row lse (log2 units) and Di of this thread's accumulator rows.
  constexpr int kRows = 2 * decltype(size<1>(acc_dq))::value;
  float row_lse[kRows], row_di[kRows];
  const float* lse_ptr = static_cast<const float*>(p.lse) + p.lse_index(b, h, 0);
  const float* di_ptr = di + p.lse_index(b, h, 0);
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t t = m0 + get<0>(tScS_rc(r, 0));
    row_lse[r] = t < T ? lse_ptr[t] * float(M_LOG2E) : 0.f;
    row_di[r] = t < T ? di_ptr[t] : 0.f;
  }

  const float* rot_cos = static_cast<const float*>(p.rotary_cos);
  const float* rot_sin = static_cast<const float*>(p.rotary_sin);
  for (int64_t n = tiles.begin; n < tiles.end; ++n) {
    const int64_t n0 = n * kBlockN;
    const int rows_k = rows_of(n);
    const int stage = int((n - tiles.begin) & 1);
    Tensor sK = sK_at(stage);
    Tensor tKsK = gmem_thr.partition_D(sK);
    cp_async_wait<0>();
    // K(n), V(n) (and Q, dO) landed; every warp is past tile n - 1, whose K stage is now
    // free. The barrier also says whether K holds a NaN / Inf (nan_tiles.cuh).
    const bool k_nonfinite = __syncthreads_or(tile_chunks_nonfinite<Element>(tKsK));
    if (n + 1 < tiles.end) {
      RATT_COVER("prefetch_next_k");
      Tensor tKsK_next = gmem_thr.partition_D(sK_at(stage ^ 1));
      copy_rows_pred(gmem_copy, tKgK(_, _, _, n + 1), tKsK_next, tKVcKV, rows_of(n + 1));
    }
    cp_async_fence();
    if (rot_cos != nullptr) {
      RATT_COVER("rotary");
      if (n == tiles.begin) {
        rotate_tile_smem<kBlockM, kHeadDim, kNThreads>(sQ, rot_cos, rot_sin, m0, rows_q, false);
      }
      rotate_tile_smem<kBlockN, kHeadDim, kNThreads>(sK, rot_cos, rot_sin, n0, rows_k, false);
      __syncthreads();
    } else {
      RATT_COVER("no_rotary");
    }

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, thr_b.partition_S(sK), tiled_mma, copy_a, copy_b, thr_a,
            thr_b);
    Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_dp);
    gemm_ss(acc_dp, tPrdO, tPrV, tPsdO, tPsV, tiled_mma, copy_a, copy_b, thr_a, thr_b);
    // Every warp is done with sV and with S = Q K^T: V(n + 1) loads under dS and dQ += dS K.
    __syncthreads();
    if (n + 1 < tiles.end) {
      RATT_COVER("prefetch_next_v");
      copy_rows_pred(gmem_copy, tVgV(_, _, _, n + 1), tVsV, tKVcKV, rows_of(n + 1));
    }
    cp_async_fence();
    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    Tensor dp = make_tensor(acc_dp.data(), acc_rowcol(acc_dp.layout()));
    const bool need_mask = swa_tile_needs_mask(m_block, n, kBlockM, kBlockN, T, window);
    if (need_mask) {
      RATT_COVER("masked_tile");
    } else {
      RATT_COVER("unmasked_tile");
    }
    CUTE_UNROLL
    for (int r = 0; r < size<0>(s); ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) {
        const int64_t t = m0 + get<0>(tScS_rc(r, c)), sk = n0 + get<1>(tScS_rc(r, c));
        const bool vis = !need_mask || (t < T && sk < T && swa_visible(t, sk, window));
        // dS; masked pairs by select (dP or Di may be NaN there)
        dp(r, c) = vis ? exp2f(s(r, c) * scale_log2 - row_lse[r]) * (dp(r, c) - row_di[r]) * scale
                       : 0.f;
      }
    }
    if (k_nonfinite) {  // the MMA below sees the tile's NaN / Inf entries as zeros
      zero_nonfinite_chunks(tKsK);
      __syncthreads();  // the zeroed tile is complete before any warp's dS K
    }
    Tensor rdS = convert_frag<Element>(acc_dp);
    gemm_rs(acc_dq, make_tensor(rdS.data(), acc_as_a(rdS.layout())), tQrKt,
            thr_bt.partition_S(sKt_at(stage)), tiled_mma, copy_bt, thr_bt);
    // ... and they reach only the queries that see those keys (nan_tiles.cuh)
    if (k_nonfinite) {
      add_nonfinite_entries<false>(acc_dq, tQcQ_acc, k_ptr + n0 * p.k_stride.t, p.k_stride.t,
                                   rows_k, 0, rot_cos ? kHeadDim / 2 : 0, [&](int row, int j) {
        const int64_t t = m0 + row, sk = n0 + j;
        return t < T && sk < T && swa_visible(t, sk, window);
      });
    }
  }

  Tensor tCc = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dq); ++i) {
    const int64_t t = m0 + get<0>(tCc(i));
    if (t < T) dq_ws[(p.q_row(b, t) * Hq + h) * kHeadDim + get<1>(tCc(i))] = acc_dq(i);
  }
}

// fp32 [rows, D] (rows = tokens * H, token = row / H) -> input dtype, with the inverse
// rotary when rotary is on (gradients are w.r.t. the unrotated inputs). The rotary position
// is the token's inside its sequence: token % T dense, token - its document's start packed.
template <typename Element>
__global__ void __launch_bounds__(256)
    swa_bwd_convert_kernel(const QkvParams seq, const float* src, Element* dst, int64_t rows,
                           int64_t H, int D, const float* cos, const float* sin) {
  const int half = D / 2;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * half) return;
  const int64_t row = idx / half;
  const int i = int(idx % half);
  float x1 = src[row * D + i], x2 = src[row * D + half + i];
  if (cos != nullptr) {
    RATT_COVER("inverse_rotary");
    const int64_t token = row / H;
    int64_t t = token % seq.dims.seqlen;
    if (seq.packed()) {
      RATT_COVER_ANY("packed_rotary");
      t = token - seq.seq_start_q(seq.seq_of_row(token));
    }
    const float c = cos[t * half + i], s = -sin[t * half + i];
    const float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
    x1 = y1;
    x2 = y2;
  } else {
    RATT_COVER("no_rotary");
  }
  dst[row * D + i] = static_cast<Element>(x1);
  dst[row * D + half + i] = static_cast<Element>(x2);
}

}  // namespace rattention::cuda
