// Launch plan of the decode step (decode_step_kernel, then decode_pos_kernel): the one place
// its grid, block and shared memory are computed (see launch_plan.h). decode.cu launches
// what this returns.
#pragma once
#include "core/params.h"
#include "cuda/launch_plan.h"

namespace rattention::cuda {

constexpr int kDecodeThreads = 256;
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kDecodeHeadBlock = 8;  // query heads accumulated together in the state sweep
constexpr int kDecodePosThreads = 128;

// Dynamic shared memory of decode_step_kernel (fp32): sQ [G, D] rotated queries,
// sPhiQ [G, 2D], sOs [G, D], sOr [G, D], then sKold [D], sVold [D], sPhiK [2D],
// sRed [kDecodeWarps, D + 2] (merges).
inline int64_t decode_step_smem_floats(int64_t head_dim, int64_t group) {
  const int64_t D = head_dim;
  return group * (D + 2 * D + D + D) + D + D + 2 * D + kDecodeWarps * (D + 2);
}

struct DecodePlan {
  KernelLaunch step, pos;  // decode_step_kernel, decode_pos_kernel
  int64_t workspace_bytes = 0;
  template <class F>
  void for_each(F&& f) const {
    f(step);
    f(pos);
  }
};

// One CTA per (sequence, kv head) serving the G query heads. serial_steps at a full ring
// (w + 1 keys): each warp's online-softmax chain over its keys for the G heads one after
// another, then the state sweep (2D / (threads / D) rows per thread, per block of 8 heads).
inline DecodePlan decode_plan(const DecodeParams& p) {
  DecodePlan plan;
  const int64_t D = p.head_dim, G = p.heads_kv > 0 ? p.heads_q / p.heads_kv : 0;
  const int64_t key_steps = G * ceil_div(p.window_size + 1, kDecodeWarps);
  const int64_t rows_per_thread = D > 0 ? ceil_div(2 * D, imax(1, kDecodeThreads / D)) : 0;
  const int64_t sweep_steps = ceil_div(G, kDecodeHeadBlock) * rows_per_thread;
  plan.step = make_launch("decode_step_kernel", {p.batch * p.heads_kv}, kDecodeThreads,
                          int64_t(sizeof(float)) * decode_step_smem_floats(D, G),
                          key_steps + sweep_steps);
  plan.pos = make_launch("decode_pos_kernel", {ceil_div(p.batch, kDecodePosThreads)},
                         kDecodePosThreads, 0, 1);
  return plan;
}

}  // namespace rattention::cuda
