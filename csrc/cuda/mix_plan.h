// Launch plans of the standalone mixing kernels (mix_fwd, mix_bwd): the one place their grids,
// blocks and workspace are computed (see launch_plan.h). mix.cu launches what these return.
#pragma once
#include "core/params.h"
#include "cuda/launch_plan.h"

namespace rattention::cuda {

constexpr int kMixRowsPerCta = 8;  // mix_fwd_kernel: a warp per (token, head) row, 256 threads
constexpr int kMixBwdWarps = 4;    // mix_bwd_kernel: warps per CTA
constexpr int kMixReduceThreads = 256;

struct MixFwdPlan {
  KernelLaunch fwd;  // mix_fwd_kernel
  int64_t workspace_bytes = 0;
  template <class F>
  void for_each(F&& f) const {
    f(fwd);
  }
};

inline MixFwdPlan mix_fwd_plan(const MixParams& p) {
  MixFwdPlan plan;
  plan.fwd = make_launch("mix_fwd_kernel", {ceil_div(p.rows, kMixRowsPerCta)}, kMixRowsPerCta * 32, 0, 1);
  return plan;
}

// Backward: CTA per (split of a head's rows, head) writes its weight-gradient partial sums
// (fp32 workspace [splits, 2, Hq, D]); the reduce kernel adds the splits in a fixed order.
struct MixBwdPlan {
  KernelLaunch bwd, reduce;  // mix_bwd_kernel, mix_bwd_reduce_kernel
  int64_t n_splits = 1;
  int64_t workspace_floats = 0;
  int64_t workspace_bytes = 0;
  template <class F>
  void for_each(F&& f) const {
    f(bwd);
    f(reduce);
  }
};

inline MixBwdPlan mix_bwd_plan(const MixBwdParams& p) {
  MixBwdPlan plan;
  const int64_t per_head = p.heads_q > 0 ? p.rows / p.heads_q : 0;
  // Enough CTAs to fill a large GPU (~1k), at least 64 rows per CTA.
  const int64_t want = imax(1, ceil_div(1024, imax(1, p.heads_q)));
  plan.n_splits = imax(1, imin(want, ceil_div(per_head, 64)));
  plan.workspace_floats = plan.n_splits * 2 * p.heads_q * p.head_dim;
  plan.workspace_bytes = plan.workspace_floats * int64_t(sizeof(float));
  const int64_t rows_per_warp = ceil_div(ceil_div(per_head, plan.n_splits), kMixBwdWarps);
  plan.bwd = make_launch("mix_bwd_kernel", {plan.n_splits, p.heads_q}, kMixBwdWarps * 32, 0,
                         imax(1, rows_per_warp));
  plan.reduce = make_launch("mix_bwd_reduce_kernel",
                            {ceil_div(2 * p.heads_q * p.head_dim, kMixReduceThreads)},
                            kMixReduceThreads, 0, plan.n_splits);
  return plan;
}

}  // namespace rattention::cuda
