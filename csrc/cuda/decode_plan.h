// Launch plan of the decode step (decode_split_kernel, then decode_combine_kernel): the one
// place its grid, block, shared memory and workspace are computed (see launch_plan.h).
// decode.cu launches what this returns; the op allocates the workspace it names.
#pragma once
#include "core/params.h"
#include "cuda/launch_plan.h"

namespace rattention::cuda {

constexpr int kDecodeThreads = 256;
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kDecodeHeadBlock = 8;   // query heads accumulated together in the state sweep
constexpr int kDecodeKeyTile = 32;    // ring keys per shared-memory tile (one per lane)
constexpr int kDecodeMaxSplits = 32;  // the combine merges the splits of a head in one warp
constexpr int kDecodeMinKeysPerSplit = 8;
constexpr int kDecodeColumnVec = 4;   // state columns per float4 of the sweep
// The target CTA count when the op names none: the SM count of an H200 (the reference GPU).
constexpr int64_t kDecodeDefaultTargetCtas = 132;

// How one (sequence, kv head) is split across CTAs: CTA j of `splits` takes ring positions
// [j * keys, (j + 1) * keys) of the window (counted from its oldest position) and state
// columns [j * columns, (j + 1) * columns).
struct DecodeSplit {
  int64_t splits = 1, keys = 1, columns = 1;
};

// The largest power of two <= x (x >= 1).
inline int64_t decode_pow2_floor(int64_t x) {
  int64_t r = 1;
  while (r * 2 <= x) r *= 2;
  return r;
}

// Enough splits that B * Hkv * splits reaches the target CTA count, but no more than the ring
// fills (kDecodeMinKeysPerSplit keys each) or than whole float4 column blocks of the state
// allow; a power of two so that it divides D.
inline DecodeSplit decode_split(const DecodeParams& p) {
  DecodeSplit s;
  const int64_t bh = imax(1, p.batch * p.heads_kv), ring = p.window_size + 1;
  const int64_t target = p.target_ctas > 0 ? p.target_ctas : kDecodeDefaultTargetCtas;
  int64_t n = imin(ceil_div(target, bh), ceil_div(ring, kDecodeMinKeysPerSplit));
  n = imin(n, imin(kDecodeMaxSplits, imax(1, p.head_dim / kDecodeColumnVec)));
  s.splits = decode_pow2_floor(imax(1, n));
  s.keys = ceil_div(ring, s.splits);
  s.columns = p.head_dim / s.splits;
  return s;
}

// Dynamic shared memory of decode_split_kernel, in floats, each region 16-byte aligned:
//   sQ [G, D] rotated queries, sPhiQ [G, 2D], sO [G, D] unnormalised SWA accumulators,
//   sM [G], sL [G] running max / sum, sKold [D], sPhiK [2D], sVold [columns], then the tile
//   region: sKf [kDecodeKeyTile, D + 4] rotated fp32 keys (rows padded: the lanes of a score
//   warp read different rows, spread over the banks), the raw key and value tiles
//   [2, kDecodeKeyTile, D] of the input dtype (cp.async destinations, two stages). After the
//   key tiles the state sweep reuses the tile region for its partials
//   sRed [kDecodeWarps, kDecodeHeadBlock, columns].
struct DecodeSmem {
  int64_t q, phi_q, o, m, l, k_old, phi_k, v_old, kf, k_tile, v_tile, red, floats;
};
inline int64_t decode_align4(int64_t floats) { return ceil_div(floats, 4) * 4; }
inline DecodeSmem decode_smem_layout(int64_t D, int64_t G, int64_t columns) {
  DecodeSmem s{};
  s.q = 0;
  s.phi_q = s.q + G * D;
  s.o = s.phi_q + G * 2 * D;
  s.m = s.o + G * D;
  s.l = decode_align4(s.m + G);
  s.k_old = decode_align4(s.l + G);
  s.phi_k = s.k_old + D;
  s.v_old = s.phi_k + 2 * D;
  s.kf = decode_align4(s.v_old + columns);
  s.k_tile = s.kf + kDecodeKeyTile * (D + 4);
  const int64_t tile_floats = kDecodeKeyTile * D / 2;  // 2-byte elements
  s.v_tile = s.k_tile + 2 * tile_floats;  // two stages each
  s.red = s.kf;
  s.floats = imax(s.v_tile + 2 * tile_floats, s.red + kDecodeWarps * kDecodeHeadBlock * columns);
  return s;
}

// Workspace (fp32 words): the SWA partials [B * Hkv, splits, G, D + 2] (unnormalised o, then
// max and sum), o_rla [B * Hkv, G, D] (each split writes its own columns), then the
// positions the split CTAs read [B] as int64 (two words each; the combine kernel takes the
// position from here, so it may advance pos itself).
struct DecodeWorkspace {
  int64_t swa, rla, pos, floats;
};
inline DecodeWorkspace decode_workspace_layout(const DecodeParams& p, const DecodeSplit& s) {
  DecodeWorkspace w{};
  const int64_t D = p.head_dim, bh = p.batch * p.heads_kv;
  w.swa = 0;
  w.rla = w.swa + bh * s.splits * p.heads_q / imax(1, p.heads_kv) * (D + 2);
  w.pos = ceil_div(w.rla + bh * p.heads_q / imax(1, p.heads_kv) * D, 2) * 2;  // 8 B aligned
  w.floats = w.pos + 2 * p.batch;
  return w;
}

struct DecodePlan {
  KernelLaunch split, combine;  // decode_split_kernel, decode_combine_kernel
  DecodeSplit shape;
  int64_t workspace_bytes = 0;
  template <class F>
  void for_each(F&& f) const {
    f(split);
    f(combine);
  }
};

// Grid of the split kernel: (B * Hkv, splits); of the combine kernel: B * Hkv. serial_steps
// at a full ring: a split CTA's key tiles (each warp walks them for its ceil(G / warps)
// heads) plus its state sweep (rows per thread, per block of 8 heads); the combine walks the
// splits once per head of a warp.
inline DecodePlan decode_plan(const DecodeParams& p) {
  DecodePlan plan;
  const int64_t D = p.head_dim, G = p.heads_kv > 0 ? p.heads_q / p.heads_kv : 0;
  const DecodeSplit s = decode_split(p);
  plan.shape = s;
  const int64_t heads_per_warp = ceil_div(G, kDecodeWarps);
  const int64_t key_steps = ceil_div(s.keys, kDecodeKeyTile) * heads_per_warp;
  const int64_t col_vecs = imax(1, s.columns / kDecodeColumnVec);
  const int64_t rows_per_thread = ceil_div(2 * D, imax(1, kDecodeThreads / col_vecs));
  const int64_t sweep_steps = ceil_div(G, kDecodeHeadBlock) * rows_per_thread;
  const int64_t bh = p.batch * p.heads_kv;
  plan.split = make_launch("decode_split_kernel", {bh, s.splits}, kDecodeThreads,
                           int64_t(sizeof(float)) * decode_smem_layout(D, G, s.columns).floats,
                           key_steps + sweep_steps);
  plan.combine = make_launch("decode_combine_kernel", {bh}, kDecodeThreads, 0,
                             s.splits * heads_per_warp);
  plan.workspace_bytes = int64_t(sizeof(float)) * decode_workspace_layout(p, s).floats;
  return plan;
}

}  // namespace rattention::cuda
