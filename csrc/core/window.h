// Window and shift arithmetic: the one place both backends learn which keys a query sees.
//
// SWA: query t sees keys s with 0 <= t - s <= w            (w + 1 keys, fewer at the start)
// RLA: query t sees keys s with t - s >= w + 1 (s >= 0)     (exactly the complement in the past)
//
// Tiles: a query tile is rows [m0, m0 + kBlockM), a key tile columns [n0, n0 + kBlockN).
// For the forward pass a query tile visits key tiles n_begin .. n_end-1; the pairs at the
// window's two edges need an element mask, the interior pairs do not. The backward pass
// iterates the transpose: for a key tile, the query tiles that can see it.
//
// Continued chunks (a halo of earlier keys): query row t (of Tq) sits at key position
// t + q_off (q_off = halo, keys numbered 0 .. Tk-1 with Tk = Tq + q_off). The tile functions
// taking (Tq, Tk, q_off) handle that; the (T, window) forms are the q_off = 0 case.
#pragma once
#include <cstdint>

#include "macros.h"

namespace rattention {

RATT_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
RATT_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
RATT_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// ---- element level -------------------------------------------------------------------
// First key query t sees (inclusive); the last is t itself.
RATT_HD int64_t swa_first_key(int64_t t, int64_t window) { return imax(0, t - window); }
// Is key s visible to query t in the SWA branch?
RATT_HD bool swa_visible(int64_t t, int64_t s, int64_t window) {
  return s <= t && t - s <= window;
}
// RLA shift: query t's linear-attention keys are s <= t - rla_shift(w).
RATT_HD int64_t rla_shift(int64_t window) { return window + 1; }
// Is key s inside query t's RLA state?
RATT_HD bool rla_visible(int64_t t, int64_t s, int64_t window) {
  return s >= 0 && t - s >= window + 1;
}
// Number of keys whose phi(k) v^T is in the state after T tokens (the final state holds
// keys 0 .. T - w - 2).
RATT_HD int64_t rla_state_len(int64_t T, int64_t window) { return imax(0, T - window - 1); }

// ---- tile level: SWA forward ---------------------------------------------------------
// Key tiles [n_begin, n_end) a query tile m must visit (tile size bm x bn, length T).
struct TileRange {
  int64_t begin;
  int64_t end;  // exclusive; empty when begin >= end
};

RATT_HD TileRange swa_key_tiles_for_query_tile(int64_t m, int bm, int bn, int64_t T,
                                               int64_t window) {
  const int64_t m0 = m * bm;
  const int64_t m1 = imin(T, m0 + bm);  // exclusive
  const int64_t first_key = swa_first_key(m0, window);
  const int64_t last_key = m1 - 1;  // causal: the last row sees itself
  return TileRange{first_key / bn, last_key / bn + 1};
}

// Does the (query tile m, key tile n) pair need an element mask? False only when every
// key of the tile is visible to every query of the tile and both tiles are full (in T).
RATT_HD bool swa_tile_needs_mask(int64_t m, int64_t n, int bm, int bn, int64_t T,
                                 int64_t window) {
  const int64_t m0 = m * bm, m_last = m0 + bm - 1;
  const int64_t n0 = n * bn, n_last = n0 + bn - 1;
  if (m_last >= T || n_last >= T) return true;  // ragged tail
  const bool right_ok = n_last <= m0;           // newest key no later than oldest query
  const bool left_ok = m_last - n0 <= window;   // oldest key within newest query's window
  return !(right_ok && left_ok);
}

// Halo-aware forms (see the file comment).
RATT_HD TileRange swa_key_tiles_for_query_tile(int64_t m, int bm, int bn, int64_t Tq,
                                               int64_t q_off, int64_t window) {
  const int64_t m0 = m * bm;
  const int64_t m1 = imin(Tq, m0 + bm);
  const int64_t first_key = swa_first_key(m0 + q_off, window);
  const int64_t last_key = m1 - 1 + q_off;
  return TileRange{first_key / bn, last_key / bn + 1};
}

RATT_HD bool swa_tile_needs_mask(int64_t m, int64_t n, int bm, int bn, int64_t Tq, int64_t Tk,
                                 int64_t q_off, int64_t window) {
  const int64_t m0 = m * bm, m_last = m0 + bm - 1;
  const int64_t n0 = n * bn, n_last = n0 + bn - 1;
  if (m_last >= Tq || n_last >= Tk) return true;
  const bool right_ok = n_last <= m0 + q_off;
  const bool left_ok = m_last + q_off - n0 <= window;
  return !(right_ok && left_ok);
}

// Query tiles that see some key of key tile n; empty (begin == end) when none does.
RATT_HD TileRange swa_query_tiles_for_key_tile(int64_t n, int bm, int bn, int64_t Tq,
                                               int64_t Tk, int64_t q_off, int64_t window) {
  const int64_t n0 = n * bn;
  const int64_t n_last = imin(Tk, n0 + bn) - 1;
  const int64_t first_query = imax(0, n0 - q_off);
  const int64_t last_query = imin(Tq - 1, n_last + window - q_off);
  if (last_query < first_query) return TileRange{0, 0};
  return TileRange{first_query / bm, last_query / bm + 1};
}

// ---- tile level: SWA backward --------------------------------------------------------
// Query tiles [begin, end) that see some key of key tile n: queries t in [n0, n_last + w].
RATT_HD TileRange swa_query_tiles_for_key_tile(int64_t n, int bm, int bn, int64_t T,
                                               int64_t window) {
  const int64_t n0 = n * bn;
  const int64_t n_last = imin(T, n0 + bn) - 1;
  const int64_t last_query = imin(T - 1, n_last + window);
  return TileRange{n0 / bm, last_query / bm + 1};
}

// ---- RLA chunks ----------------------------------------------------------------------
// Chunk c covers query rows [c*C, c*C + C). Its shifted keys are s = t - (w + 1) for the
// same rows; the valid ones (s >= 0) are [max(0, c*C - w - 1), max(0, c*C + C - w - 1)).
RATT_HD TileRange rla_chunk_keys(int64_t c, int chunk, int64_t T, int64_t window) {
  const int64_t t0 = c * chunk;
  const int64_t t1 = imin(T, t0 + chunk);
  return TileRange{imax(0, t0 - window - 1), imax(0, t1 - window - 1)};
}

// Number of state checkpoints for n_chunks chunks saved every `every` chunks: the state at
// the start of chunks 0, every, 2*every, ... .
RATT_HD int64_t rla_num_checkpoints(int64_t n_chunks, int64_t every) {
  return ceil_div(n_chunks, every);
}

}  // namespace rattention
