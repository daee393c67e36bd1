// Launch plans of the RLA forward (three passes) and backward (three kernels): the one place
// their grids, blocks, shared memory and workspace are computed (see launch_plan.h).
// rla_fwd.cu / rla_bwd.cu launch what these return.
#pragma once
#include "core/params.h"
#include "cuda/launch_plan.h"
#include "cuda/rla_launch.h"
#include "cuda/rla_traits.cuh"

namespace rattention::cuda {

constexpr int kRlaElementwiseThreads = 256;  // prefix-reduce and phi post-process kernels
constexpr int kRlaRowsPerPostprocessCta = 8;  // rla_bwd_phi_postprocess_kernel: a warp per row

// Forward. The sequence is cut into segments of checkpoint_every chunks, one CTA per
// (value slice, b * kv head, segment) in passes 1 and 3; pass 2 is a thread per state element
// walking the segments in order. Packed: one CTA per (value slice, kv head, checkpoint slot),
// a document's segments being its slots (RlaCommonParams::ckpt_slot0); the plan reads only
// the sizes (total rows, N), and its serial_steps bound a document by one as long as all rows.
struct RlaFwdPlan {
  KernelLaunch state, prefix, fwd;  // rla_fwd_state_kernel, ..._prefix_reduce_kernel, rla_fwd_kernel
  int64_t n_checkpoints = 0;
  int64_t workspace_bytes = 0;  // none: checkpoints and final state are outputs
  template <class F>
  void for_each(F&& f) const {
    f(state);
    f(prefix);
    f(fwd);
  }
};

template <class Tr>
RlaFwdPlan rla_fwd_plan(const RlaFwdParams& p) {
  const AttnDims& d = p.dims;
  const int64_t bh = d.batch * d.heads_kv, D = Tr::kHeadDim;
  const int64_t n_chunks = ceil_div(d.seqlen, Tr::kChunk);
  RlaFwdPlan plan;
  plan.n_checkpoints = rla_num_checkpoints(n_chunks, p.checkpoint_every);
  const int64_t segment_chunks = imin(p.checkpoint_every, n_chunks);
  const GridDims grid = p.packed() ? GridDims{Tr::kNVBlocks, d.heads_kv, p.ckpt_slots()}
                                   : GridDims{Tr::kNVBlocks, bh, plan.n_checkpoints};
  plan.state = make_launch("rla_fwd_state_kernel", grid, Tr::kNThreads, Tr::kSmemState, segment_chunks);
  plan.prefix = make_launch("rla_fwd_prefix_reduce_kernel",
                            {ceil_div(bh * 2 * D * D, kRlaElementwiseThreads)},
                            kRlaElementwiseThreads, 0, imax(1, plan.n_checkpoints - 1));
  plan.fwd = make_launch("rla_fwd_kernel", grid, Tr::kNThreads, Tr::kSmemFwd, segment_chunks);
  return plan;
}

// Backward. dq restarts every segment from its checkpoint; dk/dv walks all chunks in reverse
// with the suffix state. The fp32 workspace (zeroed by the launcher) holds
// wsQ [B, T, Hq, 2D] (dphi(q)) then wsK [rla_dk_slots, B, T, Hkv, 2D] (dphi(k)); packed,
// [total, ...] for [B, T, ...], and dq runs over the checkpoint slots like the forward.
struct RlaBwdPlan {
  KernelLaunch dq, dkv, postprocess;  // rla_bwd_dq_kernel, rla_bwd_dkv_kernel, ..._phi_postprocess_kernel
  int64_t ws_q = 0, ws_k = 0;         // offsets in floats
  int64_t workspace_floats = 0;
  int64_t workspace_bytes = 0;
  template <class F>
  void for_each(F&& f) const {
    f(dq);
    f(dkv);
    f(postprocess);
  }
};

template <class Tr>
RlaBwdPlan rla_bwd_plan(const RlaBwdParams& p) {
  using Sm = RlaBwdSmem<Tr>;
  static_assert(Tr::kBlockV == kRlaBlockV, "rla_dk_slots assumes kRlaBlockV value columns");
  const AttnDims& d = p.dims;
  const int64_t B = d.batch, T = d.seqlen, Hq = d.heads_q, Hkv = d.heads_kv, D = Tr::kHeadDim;
  const int64_t bh = B * Hkv;
  const int64_t n_chunks = ceil_div(T, Tr::kChunk);
  const int64_t n_ckpt = rla_num_checkpoints(n_chunks, p.checkpoint_every);
  const int64_t tokens = p.packed() ? T : B * T;
  RlaBwdPlan plan;
  const int64_t row = tokens * 2 * D;  // floats of one head's [B, T, 2D]
  plan.ws_q = 0;
  plan.ws_k = row * Hq;
  plan.workspace_floats = plan.ws_k + rla_dk_slots(d.group(), D) * row * Hkv;
  plan.workspace_bytes = plan.workspace_floats * int64_t(sizeof(float));
  const GridDims dq_grid = p.packed() ? GridDims{Tr::kNVBlocks, Hkv, p.ckpt_slots()}
                                      : GridDims{Tr::kNVBlocks, bh, n_ckpt};
  plan.dq = make_launch("rla_bwd_dq_kernel", dq_grid, Tr::kNThreads, Sm::kDq,
                        imin(p.checkpoint_every, n_chunks));
  plan.dkv = make_launch("rla_bwd_dkv_kernel", {Tr::kNVBlocks, bh}, Tr::kNThreads, Sm::kDkv, n_chunks);
  plan.postprocess = make_launch("rla_bwd_phi_postprocess_kernel",
                                 {ceil_div(tokens * (Hq + Hkv), kRlaRowsPerPostprocessCta)},
                                 kRlaElementwiseThreads, 0, 1);
  return plan;
}

// Calls f(RlaTraits<Element, D, kRlaBlockV>{}) for the instantiation that serves
// (dtype, head_dim) and returns its result; R{} when there is none.
template <class R, class F>
R with_rla_traits(DType dtype, int64_t head_dim, F&& f) {
  const bool bf16 = dtype == DType::kBFloat16;
  if (!bf16 && dtype != DType::kFloat16) return R{};
  if (head_dim == 64)
    return bf16 ? f(RlaTraits<cutlass::bfloat16_t, 64, kRlaBlockV>{})
                : f(RlaTraits<cutlass::half_t, 64, kRlaBlockV>{});
  if (head_dim == 128)
    return bf16 ? f(RlaTraits<cutlass::bfloat16_t, 128, kRlaBlockV>{})
                : f(RlaTraits<cutlass::half_t, 128, kRlaBlockV>{});
  return R{};
}

inline RlaFwdPlan rla_fwd_plan(const RlaFwdParams& p) {
  return with_rla_traits<RlaFwdPlan>(p.dtype, p.dims.head_dim,
                                     [&](auto tr) { return rla_fwd_plan<decltype(tr)>(p); });
}
inline RlaBwdPlan rla_bwd_plan(const RlaBwdParams& p) {
  return with_rla_traits<RlaBwdPlan>(p.dtype, p.dims.head_dim,
                                     [&](auto tr) { return rla_bwd_plan<decltype(tr)>(p); });
}

}  // namespace rattention::cuda
