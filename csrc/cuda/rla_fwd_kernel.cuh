// RLA forward: chunked linear attention over the keys outside the window (SPEC.md Branch 2).
//
// Three passes, so the sequence is split across CTAs too (segments of checkpoint_every
// chunks; this is what makes small B * Hkv fill the GPU at long T):
// Packed batches: grid (D/BV, Hkv, checkpoint slots), a document's segments at its slots
// (RlaCommonParams::ckpt_slot0, rla_segment_cta); every document starts from zero / its H0.
//   1. rla_fwd_state_kernel, grid (D/BV, B*Hkv, n_ckpt): the local state sum of each segment
//      (sum of phi(k)^T v over its chunks) into checkpoint slot z + 1 (last: final_state);
//   2. rla_fwd_prefix_reduce_kernel: prefix sum over the segments in place -> checkpoints hold the
//      state at each segment start, final_state the state after all tokens;
//   3. rla_fwd_kernel, grid (D/BV, B*Hkv, n_ckpt): outputs. A CTA starts from its segment's
//      checkpoint and keeps its slice of the fp32 state S [2D, kBlockV] in shared memory.
// Chunk c covers query rows t = t0 + i (i < C). Its shifted keys are s = t0 - w - 1 + j
// (core/window.h rla_chunk_keys), so query i sees in-chunk key j iff i >= j (t - s >= w + 1)
// and every key of earlier chunks through S. Per chunk:
//   sPhiK = phi(k[s]) (zero rows for s < 0 or s >= T - w - 1), sV = v[s][cols]
//   for each query head h of the group:
//     sPhiQ = phi(q_h[t]) (Tr::kQParts parts of the features, one after another)
//     o = sPhiQ (S + H0_h)   (S + H0 split into hi+lo for the MMA; see kHalves below)
//     P = mask_{i>=j}(sPhiQ sPhiK^T)  (C x C, in the phi(q) buffer once it is read)
//     o += P sV
//   S += sPhiK^T sV                                                  (2D x kBlockV)
// Checkpoints hold S at the start of chunks 0, every, 2*every, ... (without H0).
// kHalves (where the device has the shared memory, rla_plan.h rla_state_halves_fit): the
// state's hi and lo halves stay in sShi / sSlo beside the fp32 sS, rewritten by every state
// update, and o = sPhiQ (hi + lo) runs on ldmatrix operands (gemm_ss_halves: the MMAs and
// their order of the element-wise split, so without H0 the outputs are bit for bit those of
// !kHalves). H0 leaves that K loop: with one query head per kv head it is added into sS once
// at the segment start (S + H0 then grows by the updates); with G > 1 each head adds its
// phi(q) H0_h as a product of its own.
#pragma once
#include "core/window.h"
#include "nan_tiles.cuh"
#include "rla_traits.cuh"

namespace rattention::cuda {

template <class Tr, bool kHalves,
          class Smem = DynSmem<kHalves ? Tr::kSmemFwdHalves : Tr::kSmemFwd>>
__global__ void __launch_bounds__(Tr::kNThreads, 1) rla_fwd_kernel(const RlaFwdParams p,
                                                                    const int64_t parts) {
  using namespace cute;
  using Element = typename Tr::Element;
  constexpr int C = Tr::kChunk, F = Tr::kFeat, D = Tr::kHeadDim, BV = Tr::kBlockV;

  constexpr int QF = Tr::kQFeat;  // features of phi(q) per part (Tr::kQParts of them)

  RATT_DYNAMIC_SMEM(char, smem_raw);
  float* sS_ptr = reinterpret_cast<float*>(smem_raw);
  Element* sPhiK_ptr = reinterpret_cast<Element*>(smem_raw + Tr::kSmemS);
  // phi(q) (a part of it), then the head's P tile in the same buffer
  Element* sPhiQ_ptr = reinterpret_cast<Element*>(smem_raw + Tr::kSmemS + Tr::kSmemPhi);
  Element* sP_ptr = sPhiQ_ptr;
  Element* sV_ptr =
      reinterpret_cast<Element*>(smem_raw + Tr::kSmemS + Tr::kSmemPhi + Tr::kSmemPhiQP);
  // the state's halves (kHalves only: the buffers past kSmemFwd)
  Element* sShi_ptr = reinterpret_cast<Element*>(smem_raw + Tr::kSmemFwd);
  Element* sSlo_ptr = reinterpret_cast<Element*>(smem_raw + Tr::kSmemFwd + Tr::kSmemHalf);

  // Shared-memory views. Names: s<Buffer>, suffix says which GEMM role the view plays.
  Tensor sS = make_tensor(make_smem_ptr(sS_ptr), row_major_padded<F, BV, Tr::kSStride>());  // (2D, BV)
  Tensor sS_B = make_tensor(make_smem_ptr(sS_ptr), row_major_padded_t<F, BV, Tr::kSStride>());  // (BV, 2D)
  Tensor sPhiQ = make_tensor(make_smem_ptr(sPhiQ_ptr), row_major_padded<C, QF, Tr::kQPhiStride>());  // (C, QF)
  Tensor sPhiK = make_tensor(make_smem_ptr(sPhiK_ptr), row_major_padded<C, F, Tr::kPhiStride>());  // (C keys, 2D)
  Tensor sPhiKt = make_tensor(make_smem_ptr(sPhiK_ptr), row_major_padded_t<C, F, Tr::kPhiStride>());  // (2D, C keys)
  Tensor sVt = make_tensor(make_smem_ptr(sV_ptr), row_major_padded_t<C, BV, Tr::kVStride>());  // (BV, C keys)
  Tensor sP = make_tensor(make_smem_ptr(sP_ptr), row_major_padded<C, C, Tr::kPStride>());  // (C, C keys)
  Tensor sShi = make_tensor(make_smem_ptr(sShi_ptr), row_major_padded<F, BV, Tr::kHalfStride>());  // (2D, BV)
  Tensor sSlo = make_tensor(make_smem_ptr(sSlo_ptr), row_major_padded<F, BV, Tr::kHalfStride>());  // (2D, BV)
  Tensor sShi_B = make_tensor(make_smem_ptr(sShi_ptr), row_major_padded_t<F, BV, Tr::kHalfStride>());  // (BV, 2D)
  Tensor sSlo_B = make_tensor(make_smem_ptr(sSlo_ptr), row_major_padded_t<F, BV, Tr::kHalfStride>());  // (BV, 2D)

  const int tid = threadIdx.x;
  const int64_t G = p.dims.heads_q / p.dims.heads_kv;
  const RlaSegmentCta seg = rla_segment_cta<C>(p, p.checkpoint_every, parts);
  if (p.packed()) RATT_COVER_ANY("packed");
  if (!seg.valid) {
    RATT_COVER_ANY("packed_idle_slot");
    return;  // a checkpoint slot past the document's last segment (the whole CTA leaves)
  }
  if (seg.part_begin >= seg.part_end) {
    RATT_COVER_ANY("empty_part");
    return;  // a part past a short last segment (the whole CTA leaves)
  }
  if (seg.part > 0) RATT_COVER_ANY("later_part");
  const int64_t b = seg.b, hk = seg.hk, T = seg.T;
  const int col0 = blockIdx.x * BV;
  const int64_t w = p.window_size;
  const int64_t z = seg.z;

  const Element* gQ = static_cast<const Element*>(p.q);
  const Element* gK = static_cast<const Element*>(p.k) + p.k_offset(p.k_stride, b, 0, hk);
  const Element* gV = static_cast<const Element*>(p.v) + p.k_offset(p.v_stride, b, 0, hk) + col0;
  float* gOut = static_cast<float*>(p.out);
  const float* gH0 = static_cast<const float*>(p.initial_state);
  const float* gCkpt =
      static_cast<const float*>(p.checkpoints) + p.ckpt_index(b, hk, z) * F * D + col0;

  const bool has_h0 = gH0 != nullptr;
  // kHalves with one query head: H0 joins S here, once (its halves then carry it)
  const bool h0_in_state = kHalves && has_h0 && G == 1;
  if constexpr (kHalves) {
    if (h0_in_state) RATT_COVER("h0_in_state");
  }

  // S = the state at the segment start (written by passes 1 and 2), and its halves.
  load_state_start<Tr, kHalves>(
      gCkpt, h0_in_state ? gH0 + b * p.initial_state_bstride + hk * F * D + col0 : nullptr, sS,
      sShi, sSlo);

  typename Tr::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  // Coordinates of accumulator entries: (row, col) of a (C, C) / (C, BV) tile.
  Tensor tScS = thr.partition_C(make_identity_tensor(Shape<Int<C>, Int<C>>{}));
  Tensor tOcO = thr.partition_C(make_identity_tensor(Shape<Int<C>, Int<BV>>{}));
  Tensor tSsP = thr.partition_C(sP);

  // From the checkpoint: the chunks before this CTA's part only advance S, then the part's
  // chunks [part_begin, part_end) write outputs.
  for (int64_t c = seg.seg_begin; c < seg.part_end; ++c) {
    const int64_t t0 = c * C;
    const int rows = static_cast<int>(imin(C, T - t0));
    const TileRange keys = rla_chunk_keys(c, C, T, w);  // valid shifted keys [begin, end)
    const int64_t s_base = t0 - w - 1;                  // key of row j is s_base + j
    const bool has_keys = keys.end > keys.begin;
    const bool has_state = s_base > 0 || h0_in_state;  // S (+ H0) may be nonzero
    __syncthreads();  // S is final for this chunk start; sPhiK/sV free
    // The raw q rows of the next phi(q) tile, loaded ahead: the first head's here, with the
    // keys' and values' loads in flight; each next head's behind the GEMMs of the one before.
    auto row_valid = [&](int i) { return i < rows; };
    auto q_rows_of = [&](int64_t g) { return gQ + p.q_offset(p.q_stride, b, t0, hk * G + g); };
    PhiRows<Tr> q_next;
    if (c >= seg.part_begin) load_phi_rows<Tr>(q_next, q_rows_of(0), p.q_stride.t, row_valid);
    bool v_mine = false;  // a NaN / Inf value this thread loaded (zeroed in sV; nan_tiles.cuh)
    if (has_keys) {
      RATT_COVER("chunk_with_keys");
      auto key_valid = [&](int j) { return s_base + j >= keys.begin && s_base + j < keys.end; };
      // Pointers of invalid rows are never dereferenced (predicated by key_valid).
      phi_tile_to_smem<Tr>(p.feature_map, gK + s_base * p.k_stride.t, p.k_stride.t, key_valid,
                           sPhiK_ptr);
      if (c < seg.part_begin) {  // the state update alone takes the values as they are
        load_v_tile<Tr>(gV + s_base * p.v_stride.t, p.v_stride.t, key_valid, sV_ptr);
      } else {
        v_mine = load_v_tile<Tr, /*zero_nonfinite=*/true>(gV + s_base * p.v_stride.t,
                                                          p.v_stride.t, key_valid, sV_ptr);
      }
    } else {
      RATT_COVER("chunk_without_keys");
    }
    if (c < seg.part_begin) {  // before the part: only the state advances
      if (has_keys) {
        RATT_COVER_ANY("advance_state");
        __syncthreads();  // sPhiK, sV complete
        rla_state_update_halves_if<Tr, kHalves>(mma, sS, sShi, sSlo, sPhiKt, sVt);
      }
      continue;
    }

    bool v_nonfinite = false;
    if (s_base > 0) RATT_COVER("inter_chunk_state");
    if (has_h0) {
      RATT_COVER("h0");
    } else {
      RATT_COVER("no_h0");
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hk * G + g;
      if (g > 0) RATT_COVER("group_head");
      const float* h0 = has_h0 ? gH0 + b * p.initial_state_bstride + h * F * D + col0 : gH0;
      const bool h0_per_head = has_h0 && !h0_in_state;  // phi(q) H0_h of its own
      Tensor gH0_B = make_tensor(make_gmem_ptr(h0), make_layout(make_shape(Int<BV>{}, Int<F>{}),
                                                                make_stride(_1{}, Int<D>{})));  // (BV, 2D)
      Tensor acc_o = partition_fragment_C(mma, Shape<Int<C>, Int<BV>>{});  // (MMA, MMA_M, MMA_N)
      Tensor acc_s = partition_fragment_C(mma, Shape<Int<C>, Int<C>>{});   // phi(q) phi(k)^T
      clear(acc_o);
      clear(acc_s);
      // phi(q) a part at a time (Tr::kQParts; one: all of it). Both products contract over
      // the features, so each part adds its share:
      //   o = phi(q) (S + H0_h)  (inter-chunk; the fp32 sum split into hi + lo)
      //   s = phi(q) phi(k)^T    (intra-chunk scores)
      // kHalves: o = phi(q) (hi + lo) from sShi / sSlo, then (G > 1) + phi(q) H0_h.
#pragma unroll 1
      for (int qp = 0; qp < Tr::kQParts; ++qp) {
        if (qp > 0) __syncthreads();  // every warp is done with the previous part
        store_phi_q_part<Tr>(p.feature_map, q_next, row_valid, sPhiQ_ptr, qp);
        if (qp + 1 == Tr::kQParts && g + 1 < G) {  // the parts share the rows; then the next head's
          load_phi_rows<Tr>(q_next, q_rows_of(g + 1), p.q_stride.t, row_valid);
        }
        // the part (and sPhiK, sV for g == 0) complete; whether sV had NaN / Inf values
        v_nonfinite = __syncthreads_or(v_mine);
        if (has_keys) {
          gemm_ss(mma, acc_s, sPhiQ, local_tile(sPhiK, Shape<Int<C>, Int<QF>>{}, make_coord(0, qp)));
        }
        auto gH0_part = local_tile(gH0_B, Shape<Int<BV>, Int<QF>>{}, make_coord(0, qp));
        if constexpr (kHalves) {
          if (has_state) {
            gemm_ss_halves(mma, acc_o, sPhiQ,
                           local_tile(sShi_B, Shape<Int<BV>, Int<QF>>{}, make_coord(0, qp)),
                           local_tile(sSlo_B, Shape<Int<BV>, Int<QF>>{}, make_coord(0, qp)));
          }
          if (h0_per_head) {
            RATT_COVER("h0_per_head");
            gemm_s_state_split(mma, acc_o, sPhiQ, gH0_part, gH0_part, false);
          }
        } else if (has_state || has_h0) {
          gemm_s_state_split(mma, acc_o, sPhiQ,
                             local_tile(sS_B, Shape<Int<BV>, Int<QF>>{}, make_coord(0, qp)),
                             gH0_part, has_h0);
        }
      }
      if (has_keys) {
        // Intra-chunk: P = mask(s), o += P v. sP takes the phi(q) buffer.
        __syncthreads();  // every warp is done with phi(q)
        store_causal_mask(tSsP, tScS, acc_s);  // key j <= row i
        // the two warps of a row block wrote half of its sP columns each; all are read below
        __syncthreads();  // sP complete
        gemm_ss(mma, acc_o, sP, sVt);
        if (v_nonfinite) {  // their terms, only for the rows i >= j the mask lets in
          add_nonfinite_entries<true>(acc_o, tOcO, gV + s_base * p.v_stride.t, p.v_stride.t, C,
                                      0, 0, [&](int i, int j) {
            return j <= i && s_base + j >= keys.begin && s_base + j < keys.end;
          });
        }
      }
      float* o = gOut + p.q_offset(p.out_stride, b, t0, h) + col0;
      CUTE_UNROLL
      for (int i = 0; i < size(acc_o); ++i) {
        const int r = get<0>(tOcO(i));
        if (r < rows) o[r * p.out_stride.t + get<1>(tOcO(i))] = acc_o(i);
      }
      __syncthreads();  // sPhiQ, sP free for the next head; S reads done
    }

    if (has_keys && c + 1 < seg.part_end) {  // the part's last update would go unread
      if (v_nonfinite) {  // every key enters the state: the values as they are
        load_v_tile<Tr>(gV + s_base * p.v_stride.t, p.v_stride.t, [&](int j) {
          return s_base + j >= keys.begin && s_base + j < keys.end;
        }, sV_ptr);
        __syncthreads();  // the restored tile is complete before the update reads it
      }
      RATT_COVER("state_update");
      rla_state_update_halves_if<Tr, kHalves>(mma, sS, sShi, sSlo, sPhiKt, sVt);
    }
  }
}

// Pass 1: the local state sum of segment z (chunks [z*every, (z+1)*every)), from zero.
// One part per segment (parts == 1): written to checkpoint slot z + 1, or to final_state for
// the last segment; the z == 0 CTA also writes slot 0 (the state at the start is empty).
// Several (dense only): the sum of the part's chunks to sums [B * Hkv, n_ckpt, parts, 2D, D]
// (an empty part writes zeros), which pass 2 reduces.
template <class Tr, class Smem = DynSmem<Tr::kSmemState>>
__global__ void __launch_bounds__(Tr::kNThreads, 1)
    rla_fwd_state_kernel(const RlaFwdParams p, const int64_t parts, float* sums) {
  using namespace cute;
  using Element = typename Tr::Element;
  constexpr int C = Tr::kChunk, F = Tr::kFeat, D = Tr::kHeadDim, BV = Tr::kBlockV;
  RATT_DYNAMIC_SMEM(char, smem_raw);
  float* sS_ptr = reinterpret_cast<float*>(smem_raw);
  Element* sPhiK_ptr = reinterpret_cast<Element*>(smem_raw + Tr::kSmemS);
  Element* sV_ptr = reinterpret_cast<Element*>(smem_raw + Tr::kSmemS + Tr::kSmemPhi);
  Tensor sS = make_tensor(make_smem_ptr(sS_ptr), row_major_padded<F, BV, Tr::kSStride>());              // (2D, BV)
  Tensor sPhiKt = make_tensor(make_smem_ptr(sPhiK_ptr), row_major_padded_t<C, F, Tr::kPhiStride>());  // (2D, C keys)
  Tensor sVt = make_tensor(make_smem_ptr(sV_ptr), row_major_padded_t<C, BV, Tr::kVStride>());        // (BV, C keys)

  const int tid = threadIdx.x;
  const int64_t Hkv = p.dims.heads_kv;
  const RlaSegmentCta seg = rla_segment_cta<C>(p, p.checkpoint_every, parts);
  if (p.packed()) RATT_COVER_ANY("packed");
  if (!seg.valid) {
    RATT_COVER_ANY("packed_idle_slot");
    return;  // a checkpoint slot past the document's last segment (the whole CTA leaves)
  }
  const int64_t b = seg.b, hk = seg.hk, T = seg.T;
  const int col0 = blockIdx.x * BV;
  const int64_t w = p.window_size;
  const int64_t n_ckpt = seg.n_seg;
  const int64_t z = seg.z;
  const Element* gK = static_cast<const Element*>(p.k) + p.k_offset(p.k_stride, b, 0, hk);
  const Element* gV = static_cast<const Element*>(p.v) + p.k_offset(p.v_stride, b, 0, hk) + col0;
  float* gCkpt = static_cast<float*>(p.checkpoints) + p.ckpt_index(b, hk, 0) * F * D + col0;
  float* gDst;
  if (parts > 1) {
    RATT_COVER_ANY("to_part_sum");
    gDst = sums + (((b * Hkv + hk) * n_ckpt + z) * parts + seg.part) * F * D + col0;
  } else if (z + 1 < n_ckpt) {
    RATT_COVER_ANY("to_checkpoint");
    gDst = gCkpt + (z + 1) * F * D;
  } else {
    RATT_COVER("to_final_state");
    gDst = static_cast<float*>(p.final_state) + (b * Hkv + hk) * F * D + col0;
  }

  for (int i = tid; i < F * BV; i += Tr::kNThreads) sS(i / BV, i % BV) = 0.f;
  if (z == 0 && parts == 1) {
    for (int i = tid; i < F * BV; i += Tr::kNThreads) gCkpt[(i / BV) * D + i % BV] = 0.f;
  }
  typename Tr::TiledMma mma;
  // The part's chunks with keys (the others add nothing), each one's raw k rows and values
  // loaded into registers while the state update of the one before runs.
  auto next_with_keys = [&](int64_t c) {  // uniform: no key of a chunk skipped enters the state
    for (; c < seg.part_end; ++c) {
      const TileRange keys = rla_chunk_keys(c, C, T, w);
      if (keys.end > keys.begin) break;
    }
    return c;
  };
  auto key_valid_of = [&](int64_t c) {
    const TileRange keys = rla_chunk_keys(c, C, T, w);
    const int64_t s_base = c * C - w - 1;
    return [=](int j) { return s_base + j >= keys.begin && s_base + j < keys.end; };
  };
  PhiRows<Tr> k_rows;
  VRows<Tr> v_rows;
  auto load_chunk = [&](int64_t c) {
    const int64_t s_base = c * C - w - 1;
    load_phi_rows<Tr>(k_rows, gK + s_base * p.k_stride.t, p.k_stride.t, key_valid_of(c));
    load_v_rows<Tr>(v_rows, gV + s_base * p.v_stride.t, p.v_stride.t, key_valid_of(c));
  };
  int64_t c = next_with_keys(seg.part_begin);
  if (c > seg.part_begin) RATT_COVER("chunk_without_keys");
  if (c < seg.part_end) load_chunk(c);
  while (c < seg.part_end) {
    RATT_COVER("chunk_with_keys");
    __syncthreads();  // previous update done with sPhiK / sV
    store_phi_rows<Tr>(p.feature_map, k_rows, key_valid_of(c), sPhiK_ptr);
    store_v_rows<Tr>(v_rows, sV_ptr);
    const int64_t next = next_with_keys(c + 1);
    if (next > c + 1) RATT_COVER("chunk_without_keys");
    if (next < seg.part_end) load_chunk(next);
    __syncthreads();
    rla_state_update<Tr>(mma, sS, sPhiKt, sVt);
    c = next;
  }
  __syncthreads();
  for (int i = tid; i < F * BV; i += Tr::kNThreads) gDst[(i / BV) * D + i % BV] = sS(i / BV, i % BV);
}

// Pass 2, per state element, fixed order (deterministic). One part per segment: in place,
// ckpt[z] = sum_{y < z} local[y] (slot 0 is zero), final = ckpt[n-1] + local[n-1]. Several:
// ckpt[z] = the sum of all part sums of the segments before z, final = all of them. An empty
// document has no segment; its final state is the zero the launcher wrote.
static __global__ void __launch_bounds__(256)
    rla_fwd_prefix_reduce_kernel(const RlaFwdParams p, const int64_t parts, const float* sums) {
  const int64_t D = p.dims.head_dim, F = 2 * D;
  const int64_t per_head = F * D;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.dims.batch * p.dims.heads_kv * per_head) return;
  const int64_t bh = i / per_head, e = i % per_head;
  const int64_t b = bh / p.dims.heads_kv, hk = bh % p.dims.heads_kv;
  const int64_t n_ckpt =
      rla_num_checkpoints(ceil_div(p.seqlen_q(b), p.chunk_size), p.checkpoint_every);
  if (n_ckpt == 0) {
    RATT_COVER_ANY("packed_empty_document");
    return;
  }
  float* ck = static_cast<float*>(p.checkpoints) + p.ckpt_index(b, hk, 0) * per_head + e;
  if (n_ckpt > 1) {
    RATT_COVER_ANY("several_segments");
  } else {
    RATT_COVER("one_segment");
  }
  float* final_state = static_cast<float*>(p.final_state) + bh * per_head + e;
  float run = 0.f;
  if (parts > 1) {
    RATT_COVER_ANY("part_sums");
    const float* part = sums + bh * n_ckpt * parts * per_head + e;
    for (int64_t z = 0; z < n_ckpt; ++z) {
      ck[z * per_head] = run;
      for (int64_t k = 0; k < parts; ++k) run += part[(z * parts + k) * per_head];
    }
    *final_state = run;
    return;
  }
  for (int64_t z = 1; z < n_ckpt; ++z) {
    run += ck[z * per_head];
    ck[z * per_head] = run;
  }
  *final_state += run;
}

}  // namespace rattention::cuda
