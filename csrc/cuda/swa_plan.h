// Launch plans of the SWA forward (with or without the fused mixing epilogue) and backward:
// the one place their grids, blocks, shared memory and workspace are computed (see
// launch_plan.h). swa_fwd.cu / swa_bwd.cu launch what these return.
#pragma once
#include "core/params.h"
#include "cuda/launch_plan.h"
#include "cuda/swa_traits.cuh"

namespace rattention::cuda {

// Forward: one CTA per (query tile, b, q head); packed, one per (tile slot, 1, q head) over
// the documents' tiles (QkvParams::tile_slot0). The fused mixing (p.mix.out set) runs in
// the same kernel's epilogue and changes nothing here.
//
// Packed plans read only the sizes (total rows, N), never cu_seqlens (device memory); their
// serial_steps bound a document's chain by that of one document as long as all rows.
struct SwaFwdPlan {
  KernelLaunch fwd;  // swa_fwd_kernel
  int64_t workspace_bytes = 0;
  template <class F>
  void for_each(F&& f) const {
    f(fwd);
  }
};

template <class Tr>
SwaFwdPlan swa_fwd_plan(const SwaFwdParams& p) {
  const AttnDims& d = p.dims;
  SwaFwdPlan plan;
  const GridDims grid =
      p.packed() ? GridDims{QkvParams::packed_tile_slots(d.seqlen, d.batch, Tr::kBlockM), 1,
                            d.heads_q}
                 : GridDims{ceil_div(d.seqlen, Tr::kBlockM), d.batch, d.heads_q};
  plan.fwd = make_launch("swa_fwd_kernel", grid, Tr::kNThreads, Tr::kSmemFwd,
                         swa_max_key_tiles(d.seqlen, Tr::kBlockM, Tr::kBlockN, p.window_size));
  return plan;
}

// Backward: preprocess (Di), dK/dV, dQ, then two fp32 -> dtype conversions. The fp32
// workspace holds Di (lse-shaped: [B, Hq, T], packed [Hq, total]), dQ (q-shaped) and dK
// (k-shaped), offsets in floats; every entry that is read is written first, so it needs no
// zeroing. Packed, dK/dV and dQ run over the documents' tile slots like the forward.
struct SwaBwdPlan {
  KernelLaunch preprocess, dkdv, dq, convert_dq, convert_dk;
  int64_t ws_di = 0, ws_dq = 0, ws_dk = 0;
  int64_t workspace_floats = 0;
  int64_t workspace_bytes = 0;
  template <class F>
  void for_each(F&& f) const {
    f(preprocess);
    f(dkdv);
    f(dq);
    f(convert_dq);
    f(convert_dk);
  }
};

constexpr int kSwaRowsPerPreprocessCta = 8;  // swa_bwd_preprocess_kernel: a warp per row
constexpr int kSwaElementwiseThreads = 256;  // preprocess and convert kernels

template <class Tr>
SwaBwdPlan swa_bwd_plan(const SwaBwdParams& p) {
  const AttnDims& d = p.dims;
  const int64_t B = d.batch, T = d.seqlen, Hq = d.heads_q, Hkv = d.heads_kv, D = Tr::kHeadDim;
  const int64_t w = p.window_size;
  const int64_t rows = p.packed() ? T : B * T;  // token rows of q (and of k/v)
  SwaBwdPlan plan;
  plan.ws_di = 0;
  plan.ws_dq = Hq * rows;
  plan.ws_dk = plan.ws_dq + rows * Hq * D;
  plan.workspace_floats = plan.ws_dk + rows * Hkv * D;
  plan.workspace_bytes = plan.workspace_floats * int64_t(sizeof(float));
  plan.preprocess = make_launch("swa_bwd_preprocess_kernel",
                                {ceil_div(Hq * rows, kSwaRowsPerPreprocessCta)},
                                kSwaElementwiseThreads, 0, 1);
  // dK/dV: per key tile (all D columns, SwaDkdvTraits), the G query heads one after another,
  // each over the query tiles that see the key tile.
  const int64_t key_tiles = p.packed() ? QkvParams::packed_tile_slots(T, B, Tr::kBlockN)
                                       : ceil_div(T, Tr::kBlockN);
  const int64_t query_tiles = p.packed() ? QkvParams::packed_tile_slots(T, B, Tr::kBlockM)
                                         : ceil_div(T, Tr::kBlockM);
  const int64_t grid_b = p.packed() ? 1 : B;
  using Dkdv = SwaDkdvTraits<typename Tr::Element, Tr::kHeadDim>;
  plan.dkdv = make_launch("swa_bwd_dkdv_kernel", {key_tiles, grid_b, Hkv}, Dkdv::kNThreads,
                          Dkdv::kSmemBwdDkdv,
                          d.group() * swa_max_query_tiles(T, Tr::kBlockM, Tr::kBlockN, w));
  plan.dq = make_launch("swa_bwd_dq_kernel", {query_tiles, grid_b, Hq}, Tr::kNThreads,
                        Tr::kSmemBwdDq, swa_max_key_tiles(T, Tr::kBlockM, Tr::kBlockN, w));
  // a thread per rotary pair (D / 2 per row)
  plan.convert_dq = make_launch("swa_bwd_convert_kernel",
                                {ceil_div(rows * Hq * D / 2, kSwaElementwiseThreads)},
                                kSwaElementwiseThreads, 0, 1);
  plan.convert_dk = make_launch("swa_bwd_convert_kernel",
                                {ceil_div(rows * Hkv * D / 2, kSwaElementwiseThreads)},
                                kSwaElementwiseThreads, 0, 1);
  return plan;
}

// Calls f(Traits<Element, D>{}) for the instantiation that serves (dtype, head_dim) and
// returns its result; R{} when there is none. Traits: SwaFwdTraits or SwaTraits.
template <template <typename, int> class Traits, class R, class F>
R with_swa_traits(DType dtype, int64_t head_dim, F&& f) {
  const bool bf16 = dtype == DType::kBFloat16;
  if (!bf16 && dtype != DType::kFloat16) return R{};
  if (head_dim == 64)
    return bf16 ? f(Traits<cutlass::bfloat16_t, 64>{}) : f(Traits<cutlass::half_t, 64>{});
  if (head_dim == 128)
    return bf16 ? f(Traits<cutlass::bfloat16_t, 128>{}) : f(Traits<cutlass::half_t, 128>{});
  return R{};
}

inline SwaFwdPlan swa_fwd_plan(const SwaFwdParams& p) {
  return with_swa_traits<SwaFwdTraits, SwaFwdPlan>(
      p.dtype, p.dims.head_dim, [&](auto tr) { return swa_fwd_plan<decltype(tr)>(p); });
}
inline SwaBwdPlan swa_bwd_plan(const SwaBwdParams& p) {
  return with_swa_traits<SwaTraits, SwaBwdPlan>(
      p.dtype, p.dims.head_dim, [&](auto tr) { return swa_bwd_plan<decltype(tr)>(p); });
}

}  // namespace rattention::cuda
