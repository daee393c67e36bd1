// RLA backward, the suffix state of the dk/dv pass at every segment start (rla_bwd_kernel.cuh
// has the formulas). With the segments of RlaBwdSegments (chunks [z * n, (z + 1) * n)):
//   dS_z = grad_final_state + sum_{y > z} L_y,   L_y = sum over segment y's chunks and the
//          kv group's query heads of phi(q)^T dO          (fp32, in the shifted-key frame)
// which is what rla_bwd_dkv_kernel needs to walk segment z alone: it depends on no forward
// state, so the cut is free of checkpoint_every.
// 1. rla_bwd_state_kernel, grid (D/BV, B*Hkv, slots) (packed (D/BV, Hkv, slots)): L_z of its
//    value slice into dS slot z; with an initial state also every head's own segment sum
//    (the dH0 partial of (head, segment)), since dH0_h = sum over all tokens of
//    phi(q_h)^T dO_h no longer has one CTA walking all of them.
// 2. rla_bwd_suffix_reduce_kernel, a thread per state element: in place, the reverse exclusive
//    scan over the segments (slot z <- grad_final + later slots) and dH0_h = the sum of its
//    partials over the segments, both in a fixed order, so the backward stays deterministic.
#pragma once
#include "core/window.h"
#include "rla_traits.cuh"

namespace rattention::cuda {

// Only chunks whose queries can see a key before the chunk (s_base > 0) add to L: a later
// chunk's query sees every key of an earlier chunk, and before such a chunk there is none.
template <class Tr, class Smem = DynSmem<RlaBwdSmem<Tr>::kState>>
__global__ void __launch_bounds__(Tr::kNThreads, 1)
    rla_bwd_state_kernel(const RlaBwdParams p, const RlaBwdSegments segs, float* gdS,
                         float* gdH0part) {
  using namespace cute;
  using Element = typename Tr::Element;
  constexpr int C = Tr::kChunk, F = Tr::kFeat, D = Tr::kHeadDim, BV = Tr::kBlockV;
  using Sm = RlaBwdSmem<Tr>;

  RATT_DYNAMIC_SMEM(char, smem_raw);
  float* sL_ptr = reinterpret_cast<float*>(smem_raw);
  Element* sPhiQ_ptr = reinterpret_cast<Element*>(smem_raw + Sm::kS);
  Element* sdO_ptr = reinterpret_cast<Element*>(smem_raw + Sm::kS + Sm::kPhi);
  Tensor sL = make_tensor(make_smem_ptr(sL_ptr), row_major_padded<F, BV, Tr::kSStride>());  // (2D, BV)
  Tensor sPhiQt = make_tensor(make_smem_ptr(sPhiQ_ptr), row_major_padded_t<C, F, Tr::kPhiStride>());  // (2D, C q)
  Tensor sdOt = make_tensor(make_smem_ptr(sdO_ptr), row_major_padded_t<C, BV, Tr::kVStride>());  // (BV, C q)

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
  const Element* gQ = static_cast<const Element*>(p.q);
  const float* gdO = static_cast<const float*>(p.grad_out);
  const bool has_h0 = gdH0part != nullptr;

  for (int i = tid; i < F * BV; i += Tr::kNThreads) sL(i / BV, i % BV) = 0.f;

  typename Tr::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor tUcU = thr.partition_C(make_identity_tensor(Shape<Int<C>, Int<BV>>{}));  // (64 feat, BV)

  // The chunks that add to L or to the dH0 partials (to_state: their queries see a key before
  // the chunk; uniform over the CTA), and per (chunk, head) the raw q rows and dO loaded into
  // registers while the MMAs of the (chunk, head) before run.
  auto to_state_of = [&](int64_t c) { return c * C - w - 1 > 0; };
  auto next_chunk = [&](int64_t c) {
    while (c < c_end && !to_state_of(c) && !has_h0) ++c;
    return c;
  };
  PhiRows<Tr> q_rows;
  DoRows<Tr> do_rows;
  auto rows_of = [&](int64_t c) { return static_cast<int>(imin(C, T - c * C)); };
  auto load_tile = [&](int64_t c, int64_t g) {
    const int64_t t0 = c * C, h = hk * G + g;
    const int rows = rows_of(c);
    load_phi_rows<Tr>(q_rows, gQ + p.q_offset(p.q_stride, b, t0, h), p.q_stride.t,
                      [=](int i) { return i < rows; });
    load_do_rows<Tr>(do_rows, gdO + p.q_offset(p.grad_out_stride, b, t0, h) + col0,
                     p.grad_out_stride.t, rows);
  };
  int64_t c = next_chunk(c_begin);
  if (c > c_begin) RATT_COVER("chunk_skipped");
  if (c < c_end) load_tile(c, 0);
  while (c < c_end) {
    const int rows = rows_of(c);
    const bool to_state = to_state_of(c);
    if (to_state) RATT_COVER("chunk_to_state");
    const int64_t c_next = next_chunk(c + 1);
    if (c_next > c + 1) RATT_COVER("chunk_skipped");
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hk * G + g;
      if (g > 0) RATT_COVER("group_head");
      __syncthreads();  // the previous head's MMAs are done reading sPhiQ, sdO (and sL is zeroed)
      store_phi_rows<Tr>(p.feature_map, q_rows, [&](int i) { return i < rows; }, sPhiQ_ptr);
      store_do_rows<Tr>(do_rows, sdO_ptr);
      if (g + 1 < G) {
        load_tile(c, g + 1);
      } else if (c_next < c_end) {
        load_tile(c_next, 0);
      }
      __syncthreads();  // sPhiQ, sdO complete
      float* part = has_h0 ? gdH0part + segs.index(p, b, h, Hq, seg.z) * F * D + col0 : nullptr;
      if (has_h0) RATT_COVER("h0_partial");
#pragma unroll 1
      for (int m = 0; m < F / C; ++m) {
        Tensor tUsL = thr.partition_C(local_tile(sL, Shape<Int<C>, Int<BV>>{}, make_coord(m, 0)));
        Tensor acc_u = partition_fragment_C(mma, Shape<Int<C>, Int<BV>>{});  // (64 feat, BV)
        clear(acc_u);
        gemm_ss(mma, acc_u, local_tile(sPhiQt, Shape<Int<C>, Int<C>>{}, make_coord(m, 0)), sdOt);
        if (to_state) {
          CUTE_UNROLL
          for (int i = 0; i < size(acc_u); ++i) tUsL(i) += acc_u(i);
        }
        if (part != nullptr) {
          // this thread owns these partial entries in every chunk: the segment's first chunk
          // writes them (no zeroing pass), later chunks add in chunk order
          CUTE_UNROLL
          for (int i = 0; i < size(acc_u); ++i) {
            float* e = part + (m * C + get<0>(tUcU(i))) * D + get<1>(tUcU(i));
            *e = (c == c_begin ? 0.f : *e) + acc_u(i);
          }
        }
      }
    }
    c = c_next;
  }
  __syncthreads();  // every warp's share of sL is final
  float* dst = gdS + segs.index(p, b, hk, Hkv, seg.z) * F * D + col0;
  for (int i = tid; i < F * BV; i += Tr::kNThreads) dst[(i / BV) * D + i % BV] = sL(i / BV, i % BV);
}

// A thread per element e of the (sequence, kv head) states [2D, D]. An empty document has
// no segment: its dH0 stays the zero the launcher wrote.
static __global__ void __launch_bounds__(256)
    rla_bwd_suffix_reduce_kernel(const RlaBwdParams p, const RlaBwdSegments segs, float* gdS,
                               const float* gdH0part) {
  const int64_t D = p.dims.head_dim, per_head = 2 * D * D;
  const int64_t Hkv = p.dims.heads_kv, Hq = p.dims.heads_q, G = Hq / Hkv;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.dims.batch * Hkv * per_head) return;
  const int64_t bh = i / per_head, e = i % per_head;
  const int64_t b = bh / Hkv, hk = bh % Hkv;
  const int64_t n_seg = ceil_div(ceil_div(p.seqlen_q(b), p.chunk_size), segs.chunks);
  if (n_seg == 0) {
    RATT_COVER_ANY("packed_empty_document");
    return;
  }
  if (n_seg > 1) {
    RATT_COVER("several_segments");
  } else {
    RATT_COVER("one_segment");
  }
  const float* gfs = static_cast<const float*>(p.grad_final_state);
  if (gfs != nullptr) RATT_COVER("grad_final_state");
  float run = gfs != nullptr ? gfs[bh * per_head + e] : 0.f;
  float* ds = gdS + segs.index(p, b, hk, Hkv, 0) * per_head + e;
  for (int64_t z = n_seg - 1; z >= 0; --z) {
    const float local = ds[z * per_head];
    ds[z * per_head] = run;
    run += local;
  }
  if (gdH0part == nullptr) return;
  RATT_COVER("grad_h0");
  float* gdH0 = static_cast<float*>(p.grad_initial_state);  // [B, Hq, 2D, D]
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    const float* part = gdH0part + segs.index(p, b, h, Hq, 0) * per_head + e;
    float sum = 0.f;
    for (int64_t z = 0; z < n_seg; ++z) sum += part[z * per_head];
    gdH0[(b * Hq + h) * per_head + e] = sum;
  }
}

}  // namespace rattention::cuda
