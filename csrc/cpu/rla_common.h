// Shared pieces of the CPU residual-linear-attention kernels (rla_fwd.cpp, rla_bwd.cpp).
//
// Chunked linear attention with the w + 1 shift done by index arithmetic (core/window.h):
// chunk c holds query rows [t0, t0 + nq) and the shifted keys s in [s0, s0 + nk) =
// rla_chunk_keys(c); query t sees key s iff s <= t - w - 1. Key ranges of consecutive
// chunks are contiguous and partition [0, T - w - 1), so the state at the start of chunk c
// holds exactly the keys s < s0(c) and every later query sees all of them.
//
// Work split (see rla_fwd.cpp / rla_bwd.cpp): a "segment" is `checkpoint_every` chunks; the
// forward saves the state at each segment start. Everything here is torch-free.
//
// Sequences (QkvParams): the chunking runs per sequence b over its own q rows. A halo of
// h = halo(b) keys before q's first token is index arithmetic too: query row t sits at key
// row t + h, so it sees key rows s <= t + h - w - 1, i.e. the same rule with the window
// w - h (>= -1, since h <= w + 1). Geometry holds that effective window.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../core/dtype.h"
#include "../core/feature_map.h"
#include "../core/params.h"
#include "../core/window.h"
#include "gemm.h"
#include "masked_products.h"
#include "parallel.h"

namespace rattention::cpu::rla_detail {

// Sizes and chunk/segment bookkeeping of one sequence.
struct Geometry {
  int64_t Hq, Hkv, G, D, F, C, every;  // shared by all sequences
  int64_t T;                           // query rows of this sequence
  int64_t w;                           // effective window: window_size - halo (>= -1)
  int64_t n_chunks, n_seg;

  Geometry(const RlaCommonParams& p, int64_t b)
      : Hq(p.dims.heads_q), Hkv(p.dims.heads_kv), G(p.dims.group()), D(p.dims.head_dim),
        F(2 * p.dims.head_dim), C(p.chunk_size), every(p.checkpoint_every), T(p.seqlen_q(b)),
        w(p.window_size - p.halo(b)), n_chunks(ceil_div(T, C)),
        n_seg(rla_num_checkpoints(n_chunks, every)) {}

  int64_t seg_first_chunk(int64_t sg) const { return sg * every; }
  int64_t seg_end_chunk(int64_t sg) const { return imin(n_chunks, (sg + 1) * every); }
  // Key rows that ever enter the state: s < state_len (the rest stay in the window).
  int64_t state_len() const { return rla_state_len(T, w); }
  int64_t state_elems() const { return F * D; }
};

// One chunk's query rows [t0, t0 + nq) and shifted key rows [s0, s0 + nk).
struct ChunkRange {
  int64_t t0, nq, s0, nk;
};

inline ChunkRange chunk_range(const Geometry& g, int64_t c) {
  const TileRange keys = rla_chunk_keys(c, static_cast<int>(g.C), g.T, g.w);
  const int64_t t0 = c * g.C;
  return ChunkRange{t0, imin(g.T, t0 + g.C) - t0, keys.begin, keys.end - keys.begin};
}

// Zero M[i, j] (row-major [nq, nk], leading dim ld) where query t0 + i cannot see key
// s0 + j, i.e. s0 + j > t0 + i - w - 1. Row i keeps j < t0 + i - w - s0 (clamped to [0, nk]).
inline ColumnRange chunk_visible_cols(const ChunkRange& r, int64_t w, int64_t i) {
  return ColumnRange{0, imax(0, imin(r.nk, r.t0 + i - w - r.s0))};
}

template <typename acc_t>
inline void mask_chunk(acc_t* M, int64_t ld, const ChunkRange& r, int64_t w) {
  for (int64_t i = 0; i < r.nq; ++i) {
    const int64_t keep = chunk_visible_cols(r, w, i).hi;
    acc_t* row = M + i * ld;
    for (int64_t j = keep; j < r.nk; ++j) row[j] = acc_t(0);
  }
}

// n rows of one head from element offset `off` (rows st.t apart: QkvParams::q_offset /
// k_offset), columns [j0, j0 + nc), converted to acc_t into dst [n, ld].
template <typename scalar_t, typename acc_t>
inline void load_rows(const scalar_t* base, const Strides4& st, int64_t off, int64_t n,
                      int64_t j0, int64_t nc, acc_t* dst, int64_t ld) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* src = base + off + i * st.t + j0 * st.d;
    acc_t* out = dst + i * ld;
    if (st.d == 1) {
      for (int64_t j = 0; j < nc; ++j) out[j] = static_cast<acc_t>(Convert<scalar_t>::load(src[j]));
    } else {
      for (int64_t j = 0; j < nc; ++j)
        out[j] = static_cast<acc_t>(Convert<scalar_t>::load(src[j * st.d]));
    }
  }
}

// phi of n rows: x [n, D] -> y [n, 2D].
template <typename acc_t>
inline void feature_rows(FeatureMap fm, const acc_t* x, acc_t* y, int64_t n, int64_t D) {
  for (int64_t i = 0; i < n; ++i) {
    feature_map_forward<acc_t>(fm, x + i * D, y + i * 2 * D, static_cast<int>(D));
  }
}

// Copy an [rows, nc] block between buffers with different leading dims.
template <typename acc_t>
inline void copy_block(const acc_t* src, int64_t lds, acc_t* dst, int64_t ldd, int64_t rows,
                       int64_t nc) {
  for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * ldd, src + i * lds, nc * sizeof(acc_t));
}

// dst[i, :nc] += src[i, :nc].
template <typename acc_t>
inline void add_block(const acc_t* src, int64_t lds, acc_t* dst, int64_t ldd, int64_t rows,
                      int64_t nc) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* s = src + i * lds;
    acc_t* d = dst + i * ldd;
    for (int64_t j = 0; j < nc; ++j) d[j] += s[j];
  }
}

// Split D value columns into nb blocks (multiples of 16 where possible) for task parallelism:
// linear attention is independent across value columns. Returns the block width.
inline int64_t column_block(int64_t D, int64_t want_blocks, int64_t min_width) {
  if (want_blocks <= 1 || D <= min_width) return D;
  int64_t nc = ceil_div(D, want_blocks);
  nc = imax(nc, min_width);
  nc = ceil_div(nc, 16) * 16;
  return imin(nc, D);
}

// Segment-parallel mode pays a state-only pre-pass to give every segment its own task; use
// it only when (sequences x kv heads) alone cannot keep the threads busy.
inline bool use_segment_parallel(const RlaCommonParams& p) {
  int64_t max_seg = 0;
  for (int64_t b = 0; b < p.num_seqs(); ++b) max_seg = imax(max_seg, Geometry(p, b).n_seg);
  return p.num_seqs() * p.dims.heads_kv < static_cast<int64_t>(max_threads()) && max_seg >= 2;
}

// (sequence, segment) pairs of every sequence, for the segment-parallel passes.
struct SeqSegment {
  int64_t seq, seg;
};
inline std::vector<SeqSegment> list_segments(const RlaCommonParams& p) {
  std::vector<SeqSegment> out;
  for (int64_t b = 0; b < p.num_seqs(); ++b) {
    const int64_t n = Geometry(p, b).n_seg;
    for (int64_t sg = 0; sg < n; ++sg) out.push_back(SeqSegment{b, sg});
  }
  return out;
}

}  // namespace rattention::cpu::rla_detail
