// RLA backward (SPEC.md Branch 2 gradients) on the forward's tiling.
//
// With o_t = phi(q_t)^T (H0_h + S_t), S_t = sum_{s <= t-w-1} phi(k_s) v_s^T and dO = grad_out:
//   dphi(q_t) = (H0_h + S_t) dO_t + sum_{s visible} (dO_t . v_s) phi(k_s)
//   dphi(k_s) = R_s v_s,  dv_s = R_s^T phi(k_s),   dH0_h = sum_t phi(q_t) dO_t^T
//   R_s = grad_final + sum over the group's heads and queries t >= s + w + 1 of phi(q_t) dO_t^T
//
// Packed batches: the grids run over slots of the O(1) tile-slot rule (D/BV, Hkv, slots),
// the dq grid over the checkpoint slots as the forward does, the dk/dv grids over their
// segments' (RlaBwdSegments); workspaces and gradients are row-indexed.
// 1. rla_bwd_dq_kernel, grid (D/BV, B*Hkv, n_checkpoints * parts): forward direction. A CTA
//    starts from its checkpoint (this is what the checkpoints are for: segments run in
//    parallel), advances S without outputs to its part of the segment (parts planned from the
//    SM count; packed: 1) and per chunk and head adds the column slice's share of dphi(q) into
//    the fp32 workspace wsQ [rla_dq_slots, B, T, Hq, 2D]:  P = mask(dO v^T),
//    dphi(q) += P phi(k) + dO (S + H0)^T. kHalves (rla_plan.h rla_bwd_plan): as the forward's
//    (rla_fwd_kernel.cuh), the state's halves in shared memory for dO (S + H0)^T, H0 in S
//    from the segment start when G = 1, a product per head when G > 1.
// 2. rla_bwd_state_kernel, rla_bwd_suffix_reduce_kernel (rla_bwd_state_kernel.cuh): the suffix
//    state dS at the start of every dk/dv segment (segments of RlaBwdSegments::chunks chunks,
//    planned from the SM count), and dH0 (per head and segment, summed in order).
// 3. rla_bwd_dkv_kernel, grid (D/BV, B*Hkv, segments): reverse direction over the segment's
//    chunks with the fp32 suffix state dS [2D, BV] in shared memory (starts at the segment's
//    dS, i.e. grad_final_state plus every later segment):
//      dphi(k) += mask(dO v^T)^T phi(q) (+ v dS^T once, for g = 0)  -> a wsK slot
//      dv       = sum_g mask(phi(q) phi(k)^T)^T dO + phi(k) dS               -> grad_v (owned)
//      dS      += sum_g phi(q)^T dO   (not after the segment's first chunk)
//    Each (chunk, head)'s q rows and dO are loaded into registers behind the MMAs of the one
//    before; the walk stops at the segment's first chunk with keys (the ones before have none).
// 4. rla_bwd_phi_postprocess_kernel: one warp per row, dq = phi'(q) (sum of the wsQ slots),
//    dk = phi'(k) (sum of the wsK slots), slots in a fixed order.
// wsK [slots, B, T, Hkv, 2D] (rla_dk_slots): with G > 1 each value slice owns a slot and sums
// the group's heads into it in order; with G == 1 two slices share a slot. A key belongs to
// one chunk, so to one segment: no two segments write the same wsK or grad_v rows. The only
// cross-CTA sums are the value slices' atomicAdds onto zeros (into wsQ, and wsK when G == 1),
// two slices per slot (kRlaSlicesPerAtomicSlot): the fp32 sum of two terms onto zero is
// order-independent, so the result is deterministic.
#pragma once
#include "core/window.h"
#include "rla_launch.h"
#include "rla_traits.cuh"

namespace rattention::cuda {

// ---------------------------------------------------------------------------------------
template <class Tr, bool kHalves,
          class Smem = DynSmem<kHalves ? RlaBwdSmem<Tr>::kDqHalves : RlaBwdSmem<Tr>::kDq>>
__global__ void __launch_bounds__(Tr::kNThreads, 1)
    rla_bwd_dq_kernel(const RlaBwdParams p, const int64_t parts, float* wsQ) {
  using namespace cute;
  using Element = typename Tr::Element;
  constexpr int C = Tr::kChunk, F = Tr::kFeat, D = Tr::kHeadDim, BV = Tr::kBlockV;
  using Sm = RlaBwdSmem<Tr>;

  RATT_DYNAMIC_SMEM(char, smem_raw);
  float* sS_ptr = reinterpret_cast<float*>(smem_raw);
  Element* sPhiK_ptr = reinterpret_cast<Element*>(smem_raw + Sm::kS);
  Element* sV_ptr = reinterpret_cast<Element*>(smem_raw + Sm::kS + Sm::kPhi);
  Element* sdO_ptr = reinterpret_cast<Element*>(smem_raw + Sm::kS + Sm::kPhi + Sm::kV);
  Element* sP_ptr = reinterpret_cast<Element*>(smem_raw + Sm::kS + Sm::kPhi + 2 * Sm::kV);
  // the state's halves (kHalves only: the buffers past kDq)
  Element* sShi_ptr = reinterpret_cast<Element*>(smem_raw + Sm::kDq);
  Element* sSlo_ptr = reinterpret_cast<Element*>(smem_raw + Sm::kDq + Tr::kSmemHalf);

  Tensor sS = make_tensor(make_smem_ptr(sS_ptr), row_major_padded<F, BV, Tr::kSStride>());        // (2D, BV)
  Tensor sPhiKt = make_tensor(make_smem_ptr(sPhiK_ptr), row_major_padded_t<C, F, Tr::kPhiStride>());  // (2D, C keys)
  Tensor sPhiKt_B = sPhiKt;  // as B operand: (N = 2D, K = C keys)
  Tensor sV = make_tensor(make_smem_ptr(sV_ptr), row_major_padded<C, BV, Tr::kVStride>());       // (C keys, BV)
  Tensor sVt = make_tensor(make_smem_ptr(sV_ptr), row_major_padded_t<C, BV, Tr::kVStride>());    // (BV, C keys)
  Tensor sdO = make_tensor(make_smem_ptr(sdO_ptr), row_major_padded<C, BV, Tr::kVStride>());     // (C, BV)
  Tensor sP = make_tensor(make_smem_ptr(sP_ptr), row_major_padded<C, C, Tr::kPStride>());        // (C, C keys)
  Tensor sShi = make_tensor(make_smem_ptr(sShi_ptr), row_major_padded<F, BV, Tr::kHalfStride>());  // (2D, BV)
  Tensor sSlo = make_tensor(make_smem_ptr(sSlo_ptr), row_major_padded<F, BV, Tr::kHalfStride>());  // (2D, BV)
  (void)sPhiKt_B;

  const int tid = threadIdx.x;
  const int64_t Hkv = p.dims.heads_kv, Hq = p.dims.heads_q, G = Hq / Hkv;
  const RlaSegmentCta seg = rla_segment_cta<C>(p, p.checkpoint_every, parts);
  if (p.packed()) RATT_COVER_ANY("packed");
  if (!seg.valid) {
    RATT_COVER_ANY("packed_idle_slot");
    return;  // a checkpoint slot past the document's last segment (the whole CTA leaves)
  }
  const int64_t b = seg.b, hk = seg.hk, T = seg.T;
  const int col0 = blockIdx.x * BV;
  const int64_t w = p.window_size;
  const int64_t ck = seg.z;
  // token rows of the q-shaped workspace (packed: all documents); this slice's slot of it
  const int64_t tokens = p.packed() ? p.dims.seqlen : p.dims.batch * p.dims.seqlen;
  const int64_t dq_slot = blockIdx.x / kRlaSlicesPerAtomicSlot;  // rla_dq_slots (rla_launch.h)
  if constexpr (Tr::kNVBlocks > kRlaSlicesPerAtomicSlot) {
    if (dq_slot > 0) RATT_COVER("dq_second_slot");
  }
  // This CTA's part of the checkpoint segment (parts per segment; packed: 1): it advances S
  // from the checkpoint through the chunks before the part (state updates only), then writes
  // dphi(q) for the part's chunks [part_begin, part_end).
  if (seg.part_begin >= seg.part_end) {
    RATT_COVER_ANY("empty_part");
    return;  // a part past a short last segment (the whole CTA leaves)
  }
  if (seg.part > 0) RATT_COVER_ANY("later_part");

  const Element* gK = static_cast<const Element*>(p.k) + p.k_offset(p.k_stride, b, 0, hk);
  const Element* gV = static_cast<const Element*>(p.v) + p.k_offset(p.v_stride, b, 0, hk) + col0;
  const float* gdO = static_cast<const float*>(p.grad_out);
  const float* gH0 = static_cast<const float*>(p.initial_state);
  const float* gCkpt =
      static_cast<const float*>(p.checkpoints) + p.ckpt_index(b, hk, ck) * F * D + col0;

  const bool has_h0 = gH0 != nullptr;
  const bool h0_in_state = kHalves && has_h0 && G == 1;  // H0 joins S once, as in the forward
  if constexpr (kHalves) {
    if (h0_in_state) RATT_COVER("h0_in_state");
  }
  load_state_start<Tr, kHalves>(
      gCkpt, h0_in_state ? gH0 + b * p.initial_state_bstride + hk * F * D + col0 : nullptr, sS,
      sShi, sSlo);

  typename Tr::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor tScS = thr.partition_C(make_identity_tensor(Shape<Int<C>, Int<C>>{}));
  Tensor tQcQ = thr.partition_C(make_identity_tensor(Shape<Int<C>, Int<C>>{}));  // (C q, 64 feat)
  Tensor tSsP = thr.partition_C(sP);

  for (int64_t c = seg.seg_begin; c < seg.part_end; ++c) {
    const int64_t t0 = c * C;
    const int rows = static_cast<int>(imin(C, T - t0));
    const TileRange keys = rla_chunk_keys(c, C, T, w);
    const int64_t s_base = t0 - w - 1;
    const bool has_keys = keys.end > keys.begin;
    const bool has_state = s_base > 0 || h0_in_state;  // S (+ H0) may be nonzero
    __syncthreads();  // S final for this chunk start; sPhiK, sV free
    auto key_valid = [&](int j) { return s_base + j >= keys.begin && s_base + j < keys.end; };
    // dO of the next head, loaded ahead: the first head's here, with the keys' and values'
    // loads in flight; each next head's behind the MMAs of the one before.
    const bool writes = c >= seg.part_begin && (has_keys || has_state || has_h0);
    auto do_rows_of = [&](int64_t g) {
      return gdO + p.q_offset(p.grad_out_stride, b, t0, hk * G + g) + col0;
    };
    DoRows<Tr> do_next;
    if (writes) load_do_rows<Tr>(do_next, do_rows_of(0), p.grad_out_stride.t, rows);
    bool k_mine = false;  // a NaN / Inf this thread wrote into sPhiK
    if (has_keys) {
      k_mine = phi_tile_to_smem<Tr>(p.feature_map, gK + s_base * p.k_stride.t, p.k_stride.t,
                                    key_valid, sPhiK_ptr);
      load_v_tile<Tr>(gV + s_base * p.v_stride.t, p.v_stride.t, key_valid, sV_ptr);
    }
    if (c < seg.part_begin) {  // before the part: only the state advances
      if (has_keys) {
        RATT_COVER_ANY("advance_state");
        __syncthreads();  // sPhiK, sV complete
        rla_state_update_halves_if<Tr, kHalves>(mma, sS, sShi, sSlo, sPhiKt, sVt);
      }
      continue;
    }
    if (!has_keys && !has_state && !has_h0) {
      RATT_COVER("chunk_skipped");
      continue;  // dphi(q) = 0 for the whole chunk
    }
    if (has_keys) RATT_COVER("chunk_with_keys");
    if (s_base > 0) RATT_COVER("inter_chunk_state");
    if (has_h0) RATT_COVER("h0");
    // A NaN / Inf key (nan_tiles.cuh): P phi(k) takes it only into the rows i >= j that see
    // key j; the MMAs run on sPhiK with it zeroed, the state update below on phi(k) as it is.
    const bool k_nonfinite = has_keys && __syncthreads_or(k_mine);  // sPhiK complete
    uint64_t k_hits = 0;
    if (k_nonfinite) {
      k_hits = nonfinite_hits<F / C, C>(tQcQ, sPhiK_ptr, Tr::kPhiStride, C,
                                        [](int i, int j) { return j <= i; });
      __syncthreads();  // every hit read before the zeroing (the head loop's barrier follows it)
      zero_nonfinite_tile<C, F>(sPhiK_ptr, Tr::kPhiStride);
    }

    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hk * G + g;
      if (g > 0) RATT_COVER("group_head");
      store_do_rows<Tr>(do_next, sdO_ptr);
      if (g + 1 < G) load_do_rows<Tr>(do_next, do_rows_of(g + 1), p.grad_out_stride.t, rows);
      __syncthreads();
      if (has_keys) {
        // P = mask(dO v^T): (C q, C keys), key j visible to row i iff j <= i.
        Tensor acc_s = partition_fragment_C(mma, Shape<Int<C>, Int<C>>{});
        clear(acc_s);
        gemm_ss(mma, acc_s, sdO, sV);
        store_causal_mask(tSsP, tScS, acc_s);
        // the two warps of a row block wrote half of its sP columns each; all are read below
        __syncthreads();
      }
      float* ws = wsQ + ((dq_slot * tokens + p.q_row(b, t0)) * Hq + h) * F;  // row i at + i * Hq * F
      const float* h0 = has_h0 ? gH0 + b * p.initial_state_bstride + h * F * D + col0 : gH0;
      const bool h0_per_head = has_h0 && !h0_in_state;
      CUTE_UNROLL
      for (int m = 0; m < F / C; ++m) {
        // dphi(q)[:, feature tile m] (C q, 64 features)
        Tensor acc_q = partition_fragment_C(mma, Shape<Int<C>, Int<C>>{});
        clear(acc_q);
        if (has_keys) gemm_ss(mma, acc_q, sP, local_tile(sPhiKt, Shape<Int<C>, Int<C>>{}, make_coord(m, 0)));
        if (k_nonfinite) add_nan_hits(acc_q, k_hits, m * int(size(acc_q)));
        Tensor gH0_m = make_tensor(make_gmem_ptr(h0 + m * C * D),
                                   make_layout(make_shape(Int<C>{}, Int<BV>{}),
                                               make_stride(Int<D>{}, _1{})));  // (64 feat, BV)
        if constexpr (kHalves) {
          if (has_state) {
            gemm_ss_halves(mma, acc_q, sdO,
                           local_tile(sShi, Shape<Int<C>, Int<BV>>{}, make_coord(m, 0)),
                           local_tile(sSlo, Shape<Int<C>, Int<BV>>{}, make_coord(m, 0)));
          }
          if (h0_per_head) {
            RATT_COVER("h0_per_head");
            gemm_s_state_split(mma, acc_q, sdO, gH0_m, gH0_m, false);
          }
        } else if (has_state || has_h0) {
          Tensor sS_m = local_tile(sS, Shape<Int<C>, Int<BV>>{}, make_coord(m, 0));  // (64 feat, BV)
          gemm_s_state_split(mma, acc_q, sdO, sS_m, gH0_m, has_h0);
        }
        CUTE_UNROLL
        for (int i = 0; i < size(acc_q); ++i) {
          const int r = get<0>(tQcQ(i));
          if (r < rows) atomicAdd(ws + r * Hq * F + m * C + get<1>(tQcQ(i)), acc_q(i));
        }
      }
      __syncthreads();  // sdO, sP free
    }
    if (has_keys && c + 1 < seg.part_end) {  // none after the part's last chunk
      if (k_nonfinite) {  // every key enters the state: phi(k) as it is
        phi_tile_to_smem<Tr>(p.feature_map, gK + s_base * p.k_stride.t, p.k_stride.t, key_valid,
                             sPhiK_ptr);
        __syncthreads();  // the restored tile is complete before the update reads it
      }
      rla_state_update_halves_if<Tr, kHalves>(mma, sS, sShi, sSlo, sPhiKt, sVt);
    }
  }
}

// ---------------------------------------------------------------------------------------
template <class Tr, class Smem = DynSmem<RlaBwdSmem<Tr>::kDkv>>
__global__ void __launch_bounds__(Tr::kNThreads, 1)
    rla_bwd_dkv_kernel(const RlaBwdParams p, const RlaBwdSegments segs, const float* gdS, float* wsK) {
  using namespace cute;
  using Element = typename Tr::Element;
  constexpr int C = Tr::kChunk, F = Tr::kFeat, D = Tr::kHeadDim, BV = Tr::kBlockV;
  constexpr int QF = Tr::kQFeat, kPartTiles = QF / C;  // 64-feature tiles per phi(q) part
  using Sm = RlaBwdSmem<Tr>;

  RATT_DYNAMIC_SMEM(char, smem_raw);
  float* sdS_ptr = reinterpret_cast<float*>(smem_raw);
  Element* sPhiK_ptr = reinterpret_cast<Element*>(smem_raw + Sm::kS);
  Element* sPhiQ_ptr = reinterpret_cast<Element*>(smem_raw + Sm::kS + Sm::kPhi);
  Element* sV_ptr = reinterpret_cast<Element*>(smem_raw + Sm::kS + Sm::kPhi + Sm::kPhiQ);
  Element* sdO_ptr = reinterpret_cast<Element*>(smem_raw + Sm::kS + Sm::kPhi + Sm::kPhiQ + Sm::kV);
  Element* sP_ptr =
      reinterpret_cast<Element*>(smem_raw + Sm::kS + Sm::kPhi + Sm::kPhiQ + 2 * Sm::kV);

  Tensor sdS = make_tensor(make_smem_ptr(sdS_ptr), row_major_padded<F, BV, Tr::kSStride>());      // (2D, BV)
  Tensor sdS_B = make_tensor(make_smem_ptr(sdS_ptr), row_major_padded_t<F, BV, Tr::kSStride>());  // (BV, 2D)
  Tensor sPhiK = make_tensor(make_smem_ptr(sPhiK_ptr), row_major_padded<C, F, Tr::kPhiStride>());  // (C keys, 2D)
  // phi(q) a part at a time: features [qp * QF, (qp + 1) * QF) (Tr::kQParts parts)
  Tensor sPhiQ = make_tensor(make_smem_ptr(sPhiQ_ptr), row_major_padded<C, QF, Tr::kQPhiStride>());  // (C q, QF)
  Tensor sPhiQt = make_tensor(make_smem_ptr(sPhiQ_ptr), row_major_padded_t<C, QF, Tr::kQPhiStride>());  // (QF, C q)
  Tensor sV = make_tensor(make_smem_ptr(sV_ptr), row_major_padded<C, BV, Tr::kVStride>());       // (C keys, BV)
  Tensor sdO = make_tensor(make_smem_ptr(sdO_ptr), row_major_padded<C, BV, Tr::kVStride>());     // (C q, BV)
  Tensor sdOt = make_tensor(make_smem_ptr(sdO_ptr), row_major_padded_t<C, BV, Tr::kVStride>());  // (BV, C q)
  Tensor sP = make_tensor(make_smem_ptr(sP_ptr), row_major_padded<C, C, Tr::kPStride>());        // (C q, C keys)
  Tensor sPt = make_tensor(make_smem_ptr(sP_ptr), row_major_padded_t<C, C, Tr::kPStride>());     // (C keys, C q)

  const int tid = threadIdx.x;
  const int64_t Hkv = p.dims.heads_kv, Hq = p.dims.heads_q, G = Hq / Hkv;
  const RlaSegmentCta seg = rla_segment_cta<C>(p, segs.chunks);
  if (p.packed()) RATT_COVER_ANY("packed");
  if (!seg.valid) {
    RATT_COVER_ANY("packed_idle_slot");
    return;  // a slot past the document's last segment (the whole CTA leaves)
  }
  const int64_t b = seg.b, hk = seg.hk, T = seg.T;
  const int col0 = blockIdx.x * BV;
  const int64_t w = p.window_size;
  const int64_t c_begin = seg.seg_begin, c_end = seg.seg_end;
  if (seg.z + 1 < seg.n_seg) RATT_COVER("later_segments");
  // token rows of the q/k-shaped workspaces and gradients (packed: all documents)
  const int64_t tokens = p.packed() ? p.dims.seqlen : p.dims.batch * p.dims.seqlen;
  // see rla_dk_slots (rla_launch.h): with G == 1 two slices share a slot
  const int64_t dk_slot = (G == 1) ? blockIdx.x / kRlaSlicesPerAtomicSlot : blockIdx.x;

  const Element* gQ = static_cast<const Element*>(p.q);
  const Element* gK = static_cast<const Element*>(p.k) + p.k_offset(p.k_stride, b, 0, hk);
  const Element* gV = static_cast<const Element*>(p.v) + p.k_offset(p.v_stride, b, 0, hk) + col0;
  const float* gdO = static_cast<const float*>(p.grad_out);
  Element* gdV = static_cast<Element*>(p.grad_v);           // [B, T, Hkv, D] contiguous
  const int64_t D2 = F;

  // dS = grad_final_state + every later segment's queries (rla_bwd_suffix_reduce_kernel)
  const float* gdS_z = gdS + segs.index(p, b, hk, Hkv, seg.z) * F * D + col0;
  for (int i = tid; i < F * BV; i += Tr::kNThreads) sdS(i / BV, i % BV) = gdS_z[(i / BV) * D + i % BV];

  typename Tr::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor tScS = thr.partition_C(make_identity_tensor(Shape<Int<C>, Int<C>>{}));   // (C, C)
  Tensor tVcV = thr.partition_C(make_identity_tensor(Shape<Int<C>, Int<BV>>{}));  // (C keys, BV)
  Tensor tSsP = thr.partition_C(sP);

  // A chunk whose last query sees no key (t1 <= w + 1) has no key gradients and updates no dS
  // (that needs key s_base in the chunk); such chunks are the sequence's first, so the walk down
  // stops at the segment's first chunk with keys. Per (chunk, head) the raw q rows and dO are
  // loaded into registers while the MMAs of the (chunk, head) before run.
  auto has_keys_of = [&](int64_t c) {
    const TileRange keys = rla_chunk_keys(c, C, T, w);
    return keys.end > keys.begin;
  };
  int64_t c_first = c_begin;  // the segment's first chunk with keys
  while (c_first < c_end && !has_keys_of(c_first)) ++c_first;
  if (c_first > c_begin) RATT_COVER("chunk_skipped");
  PhiRows<Tr> q_raw;
  DoRows<Tr> do_raw;
  auto rows_of = [&](int64_t c) { return static_cast<int>(imin(C, T - c * C)); };
  auto q_rows_of = [&](int64_t c, int64_t h) { return gQ + p.q_offset(p.q_stride, b, c * C, h); };
  auto load_q_do = [&](int64_t c, int64_t g) {
    const int64_t h = hk * G + g;
    const int rows = rows_of(c);
    load_phi_rows<Tr>(q_raw, q_rows_of(c, h), p.q_stride.t, [=](int i) { return i < rows; });
    load_do_rows<Tr>(do_raw, gdO + p.q_offset(p.grad_out_stride, b, c * C, h) + col0,
                     p.grad_out_stride.t, rows);
  };
  if (c_first < c_end) load_q_do(c_end - 1, 0);

  for (int64_t c = c_end - 1; c >= c_first; --c) {
    RATT_COVER("chunk_with_keys");
    const int64_t t0 = c * C;
    const int rows = rows_of(c);
    const TileRange keys = rla_chunk_keys(c, C, T, w);
    const int64_t s_base = t0 - w - 1;
    // The chunk's queries update dS only for an earlier key of this segment (the earlier
    // segments start from their own dS).
    const bool update_ds = c > c_begin && s_base > 0;
    auto key_valid = [&](int j) { return s_base + j >= keys.begin && s_base + j < keys.end; };
    // emu-mutants: redundant because the last shared reads of the previous chunk (sPhiQ, sdO,
    // sP, sV, sPhiK in its head loop) all precede that loop's closing barrier; kept as a
    // cheap guard for edits.
    __syncthreads();
    phi_tile_to_smem<Tr>(p.feature_map, gK + s_base * p.k_stride.t, p.k_stride.t, key_valid, sPhiK_ptr);
    load_v_tile<Tr>(gV + s_base * p.v_stride.t, p.v_stride.t, key_valid, sV_ptr);
    __syncthreads();

    Tensor acc_dv = partition_fragment_C(mma, Shape<Int<C>, Int<BV>>{});  // (C keys, BV)
    clear(acc_dv);
    // dv += phi(k) dS (dS = everything after this chunk)
    gemm_s_state_split(mma, acc_dv, sPhiK, sdS_B, sdS_B, false);
    if (G == 1) {
      RATT_COVER("dk_shared_slot");
    } else {
      RATT_COVER("dk_own_slot");
      if constexpr (Tr::kNVBlocks > 1) {
        if (blockIdx.x > 0) RATT_COVER("dk_second_slot");
      }
    }

    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hk * G + g;
      if (g > 0) RATT_COVER("group_head");
      auto q_valid = [&](int i) { return i < rows; };
      store_do_rows<Tr>(do_raw, sdO_ptr);
      // dphi(k) = P^T phi(q) (P = mask(dO v^T)) and dS += phi(q)^T dO take phi(q) a 64-feature
      // tile at a time; Pk = phi(q) phi(k)^T contracts over the features: each part adds its
      // share (the same MMAs in the same order as with phi(q) whole).
      Tensor acc_pk = partition_fragment_C(mma, Shape<Int<C>, Int<C>>{});  // (C q, C keys)
      clear(acc_pk);
      float* ws = wsK + ((dk_slot * tokens + p.k_row(b, s_base)) * Hkv + hk) * D2;  // key j: + j * Hkv * 2D
#pragma unroll 1
      for (int qp = 0; qp < Tr::kQParts; ++qp) {
        if (qp > 0) __syncthreads();  // every warp is done with the previous part
        const bool q_mine = store_phi_q_part<Tr>(p.feature_map, q_raw, q_valid, sPhiQ_ptr, qp);
        if (qp + 1 == Tr::kQParts) {  // the raw rows are stored: load the next (chunk, head)'s
          const bool last_head = g + 1 == G;
          if (!last_head || c > c_first) load_q_do(last_head ? c - 1 : c, last_head ? 0 : g + 1);
        }
        // the part (and sdO) complete; whether it holds a NaN / Inf (nan_tiles.cuh): P^T phi(q)
        // then takes it only into the keys j <= i query i sees, on the part with it zeroed.
        const bool q_nonfinite = __syncthreads_or(q_mine);
        uint64_t q_hits = 0;
        if (q_nonfinite) {
          q_hits = nonfinite_hits<kPartTiles, C>(tScS, sPhiQ_ptr, Tr::kQPhiStride, C,
                                                 [](int j, int i) { return j <= i; });
        }
        if (qp == 0) {  // P = mask(dO v^T) (C q, C keys), once per head
          Tensor acc_s = partition_fragment_C(mma, Shape<Int<C>, Int<C>>{});
          clear(acc_s);
          gemm_ss(mma, acc_s, sdO, sV);
          store_causal_mask(tSsP, tScS, acc_s);
          __syncthreads();  // sP complete; the hits are read
        } else if (q_nonfinite) {
          __syncthreads();  // the hits are read
        }
        if (q_nonfinite) {
          zero_nonfinite_tile<C, QF>(sPhiQ_ptr, Tr::kQPhiStride);
          __syncthreads();  // the part zeroed before the MMAs read it
        }
        // dphi(k)[:, tile mg] = P^T phi(q) (+ v dS^T for g = 0)  -> wsK (keys x 64 features)
#pragma unroll 1  // feature tiles one at a time: acc_dv, acc_pk stay live across the loops
        for (int m = 0; m < kPartTiles; ++m) {
          const int mg = qp * kPartTiles + m;  // the tile among the 2D features
          Tensor acc_k = partition_fragment_C(mma, Shape<Int<C>, Int<C>>{});
          clear(acc_k);
          gemm_ss(mma, acc_k, sPt, local_tile(sPhiQt, Shape<Int<C>, Int<C>>{}, make_coord(m, 0)));
          if (q_nonfinite) add_nan_hits(acc_k, q_hits, m * int(size(acc_k)));
          if (g == 0) {
            Tensor sdS_m = local_tile(sdS, Shape<Int<C>, Int<BV>>{}, make_coord(mg, 0));  // (64 feat, BV)
            gemm_s_state_split(mma, acc_k, sV, sdS_m, sdS_m, false);
          }
          CUTE_UNROLL
          for (int i = 0; i < size(acc_k); ++i) {
            const int j = get<0>(tScS(i));
            if (!key_valid(j)) continue;
            float* dst = ws + j * Hkv * D2 + mg * C + get<1>(tScS(i));
            if (G == 1) {
              atomicAdd(dst, acc_k(i));  // two value slices share the slot
            } else {
              *dst += acc_k(i);  // own slot: this thread adds head g after head g - 1
            }
          }
        }
        if (q_nonfinite) {  // dv and dS take phi(q) as it is
          __syncthreads();  // every read of the zeroed part done
          // from global: after the last part the registers hold the next tile's rows
          phi_q_part_to_smem<Tr>(p.feature_map, q_rows_of(c, h), p.q_stride.t, q_valid, sPhiQ_ptr, qp);
          __syncthreads();  // the restored part is complete before it is read
        }
        gemm_ss(mma, acc_pk, sPhiQ, local_tile(sPhiK, Shape<Int<C>, Int<QF>>{}, make_coord(0, qp)));
        if (update_ds) {
          // dS += phi(q)^T dO on the part's tiles (dH0 is rla_bwd_state_kernel's: per head and
          // segment). Head 0 read those rows of dS above (its dphi(k) state term) in every
          // warp; later heads read no dS.
          RATT_COVER("ds_update");
          if (g == 0) __syncthreads();  // every read of dS for this chunk is done
#pragma unroll 1
          for (int m = 0; m < kPartTiles; ++m) {
            Tensor sdS_m = local_tile(sdS, Shape<Int<C>, Int<BV>>{}, make_coord(qp * kPartTiles + m, 0));
            Tensor tUsS = thr.partition_C(sdS_m);
            Tensor acc_u = partition_fragment_C(mma, Shape<Int<C>, Int<BV>>{});
            clear(acc_u);
            gemm_ss(mma, acc_u, local_tile(sPhiQt, Shape<Int<C>, Int<C>>{}, make_coord(m, 0)), sdOt);
            CUTE_UNROLL
            for (int i = 0; i < size(acc_u); ++i) tUsS(i) += acc_u(i);
          }
        }
      }
      // Pk = mask(phi(q) phi(k)^T);  dv += Pk^T dO. sP is free once every part's dphi(k) read it.
      __syncthreads();  // sP (dO v^T) consumed
      store_causal_mask(tSsP, tScS, acc_pk);
      __syncthreads();  // sP complete
      gemm_ss(mma, acc_dv, sPt, sdOt);
      __syncthreads();  // sPhiQ, sdO, sP free for the next head
    }
    Element* dv = gdV + (p.k_row(b, s_base) * Hkv + hk) * D + col0;
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dv); ++i) {
      const int j = get<0>(tVcV(i));
      if (key_valid(j)) dv[j * Hkv * D + get<1>(tVcV(i))] = Element(acc_dv(i));
    }
  }
}

// ---------------------------------------------------------------------------------------
// dq / dk from the workspaces: one warp per row, the feature-map backward of
// core/feature_map.h with phi recomputed from the raw row. Rows [0, B*T*Hq) are q rows,
// the rest k rows (dk sums the wsK slots in order).
template <class Tr>
__global__ void __launch_bounds__(256) rla_bwd_phi_postprocess_kernel(const RlaBwdParams p, const float* wsQ,
                                                          const float* wsK) {
  using Element = typename Tr::Element;
  constexpr int D = Tr::kHeadDim, E = D / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  // Packed: the rows of all documents as one sequence (the feature map is per row).
  const int64_t B = p.packed() ? 1 : p.dims.batch;
  const int64_t T = p.dims.seqlen, Hq = p.dims.heads_q, Hkv = p.dims.heads_kv;
  const int64_t G = Hq / Hkv;
  const int64_t n_q = B * T * Hq, n_k = B * T * Hkv;
  if (row >= n_q + n_k) return;
  const bool is_q = row < n_q;
  const int64_t r = is_q ? row : row - n_q;
  const int64_t H = is_q ? Hq : Hkv;
  const int64_t bb = r / (T * H), t = (r / H) % T, hh = r % H;
  const Element* x_row =
      is_q ? static_cast<const Element*>(p.q) + bb * p.q_stride.b + t * p.q_stride.t + hh * p.q_stride.h
           : static_cast<const Element*>(p.k) + bb * p.k_stride.b + t * p.k_stride.t + hh * p.k_stride.h;
  float x[E], y1[E], y2[E], dy1[E], dy2[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    x[e] = float(x_row[lane * E + e]);
    dy1[e] = dy2[e] = 0.f;
  }
  // the workspace slots (rla_dq_slots, rla_dk_slots), added in slot order
  const int64_t n_slots = is_q ? rla_dq_slots(Tr::kNVBlocks) : rla_dk_slots(G, Tr::kNVBlocks);
  const float* ws = is_q ? wsQ + r * 2 * D : wsK + r * 2 * D;
  const int64_t slot_floats = (is_q ? n_q : n_k) * 2 * D;  // [B, T, H, 2D]
  if (is_q) {
    RATT_COVER("q_row");
    if constexpr (rla_dq_slots(Tr::kNVBlocks) > 1) RATT_COVER("several_dq_slots");
  } else {
    RATT_COVER("k_row");
    if constexpr (Tr::kNVBlocks > 1) {
      if (n_slots > 1) RATT_COVER("several_dk_slots");
    }
  }
  for (int64_t s = 0; s < n_slots; ++s) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      dy1[e] += ws[s * slot_floats + lane * E + e];
      dy2[e] += ws[s * slot_floats + D + lane * E + e];
    }
  }
  float dx[E];
  if (p.feature_map == FeatureMap::kRelu) {
    RATT_COVER("relu");
#pragma unroll
    for (int e = 0; e < E; ++e) dx[e] = (x[e] > 0.f ? dy1[e] : 0.f) - (x[e] < 0.f ? dy2[e] : 0.f);
  } else {
    RATT_COVER("softmax");
    softmax_phi_lane<E>(x, y1, y2);
    float dp = 0.f, dn = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      dp += dy1[e] * y1[e];
      dn += dy2[e] * y2[e];
    }
    dp = lanes_sum(dp);
    dn = lanes_sum(dn);
#pragma unroll
    for (int e = 0; e < E; ++e) dx[e] = y1[e] * (dy1[e] - dp) - y2[e] * (dy2[e] - dn);
  }
  Element* out = static_cast<Element*>(is_q ? p.grad_q : p.grad_k) + r * D;  // contiguous
#pragma unroll
  for (int e = 0; e < E; ++e) out[lane * E + e] = Element(dx[e]);
}

}  // namespace rattention::cuda
