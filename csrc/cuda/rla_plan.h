// Launch plans of the RLA forward (three passes) and backward (five kernels): the one place
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

// CTAs per checkpoint segment: enough that the (value slice, b * kv head, segment, part)
// CTAs cover num_sms SMs, at most one per chunk of the segment. A part k of n walks
// ceil(every / n) * (k + 1) chunks (the earlier ones advance the state only), so the serial
// chain stays at most checkpoint_every chunks. The forward's passes 1 and 3 and the
// backward's dq pass split their checkpoint segments this way.
inline int64_t rla_segment_parts(int64_t ctas, int64_t every, int num_sms) {
  return imax(1, imin(every, ceil_div(imax(1, num_sms), imax(1, ctas))));
}

// Forward. The sequence is cut into segments of checkpoint_every chunks, `parts` CTAs per
// (value slice, b * kv head, segment) in passes 1 and 3 (rla_segment_parts from the SM count;
// packed: 1); pass 2 is a thread per state element walking the segments (and their parts) in
// order. Packed: one CTA per (value slice, kv head, checkpoint slot), a document's segments
// being its slots (RlaCommonParams::ckpt_slot0); the plan reads only the sizes (total rows,
// N), and its serial_steps bound a document by one as long as all rows.
// Workspace (fp32): with parts > 1 the part sums of pass 1, [B * Hkv, n_ckpt, parts, 2D, D];
// none otherwise (pass 1 writes into the checkpoints, pass 2 scans them in place).
struct RlaFwdPlan {
  KernelLaunch state, prefix, fwd;  // rla_fwd_state_kernel, ..._prefix_reduce_kernel, rla_fwd_kernel
  int64_t n_checkpoints = 0;
  int64_t parts = 1;  // CTAs per checkpoint segment in passes 1 and 3
  int64_t workspace_floats = 0;
  int64_t workspace_bytes = 0;
  template <class F>
  void for_each(F&& f) const {
    f(state);
    f(prefix);
    f(fwd);
  }
};

template <class Tr>
RlaFwdPlan rla_fwd_plan(const RlaFwdParams& p, int num_sms) {
  const AttnDims& d = p.dims;
  const int64_t bh = d.batch * d.heads_kv, D = Tr::kHeadDim;
  const int64_t n_chunks = ceil_div(d.seqlen, Tr::kChunk);
  RlaFwdPlan plan;
  plan.n_checkpoints = rla_num_checkpoints(n_chunks, p.checkpoint_every);
  const int64_t segment_chunks = imin(p.checkpoint_every, n_chunks);
  plan.parts = p.packed() ? 1
                          : rla_segment_parts(Tr::kNVBlocks * bh * plan.n_checkpoints,
                                              segment_chunks, num_sms);
  if (plan.parts > 1) plan.workspace_floats = bh * plan.n_checkpoints * plan.parts * 2 * D * D;
  plan.workspace_bytes = plan.workspace_floats * int64_t(sizeof(float));
  const GridDims grid = p.packed() ? GridDims{Tr::kNVBlocks, d.heads_kv, p.ckpt_slots()}
                                   : GridDims{Tr::kNVBlocks, bh, plan.n_checkpoints * plan.parts};
  plan.state = make_launch("rla_fwd_state_kernel", grid, Tr::kNThreads, Tr::kSmemState,
                           ceil_div(segment_chunks, plan.parts));
  plan.prefix = make_launch("rla_fwd_prefix_reduce_kernel",
                            {ceil_div(bh * 2 * D * D, kRlaElementwiseThreads)},
                            kRlaElementwiseThreads, 0,
                            plan.parts > 1 ? plan.n_checkpoints * plan.parts
                                           : imax(1, plan.n_checkpoints - 1));
  plan.fwd = make_launch("rla_fwd_kernel", grid, Tr::kNThreads, Tr::kSmemFwd, segment_chunks);
  return plan;
}

// Backward, five launches:
//   dq: restarts every checkpoint segment from its checkpoint (grid as the forward's), split
//     into dq_parts CTAs per segment when the segments alone would not cover num_sms SMs
//     (rla_segment_parts; packed: 1): a later part first advances the state to its start;
//   state, scan, dkv: the dk/dv pass cut into segments of `segments.chunks` chunks, chosen
//     from the SM count and T (rla_bwd_segment_chunks), not from checkpoint_every: per
//     segment the sum of phi(q)^T dO (state), the reverse exclusive scan over segments that
//     gives each segment's starting suffix state dS (scan, a thread per state element, fixed
//     order), then one CTA per (value slice, b * kv head, segment) walks its chunks in
//     reverse from there (dkv). Packed: the same cut, a document's segments at its slots
//     of the O(1) tile-slot rule (RlaBwdSegments);
//   postprocess: the feature-map backward, a warp per row.
// The fp32 workspace, in floats (see csrc/cuda/README_rla.md "Memory"):
//   wsQ [tokens, Hq, 2D] (dphi(q), atomics)  | wsK [rla_dk_slots, tokens, Hkv, 2D] (dphi(k))
//   | dH0 partials [seg rows of Hq, 2D, D] (only with an initial state; per head and segment)
//   | dS [seg rows of Hkv, 2D, D] (per segment: its local sum, then its starting suffix state)
// with seg rows of H = B * H * slots (dense) or H * slots (packed); the launcher zeroes only
// wsQ and wsK (accumulation targets), the kernels write every element of the rest.
struct RlaBwdPlan {
  // rla_bwd_dq_kernel, rla_bwd_state_kernel, rla_bwd_suffix_reduce_kernel, rla_bwd_dkv_kernel,
  // rla_bwd_phi_postprocess_kernel, in launch order
  KernelLaunch dq, state, scan, dkv, postprocess;
  RlaBwdSegments segments{1, 0};
  int64_t dq_parts = 1;  // dq CTAs per checkpoint segment
  int64_t ws_q = 0, ws_k = 0, ws_dh0 = 0, ws_ds = 0;  // offsets in floats
  int64_t zeroed_floats = 0;                          // [0, zeroed_floats): wsQ and wsK
  int64_t workspace_floats = 0;
  int64_t workspace_bytes = 0;
  template <class F>
  void for_each(F&& f) const {
    f(dq);
    f(state);
    f(scan);
    f(dkv);
    f(postprocess);
  }
};

// Chunks per dk/dv segment: enough segments that the (value slice, b * kv head, segment)
// CTAs cover num_sms SMs (n_chunks * ctas_per_segment / num_sms chunks each, rounded down),
// at least 1 and at most kRlaMaxSegmentChunks chunks (a short serial chain per CTA; with
// many CTAs it also keeps the last wave short).
inline int64_t rla_bwd_segment_chunks(int64_t n_chunks, int64_t ctas_per_segment, int num_sms) {
  const int64_t fill = n_chunks * ctas_per_segment / imax(1, num_sms);
  return imax(1, imin(fill, imin(kRlaMaxSegmentChunks, imax(1, n_chunks))));
}

template <class Tr>
RlaBwdPlan rla_bwd_plan(const RlaBwdParams& p, int num_sms) {
  using Sm = RlaBwdSmem<Tr>;
  static_assert(Tr::kBlockV == kRlaBlockV, "rla_dk_slots assumes kRlaBlockV value columns");
  const AttnDims& d = p.dims;
  const int64_t B = d.batch, T = d.seqlen, Hq = d.heads_q, Hkv = d.heads_kv, D = Tr::kHeadDim;
  const int64_t F = 2 * D;
  const int64_t bh = B * Hkv;
  const int64_t n_chunks = ceil_div(T, Tr::kChunk);  // packed: of all documents' rows at once
  const int64_t n_ckpt = rla_num_checkpoints(n_chunks, p.checkpoint_every);
  const int64_t tokens = p.packed() ? T : B * T;
  const bool has_h0 = p.grad_initial_state != nullptr;  // dH0 wanted (an initial state given)
  RlaBwdPlan plan;
  // dk/dv segments
  const int64_t seg_heads = p.packed() ? Hkv : bh;  // grid y of the segment grids
  RlaBwdSegments& segs = plan.segments;
  segs.chunks = rla_bwd_segment_chunks(n_chunks, Tr::kNVBlocks * seg_heads, num_sms);
  segs.slots = p.packed() ? QkvParams::packed_tile_slots(T, B, Tr::kChunk * segs.chunks)
                          : ceil_div(n_chunks, segs.chunks);
  // states per head of the per-segment buffers: seg_rows(H) = seqs * H * slots
  const int64_t seqs = p.packed() ? 1 : B;
  const int64_t state = F * D;
  // workspace
  const int64_t row = tokens * F;  // floats of one head's [tokens, 2D]
  plan.ws_q = 0;
  plan.ws_k = row * Hq;
  plan.ws_dh0 = plan.ws_k + rla_dk_slots(d.group(), D) * row * Hkv;
  plan.zeroed_floats = plan.ws_dh0;
  plan.ws_ds = plan.ws_dh0 + (has_h0 ? seqs * Hq * segs.slots * state : 0);
  plan.workspace_floats = plan.ws_ds + seqs * Hkv * segs.slots * state;
  plan.workspace_bytes = plan.workspace_floats * int64_t(sizeof(float));
  // launches
  const int64_t every = imin(p.checkpoint_every, n_chunks);
  plan.dq_parts = p.packed() ? 1 : rla_segment_parts(Tr::kNVBlocks * bh * n_ckpt, every, num_sms);
  const GridDims dq_grid = p.packed() ? GridDims{Tr::kNVBlocks, Hkv, p.ckpt_slots()}
                                      : GridDims{Tr::kNVBlocks, bh, n_ckpt * plan.dq_parts};
  plan.dq = make_launch("rla_bwd_dq_kernel", dq_grid, Tr::kNThreads, Sm::kDq, every);
  const GridDims seg_grid{Tr::kNVBlocks, seg_heads, segs.slots};
  plan.state = make_launch("rla_bwd_state_kernel", seg_grid, Tr::kNThreads, Sm::kState, segs.chunks);
  // a thread per element of the (sequence, kv head) states; it walks the segments (and
  // with H0 the group's dH0 partials)
  plan.scan = make_launch("rla_bwd_suffix_reduce_kernel",
                          {ceil_div(bh * state, kRlaElementwiseThreads)}, kRlaElementwiseThreads, 0,
                          (has_h0 ? 1 + d.group() : 1) * ceil_div(n_chunks, segs.chunks));
  plan.dkv = make_launch("rla_bwd_dkv_kernel", seg_grid, Tr::kNThreads, Sm::kDkv, segs.chunks);
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

inline RlaFwdPlan rla_fwd_plan(const RlaFwdParams& p, int num_sms) {
  return with_rla_traits<RlaFwdPlan>(p.dtype, p.dims.head_dim,
                                     [&](auto tr) { return rla_fwd_plan<decltype(tr)>(p, num_sms); });
}
inline RlaBwdPlan rla_bwd_plan(const RlaBwdParams& p, int num_sms) {
  return with_rla_traits<RlaBwdPlan>(p.dtype, p.dims.head_dim,
                                     [&](auto tr) { return rla_bwd_plan<decltype(tr)>(p, num_sms); });
}

}  // namespace rattention::cuda
