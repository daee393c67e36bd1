// Launch plans of the RLA forward (three passes) and backward (five kernels): the one place
// their grids, blocks, shared memory and workspace are computed (see launch_plan.h).
// rla_fwd.cu / rla_bwd.cu launch what these return.
#pragma once
#include <algorithm>

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

// Bytes of what the forward saves for the backward, for the whole batch: the checkpoints
// ([B | 1, Hkv, slots, 2D, D]) and the final state ([B, Hkv, 2D, D]), fp32. They are live
// while the backward runs, so its sub-batches are sized with them counted
// (kRlaTemporariesCapBytes).
inline int64_t rla_saved_state_bytes(const RlaCommonParams& p) {
  const AttnDims& d = p.dims;
  const int64_t state = 2 * d.head_dim * d.head_dim;
  const int64_t ckpt_rows = (p.packed() ? 1 : d.batch) * d.heads_kv * p.ckpt_slots();
  return (ckpt_rows + d.batch * d.heads_kv) * state * int64_t(sizeof(float));
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
  bool state_halves = false;  // rla_fwd_kernel<Tr, true>: the state's halves in shared memory
  int64_t n_checkpoints = 0;
  int64_t parts = 1;  // CTAs per checkpoint segment in passes 1 and 3
  int64_t workspace_floats = 0;
  int64_t workspace_bytes = 0;
  int64_t saved_state_bytes = 0;  // the checkpoints and final state it writes
  template <class F>
  void for_each(F&& f) const {
    f(state);
    f(prefix);
    f(fwd);
  }
};

// The configurations with kernels that keep the state's halves in shared memory: the default
// ones (64 value columns, phi(q) whole). The 99 KB configuration serves GPUs below the
// default's need, where the halves (more than that again) cannot fit.
template <class Tr>
inline constexpr bool kRlaHalvesVariant = Tr::kBlockV == kRlaBlockV && Tr::kQParts == 1;

// Whether a kernel that reads the state keeps its hi + lo halves in shared memory
// (rla_fwd_kernel<Tr, true>, rla_bwd_dq_kernel<Tr, true>; rla_traits.cuh): where the device
// allows the `bytes` that takes (an H100 / H200 at D = 128, also an A100 at D = 64; an
// unknown limit counts as enough, as in rla_fits).
inline bool rla_state_halves_fit(const RlaCommonParams& p, int64_t bytes) {
  return p.max_smem_per_block <= 0 || bytes <= p.max_smem_per_block;
}

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
  plan.saved_state_bytes = rla_saved_state_bytes(p);
  const GridDims grid = p.packed() ? GridDims{Tr::kNVBlocks, d.heads_kv, p.ckpt_slots()}
                                   : GridDims{Tr::kNVBlocks, bh, plan.n_checkpoints * plan.parts};
  plan.state = make_launch("rla_fwd_state_kernel", grid, Tr::kNThreads, Tr::kSmemState,
                           ceil_div(segment_chunks, plan.parts));
  plan.prefix = make_launch("rla_fwd_prefix_reduce_kernel",
                            {ceil_div(bh * 2 * D * D, kRlaElementwiseThreads)},
                            kRlaElementwiseThreads, 0,
                            plan.parts > 1 ? plan.n_checkpoints * plan.parts
                                           : imax(1, plan.n_checkpoints - 1));
  plan.state_halves = kRlaHalvesVariant<Tr> && rla_state_halves_fit(p, Tr::kSmemFwdHalves);
  plan.fwd = make_launch("rla_fwd_kernel", grid, Tr::kNThreads,
                         plan.state_halves ? Tr::kSmemFwdHalves : Tr::kSmemFwd, segment_chunks);
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
//
// Sub-batches: wsQ and wsK grow with B * T, so a dense batch runs as `sub_batches` runs of
// the five launches, each over `batch_per_launch` sequences (pointers offset to them,
// dims.batch = batch_per_launch; the kernels are those of a batch of that size), one after
// another on the stream, all in one workspace sized for a sub-batch. batch_per_launch is the
// largest divisor of B whose workspace plus the whole layer's saved checkpoints and final
// state (rla_saved_state_bytes) fits the cap, at least 1. A divisor, so that every sub-batch
// has the same launches: one workspace size, and each sequence's result does not depend on
// where in the batch it sits. The segments (and dq parts) are planned for the sub-batch, so
// every launch still covers the SMs. Packed batches: one launch (their documents share tile
// slots of one grid).
struct RlaBwdPlan {
  // rla_bwd_dq_kernel, rla_bwd_state_kernel, rla_bwd_suffix_reduce_kernel, rla_bwd_dkv_kernel,
  // rla_bwd_phi_postprocess_kernel, in launch order: the launches of one sub-batch
  KernelLaunch dq, state, scan, dkv, postprocess;
  RlaBwdSegments segments{1, 0};
  int64_t dq_parts = 1;  // dq CTAs per checkpoint segment
  bool dq_state_halves = false;  // rla_bwd_dq_kernel<Tr, true>: the state's halves in smem
  int64_t ws_q = 0, ws_k = 0, ws_dh0 = 0, ws_ds = 0;  // offsets in floats
  int64_t zeroed_floats = 0;                          // [0, zeroed_floats): wsQ and wsK
  int64_t workspace_floats = 0;  // of one sub-batch: the launches reuse it in turn
  int64_t workspace_bytes = 0;
  int64_t batch_per_launch = 0;  // sequences per sub-batch (packed: all documents)
  int64_t sub_batches = 1;       // runs of the five launches
  int64_t saved_state_bytes = 0;  // the forward's checkpoints + final state, whole batch
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

// The launches and workspace of one backward run over all of p's sequences (a sub-batch
// when rla_bwd_plan splits the batch).
template <class Tr>
RlaBwdPlan rla_bwd_batch_plan(const RlaBwdParams& p, int num_sms) {
  using Sm = RlaBwdSmem<Tr>;
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
  plan.ws_k = rla_dq_slots(Tr::kNVBlocks) * row * Hq;
  plan.ws_dh0 = plan.ws_k + rla_dk_slots(d.group(), Tr::kNVBlocks) * row * Hkv;
  plan.zeroed_floats = plan.ws_dh0;
  plan.ws_ds = plan.ws_dh0 + (has_h0 ? seqs * Hq * segs.slots * state : 0);
  plan.workspace_floats = plan.ws_ds + seqs * Hkv * segs.slots * state;
  plan.workspace_bytes = plan.workspace_floats * int64_t(sizeof(float));
  // launches
  const int64_t every = imin(p.checkpoint_every, n_chunks);
  plan.dq_parts = p.packed() ? 1 : rla_segment_parts(Tr::kNVBlocks * bh * n_ckpt, every, num_sms);
  const GridDims dq_grid = p.packed() ? GridDims{Tr::kNVBlocks, Hkv, p.ckpt_slots()}
                                      : GridDims{Tr::kNVBlocks, bh, n_ckpt * plan.dq_parts};
  plan.dq_state_halves = kRlaHalvesVariant<Tr> && rla_state_halves_fit(p, Sm::kDqHalves);
  plan.dq = make_launch("rla_bwd_dq_kernel", dq_grid, Tr::kNThreads,
                        plan.dq_state_halves ? Sm::kDqHalves : Sm::kDq, every);
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
  plan.batch_per_launch = B;
  return plan;
}

// Bytes of one q / k / v element (the CUDA kernels take bf16 and fp16).
inline int64_t rla_element_bytes(DType t) {
  return t == DType::kFloat64 ? 8 : t == DType::kFloat32 ? 4 : 2;
}

// The params of sequences [b0, b0 + n) of a dense batch: every batch-indexed pointer moved to
// sequence b0 (q / k / v / grad_out by their batch strides, H0 by its own, 0 when broadcast;
// the contiguous checkpoints, states and gradients by their per-sequence sizes) and
// dims.batch = n, so the kernels run on the sub-batch as on a batch of n. Packed batches are
// returned as they are (rla_bwd_plan never splits them).
inline RlaBwdParams rla_bwd_sub_batch(const RlaBwdParams& p, int64_t b0, int64_t n) {
  if (p.packed()) return p;
  const AttnDims& d = p.dims;
  const int64_t e = rla_element_bytes(p.dtype), f = int64_t(sizeof(float));
  const int64_t state = 2 * d.head_dim * d.head_dim;
  auto at = [](const void* ptr, int64_t bytes) -> const char* {
    return ptr == nullptr ? nullptr : static_cast<const char*>(ptr) + bytes;
  };
  auto at_mut = [](void* ptr, int64_t bytes) -> char* {
    return ptr == nullptr ? nullptr : static_cast<char*>(ptr) + bytes;
  };
  RlaBwdParams s = p;
  s.dims.batch = n;
  s.q = at(p.q, b0 * p.q_stride.b * e);
  s.k = at(p.k, b0 * p.k_stride.b * e);
  s.v = at(p.v, b0 * p.v_stride.b * e);
  s.grad_out = at(p.grad_out, b0 * p.grad_out_stride.b * f);
  s.initial_state = at(p.initial_state, b0 * p.initial_state_bstride * f);
  s.checkpoints = at(p.checkpoints, b0 * d.heads_kv * p.ckpt_slots() * state * f);
  s.grad_final_state = at(p.grad_final_state, b0 * d.heads_kv * state * f);
  s.grad_q = at_mut(p.grad_q, b0 * d.seqlen * d.heads_q * d.head_dim * e);
  s.grad_k = at_mut(p.grad_k, b0 * d.seqlen_k * d.heads_kv * d.head_dim * e);
  s.grad_v = at_mut(p.grad_v, b0 * d.seqlen_k * d.heads_kv * d.head_dim * e);
  s.grad_initial_state = at_mut(p.grad_initial_state, b0 * d.heads_q * state * f);
  s.grad_carried_state = at_mut(p.grad_carried_state, b0 * d.heads_kv * state * f);
  return s;
}

// The backward's plan: the sub-batch size (see RlaBwdPlan) and the launches of one sub-batch.
template <class Tr>
RlaBwdPlan rla_bwd_plan(const RlaBwdParams& p, int num_sms, int64_t temporaries_cap_bytes) {
  const int64_t B = p.dims.batch;
  const int64_t saved = rla_saved_state_bytes(p);
  if (p.packed() || B <= 1) {
    RlaBwdPlan plan = rla_bwd_batch_plan<Tr>(p, num_sms);
    plan.saved_state_bytes = saved;
    return plan;
  }
  RlaBwdPlan plan;
  for (int64_t n = B; n >= 1; --n) {  // the largest divisor that fits; 1 if none does
    if (B % n != 0) continue;
    RlaBwdParams sub = p;
    sub.dims.batch = n;
    plan = rla_bwd_batch_plan<Tr>(sub, num_sms);
    if (plan.workspace_bytes + saved <= temporaries_cap_bytes) break;
  }
  plan.sub_batches = B / plan.batch_per_launch;
  plan.saved_state_bytes = saved;
  return plan;
}

// The kernel configurations. The default one (64 value columns per CTA, phi(q) whole) needs
// up to 161 KB of shared memory per block at D = 128, more than GPUs with 99 KB per block
// (sm_86 / sm_89: A10, L4, L40S, RTX 4090) allow; there D = 128 runs with 32-column value
// slices (4 CTAs per (sequence, kv head, segment), each recomputing phi and the score
// block) and phi(q) held 64 features at a time (RlaTraits::kQParts), up to 99,328 B. D = 64
// fits 99 KB in the default one.
template <class Element, int D>
using RlaDefaultTraits = RlaTraits<Element, D, kRlaBlockV>;
template <class Element, int D>
using RlaSmallSmemTraits = RlaTraits<Element, D, 32, 2 * D / 64>;
static_assert(kRlaHalvesVariant<RlaDefaultTraits<cutlass::bfloat16_t, 128>> &&
                  !kRlaHalvesVariant<RlaSmallSmemTraits<cutlass::bfloat16_t, 128>>,
              "the state's halves are the default configuration's");

// The most dynamic shared memory per block any RLA kernel of configuration Tr takes (the
// forward's and the backward's alike, so that both ops run the same configuration).
template <class Tr>
constexpr int64_t rla_max_smem_bytes() {
  using Sm = RlaBwdSmem<Tr>;
  return std::max({int64_t(Tr::kSmemFwd), int64_t(Tr::kSmemState), int64_t(Sm::kDq),
                   int64_t(Sm::kState), int64_t(Sm::kDkv)});
}
template <class Tr>
bool rla_fits(const RlaCommonParams& p) {
  return p.max_smem_per_block <= 0 || rla_max_smem_bytes<Tr>() <= p.max_smem_per_block;
}

// Calls f(Tr{}) for the configuration that serves (dtype, head_dim, max_smem_per_block) and
// returns its result; R{} when there is none: the default configuration where it fits the
// device's limit, else the small-shared-memory one (whose need the op still checks).
template <class R, class Element, int D, class F>
R with_rla_traits_of(const RlaCommonParams& p, F&& f) {
  if constexpr (D == 128) {
    if (!rla_fits<RlaDefaultTraits<Element, D>>(p)) return f(RlaSmallSmemTraits<Element, D>{});
  }
  return f(RlaDefaultTraits<Element, D>{});
}
// Whether (dtype, head_dim) has CUDA kernels at all.
inline bool rla_has_kernels(const RlaCommonParams& p) {
  return (p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16) &&
         (p.dims.head_dim == 64 || p.dims.head_dim == 128);
}
template <class R, class F>
R with_rla_traits(const RlaCommonParams& p, F&& f) {
  if (!rla_has_kernels(p)) return R{};
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.dims.head_dim == 64)
    return bf16 ? with_rla_traits_of<R, cutlass::bfloat16_t, 64>(p, f)
                : with_rla_traits_of<R, cutlass::half_t, 64>(p, f);
  return bf16 ? with_rla_traits_of<R, cutlass::bfloat16_t, 128>(p, f)
              : with_rla_traits_of<R, cutlass::half_t, 128>(p, f);
}

inline RlaFwdPlan rla_fwd_plan(const RlaFwdParams& p, int num_sms) {
  return with_rla_traits<RlaFwdPlan>(p, [&](auto tr) { return rla_fwd_plan<decltype(tr)>(p, num_sms); });
}
inline RlaBwdPlan rla_bwd_plan(const RlaBwdParams& p, int num_sms,
                               int64_t temporaries_cap_bytes = kRlaTemporariesCapBytes) {
  return with_rla_traits<RlaBwdPlan>(p, [&](auto tr) {
    return rla_bwd_plan<decltype(tr)>(p, num_sms, temporaries_cap_bytes);
  });
}

}  // namespace rattention::cuda
