// SWA forward on tensor cores, flash-attention-2 style. One CTA per (query tile of kBlockM
// rows, batch, query head; kBlockM and the warps: SwaFwdTraits); packed batches: per (tile
// slot, query head), a slot naming a document's query tile (QkvParams::tile_slot0). It visits
// only the key tiles inside the window (core/window.h) and masks only the tiles at the
// window's two edges; a document's tiles see only that document's keys.
//
//   gQ (kBlockM, D)  --cp.async-->  sQ      --ldmatrix-->  tSrQ
//   gK (kBlockN, D)  --cp.async-->  sK[st]  --ldmatrix-->  tSrK      S = Q K^T   (fp32 acc)
//   online softmax on S (rows owned by quads)  ->  P (registers, input dtype)
//   gV (kBlockN, D)  --cp.async-->  sV[st]  --ldmatrix.trans--> tOrVt  O += P V  (fp32 acc)
//
// Two K/V stages: K(n+1) and V(n+1) load into stage (n+1) % 2 during all of tile n's work.
//
// Outputs: out fp32 [B, T, Hq, D] (strided), lse fp32 [B, Hq, T] = scale * max + log(sum);
// optionally the mixed RAttention output (swa_mix_epilogue.cuh) from the same registers.
#pragma once
#include <cute/tensor.hpp>

#include <cmath>

#include "core/params.h"
#include "core/window.h"
#include "cuda/nan_tiles.cuh"
#include "cuda/swa_mix_epilogue.cuh"
#include "cuda/swa_traits.cuh"

namespace rattention::cuda {

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads)
    swa_fwd_kernel(const SwaFwdParams p) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;

  const int64_t h = blockIdx.z;
  int64_t b = blockIdx.y;
  int m_block = blockIdx.x;
  if (p.packed()) {
    RATT_COVER_ANY("packed");
    b = p.seq_of_tile_slot(blockIdx.x, kBlockM);
    m_block = int(blockIdx.x - p.tile_slot0(b, kBlockM));
    if (int64_t(m_block) * kBlockM >= p.seqlen_q(b)) {
      RATT_COVER_ANY("packed_idle_slot");
      return;  // a slot past the document's last tile: no rows (the whole CTA leaves)
    }
  }
  const int64_t T = p.seqlen_q(b);    // rows of this sequence (document)
  const int64_t row0 = p.seq_start_q(b);  // its first row in the q/out tensors
  const int64_t hk = h / (p.dims.heads_q / p.dims.heads_kv);  // GQA: kv head h / G
  const int64_t window = p.window_size;
  const int tid = threadIdx.x;
  const int64_t m0 = int64_t(m_block) * kBlockM;
  const int rows_q = int(imin(kBlockM, T - m0));

  RATT_DYNAMIC_SMEM(char, smem_raw);
  auto& smem = *reinterpret_cast<typename Traits::Smem*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});  // (M, D)
  // K and V tiles (N, D) of a stage; V^T (D, N) a view on V's storage.
  auto sK_at = [&](int st) {
    return make_tensor(make_smem_ptr(smem.k[st].data()), typename Traits::SmemLayoutKV{});
  };
  auto sV_at = [&](int st) {
    return make_tensor(make_smem_ptr(smem.v[st].data()), typename Traits::SmemLayoutKV{});
  };
  auto sVt_at = [&](int st) {
    return make_tensor(make_smem_ptr(smem.v[st].data()), typename Traits::SmemLayoutVt{});
  };
  // The register fragments' shapes only (never read through).
  Tensor sVtFragShape = make_tensor(make_smem_ptr(smem.v[0].data()),
                                    typename Traits::SmemLayoutVtNoSwizzle{});

  // Global views with runtime strides; the D stride is 1 (rows contiguous).
  const Element* q_ptr = static_cast<const Element*>(p.q) + p.q_offset(p.q_stride, b, 0, h);
  const Element* k_ptr = static_cast<const Element*>(p.k) + p.k_offset(p.k_stride, b, 0, hk);
  const Element* v_ptr = static_cast<const Element*>(p.v) + p.k_offset(p.v_stride, b, 0, hk);
  Tensor mQ = make_tensor(make_gmem_ptr(q_ptr), make_shape(T, Int<kHeadDim>{}),
                          make_stride(p.q_stride.t, _1{}));
  Tensor mK = make_tensor(make_gmem_ptr(k_ptr), make_shape(T, Int<kHeadDim>{}),
                          make_stride(p.k_stride.t, _1{}));
  Tensor mV = make_tensor(make_gmem_ptr(v_ptr), make_shape(T, Int<kHeadDim>{}),
                          make_stride(p.v_stride.t, _1{}));
  Tensor gQ = local_tile(mQ, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  // (kBlockN, D, n_tiles)
  Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));
  Tensor gV = local_tile(mV, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));

  typename Traits::GmemTiledCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tQgQ = gmem_thr.partition_S(gQ);  // (CPY, CPY_M, CPY_D)
  Tensor tQsQ = gmem_thr.partition_D(sQ);
  Tensor tKgK = gmem_thr.partition_S(gK);  // (CPY, CPY_N, CPY_D, n_tiles)
  Tensor tVgV = gmem_thr.partition_S(gV);
  // Row coordinates of every copied element, for the ragged-T predicate.
  Tensor cQ = make_identity_tensor(make_shape(Int<kBlockM>{}, Int<kHeadDim>{}));
  Tensor cKV = make_identity_tensor(make_shape(Int<kBlockN>{}, Int<kHeadDim>{}));
  Tensor tQcQ = gmem_thr.partition_S(cQ);
  Tensor tKVcKV = gmem_thr.partition_S(cKV);

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);            // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_mma.partition_fragment_B(sK_at(0));      // (MMA, MMA_N, MMA_K)
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtFragShape); // (MMA, MMA_D, MMA_N)

  auto smem_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_q = smem_copy_q.get_thread_slice(tid);
  Tensor tSsQ = smem_thr_q.partition_S(sQ);
  auto smem_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_k = smem_copy_k.get_thread_slice(tid);
  auto smem_copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  auto smem_thr_v = smem_copy_v.get_thread_slice(tid);

  // Output accumulator (MMA, MMA_M, MMA_D) and the score tile's element coordinates.
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_o);
  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_mma.partition_C(cS);  // (MMA, MMA_M, MMA_N) -> (row, col) in the tile
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor tOcO = thr_mma.partition_C(cO);  // (MMA, MMA_M, MMA_D) -> (row, col) of O
  Tensor tOcO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));

  constexpr int kRowsPerThread = 2 * decltype(size<1>(acc_o))::value;  // rows of acc_rowcol
  float row_max[kRowsPerThread];
  float row_sum[kRowsPerThread];
  CUTE_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }
  const float scale_log2 = float(p.softmax_scale * M_LOG2E);
  const float* rot_cos = static_cast<const float*>(p.rotary_cos);
  const float* rot_sin = static_cast<const float*>(p.rotary_sin);

  // Q tile: loaded once, rotated once (rows past T are zero and stay zero). Prologue: Q with
  // K(begin), then V(begin), as two cp.async groups.
  const TileRange tiles = swa_key_tiles_for_query_tile(m_block, kBlockM, kBlockN, T, window);
  auto rows_of = [&](int64_t n) { return int(imin(kBlockN, T - n * kBlockN)); };
  // cp.async of key tile n's K and V into stage st, one group each.
  auto load_kv = [&](int64_t n, int st) {
    Tensor tKsK = gmem_thr.partition_D(sK_at(st));
    copy_rows_pred(gmem_copy, tKgK(_, _, _, n), tKsK, tKVcKV, rows_of(n));
    cp_async_fence();
    Tensor tVsV = gmem_thr.partition_D(sV_at(st));
    copy_rows_pred(gmem_copy, tVgV(_, _, _, n), tVsV, tKVcKV, rows_of(n));
    cp_async_fence();
  };
  copy_rows_pred(gmem_copy, tQgQ, tQsQ, tQcQ, rows_q);
  if (tiles.begin < tiles.end) {
    load_kv(tiles.begin, 0);
  } else {
    cp_async_fence();
    cp_async_fence();
  }

  bool any_v_nonfinite = false;  // a visited V tile had NaN / Inf (nan_tiles.cuh)
  // K/V pipeline, two stages. Pending groups at the top of tile n: K(n), V(n). Tile n + 1's
  // two groups are issued as soon as every warp is past tile n - 1 (the stage they overwrite),
  // so they load during all of tile n; empty groups past the last tile keep the counts fixed.
  for (int64_t n = tiles.begin; n < tiles.end; ++n) {
    const int64_t n0 = n * kBlockN;
    const int rows_k = rows_of(n);
    const int stage = int((n - tiles.begin) & 1);
    Tensor sK = sK_at(stage);
    Tensor sV = sV_at(stage);
    cp_async_wait<1>();
    // K(n) (and Q) have landed; every warp is past O += P V(n - 1): stage ^ 1 is free.
    __syncthreads();
    if (n + 1 < tiles.end) {
      RATT_COVER("prefetch_next_kv");
      load_kv(n + 1, stage ^ 1);
    } else {
      cp_async_fence();
      cp_async_fence();
    }
    if (rot_cos != nullptr) {
      RATT_COVER("rotary");
      if (n == tiles.begin) {
        rotate_tile_smem<kBlockM, kHeadDim, Traits::kNThreads>(sQ, rot_cos, rot_sin, m0, rows_q,
                                                               false);
      }
      rotate_tile_smem<kBlockN, kHeadDim, Traits::kNThreads>(sK, rot_cos, rot_sin, n0, rows_k,
                                                             false);
      __syncthreads();
    } else {
      RATT_COVER("no_rotary");
    }

    // S = Q K^T for this (query tile, key tile) pair.
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, smem_thr_k.partition_S(sK), tiled_mma, smem_copy_q,
            smem_copy_k, smem_thr_q, smem_thr_k);
    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));  // (rows, cols)

    // V(n) has landed (K(n + 1), V(n + 1) may still be in flight). NaN / Inf values
    // (nan_tiles.cuh): each thread zeroes those of its own chunks, and the barrier tells
    // every thread whether the tile had any (and makes every thread's V(n) chunks visible).
    cp_async_wait<2>();
    Tensor tVsV = gmem_thr.partition_D(sV);
    const bool v_mine = tile_chunks_nonfinite<Element>(tVsV);
    if (v_mine) zero_nonfinite_chunks(tVsV);
    const bool v_nonfinite = __syncthreads_or(v_mine);

    // Element mask only on the window's edge tiles (and ragged tails).
    if (swa_tile_needs_mask(m_block, n, kBlockM, kBlockN, T, window)) {
      RATT_COVER("masked_tile");
      CUTE_UNROLL
      for (int i = 0; i < size(s); ++i) {
        const int64_t t = m0 + get<0>(tScS_rc(i));
        const int64_t sk = n0 + get<1>(tScS_rc(i));
        if (!(sk < T && swa_visible(t, sk, window))) s(i) = -INFINITY;
      }
    } else {
      RATT_COVER("unmasked_tile");
    }

    // Online softmax: new running max, rescale the old sum and O, exponentiate in place.
    CUTE_UNROLL
    for (int r = 0; r < size<0>(s); ++r) {
      float mx = row_max[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) mx = fmaxf(mx, s(r, c));
      mx = quad_allreduce(mx, MaxOp{});
      // A row that has seen only masked keys keeps max -inf; use 0 so exp2 gives 0, not NaN.
      const float mx_scaled = (mx == -INFINITY ? 0.f : mx * scale_log2);
      const float corr = (row_max[r] == -INFINITY) ? 0.f : exp2f(row_max[r] * scale_log2 - mx_scaled);
      row_max[r] = mx;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) {
        s(r, c) = exp2f(s(r, c) * scale_log2 - mx_scaled);
        sum += s(r, c);
      }
      row_sum[r] = row_sum[r] * corr + sum;  // per-thread partial; quad-reduced at the end
      Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
      CUTE_UNROLL
      for (int c = 0; c < size<1>(o); ++c) o(r, c) *= corr;
    }

    // O += P V with P straight from registers (input dtype, the MMA's A layout).
    Tensor rP = convert_frag<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_as_a(rP.layout()));
    gemm_rs(acc_o, tOrP, tOrVt, smem_thr_v.partition_S(sVt_at(stage)), tiled_mma, smem_copy_v,
            smem_thr_v);
    any_v_nonfinite |= v_nonfinite;
  }
  // V tiles that had NaN / Inf (their MMAs saw them as zeros): those values reach only the
  // rows whose mask lets them in. Added here, outside the tile loop, where the score tile's
  // registers are free (the loop runs near the register limit); every visited tile is
  // re-read, finite ones add nothing. Before the 1 / sum: a non-finite term stays one.
  if (any_v_nonfinite) {
    for (int64_t n = tiles.begin; n < tiles.end; ++n) {
      const int64_t n0 = n * kBlockN;
      add_nonfinite_entries<true>(acc_o, tOcO, v_ptr + n0 * p.v_stride.t, p.v_stride.t,
                                  int(imin(kBlockN, T - n0)), 0, 0, [&](int row, int j) {
        const int64_t sk = n0 + j;
        return sk < T && swa_visible(m0 + row, sk, window);
      });
    }
  }

  // Epilogue: O / sum to fp32 out (strided), lse = scale * max + log(sum) natural-log units;
  // with p.mix on, also the mixed RAttention output (out/lse may then be skipped: nullptr).
  Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
  float* out = p.out == nullptr ? nullptr
                                : static_cast<float*>(p.out) + p.q_offset(p.out_stride, b, 0, h);
  float* lse = p.lse == nullptr ? nullptr : static_cast<float*>(p.lse) + p.lse_index(b, h, 0);
  if (p.mix.out != nullptr) {
    RATT_COVER("mix_epilogue");
  } else {
    RATT_COVER("no_mix");
  }
  if (out == nullptr) RATT_COVER_ANY("out_not_saved");
  CUTE_UNROLL
  for (int r = 0; r < size<0>(o); ++r) {
    // sum NaN: a NaN score was visible (output and lse NaN); sum 0: every visible score was
    // -inf, 0 / 0 (NaN output, lse -inf). Rows past T are never stored.
    const float sum = quad_allreduce(row_sum[r], SumOp{});
    const float inv = (sum > 0.f) ? 1.f / sum : NAN;
    const int64_t t = m0 + get<0>(tOcO_rc(r, 0));
    CUTE_UNROLL
    for (int c = 0; c < size<1>(o); ++c) o(r, c) *= inv;
    if (t < T && out != nullptr) {
      float* out_row = out + t * p.out_stride.t;
      if (p.out_stride.d == 1) {
        // Columns c, c + 1 of a row are adjacent (the MMA's accumulator pairs): 8-byte stores
        // (the row offset and the even column keep them 8-byte aligned).
        CUTE_UNROLL
        for (int c = 0; c < size<1>(o); c += 2) {
          *reinterpret_cast<float2*>(out_row + get<1>(tOcO_rc(r, c))) = make_float2(o(r, c), o(r, c + 1));
        }
      } else {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(o); ++c) out_row[get<1>(tOcO_rc(r, c)) * p.out_stride.d] = o(r, c);
      }
    }
    if (t < T && lse != nullptr && (tid & 3) == 0) {
      lse[t] = (sum > 0.f) ? row_max[r] * float(p.softmax_scale) + logf(sum)
                           : (sum == 0.f ? -INFINITY : NAN);
    }
    if (p.mix.out != nullptr) {
      mix_epilogue_row<kHeadDim>(p.mix, o, r, tOcO_rc, b, h, row0 + t, t < T);
    }
  }
}

}  // namespace rattention::cuda
