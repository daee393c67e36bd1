// Tile load / convert / rotary helpers shared by the CPU attention kernels, plus the
// vectorised row primitives of the online softmax (implemented in gemm.cpp, with an
// AVX-512 path in gemm_avx512.cpp picked at run time).
//
// A "tile" here is a run of consecutive tokens of one head, packed into a contiguous
// acc-type buffer [rows, D] (ld = D) so the per-tile products can go through cpu::gemm.
// Packing converts the storage type once, applies rotary once, and hides the strides.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../core/dtype.h"
#include "../core/online_softmax.h"
#include "../core/params.h"
#include "../core/rotary.h"
#include "../core/window.h"
#include "masked_products.h"
#include "parallel.h"

namespace rattention::cpu {

// dst[0:D] = convert(src[0:D]) (src contiguous over D).
template <typename T, typename acc_t>
inline void load_row(const T* src, acc_t* dst, int64_t D) {
  for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<acc_t>(Convert<T>::load(src[i]));
}

// dst[0:D] = convert(src[0:D]) to the storage type T (rounding for bf16).
template <typename T, typename acc_t>
inline void store_row(const acc_t* src, T* dst, int64_t D) {
  for (int64_t i = 0; i < D; ++i) dst[i] = Convert<T>::store(src[i]);
}

// Pack n rows of one head starting at element offset `off` (rows st.t apart) into
// dst [n, D] (ld = D), optionally rotating row i with rotary row pos0 + i (its position in
// its own sequence, see QkvParams::q_offset / k_offset for `off`).
template <typename T, typename acc_t>
inline void pack_rows(const T* base, const Strides4& st, int64_t off, int64_t n, int64_t D,
                      const acc_t* cos, const acc_t* sin, int64_t pos0, acc_t* dst) {
  const T* src = base + off;
  for (int64_t i = 0; i < n; ++i) {
    acc_t* row = dst + i * D;
    load_row<T, acc_t>(src + i * st.t, row, D);
    if (cos != nullptr) {
      const int64_t t = pos0 + i;
      rotary_apply<acc_t>(row, cos + t * (D / 2), sin + t * (D / 2), static_cast<int>(D),
                          /*inverse=*/false);
    }
  }
}

// Runs fn(item, scratch) for every item in [0, n) on the thread pool. Items are handed out
// one at a time from a shared counter (dynamic scheduling: on a shared machine a slowed
// thread does not hold the others up); each worker builds its scratch once with make().
// Every item's result is computed by one call in a fixed order, so the output does not
// depend on which thread ran it or on the thread count.
template <typename MakeScratch, typename Fn>
void parallel_items(int64_t n, MakeScratch make, Fn fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, std::max(1, max_threads()));
  parallel_for(workers, 1, [&](int64_t, int64_t) {
    auto scratch = make();
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i, scratch);
  });
}

// Columns j of key tile [n0, n0 + bn) that query t sees: t - window <= n0 + j <= t.
inline ColumnRange swa_visible_cols(int64_t t, int64_t n0, int64_t bn, int64_t window) {
  const int64_t lo = imin(bn, imax(0, t - window - n0));
  return ColumnRange{lo, imax(lo, imin(bn, t - n0 + 1))};
}

// Set the scores of keys n0 .. n0+bn-1 that query t does not see (SWA window) to -inf.
template <typename acc_t>
inline void mask_row(acc_t* srow, int64_t t, int64_t n0, int64_t bn, int64_t window) {
  const ColumnRange cr = swa_visible_cols(t, n0, bn, window);
  const int64_t lo = cr.lo, hi = cr.hi;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < lo; ++j) srow[j] = ninf;
  for (int64_t j = hi; j < bn; ++j) srow[j] = ninf;
}

// ---- online-softmax row primitives -----------------------------------------------------
// max over x[0:n] (-inf for an all -inf row).
float row_max(const float* x, int64_t n);
// x[j] = exp(x[j] - sub) in place (exp(-inf) = 0); returns sum_j x[j]. `sub` is finite.
float exp_sub_sum(float* x, int64_t n, float sub);

inline double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}
inline double exp_sub_sum(double* x, int64_t n, double sub) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - sub);
    s += x[j];
  }
  return s;
}

// One online-softmax step over a tile of scores S [R, bn] (row stride lds, invisible keys
// already -inf): per row r, update st[r] with the tile, overwrite S with p = exp(s - m_new),
// and rescale the accumulator row O[r, 0:D] (stride ldo) by exp(m_old - m_new).
void softmax_tile(float* S, int64_t lds, int64_t R, int64_t bn, OnlineSoftmaxRow<float>* st,
                  float* O, int64_t ldo, int64_t D);

template <typename acc_t>
inline void softmax_tile_generic(acc_t* S, int64_t lds, int64_t R, int64_t bn,
                                 OnlineSoftmaxRow<acc_t>* st, acc_t* O, int64_t ldo, int64_t D) {
  for (int64_t r = 0; r < R; ++r) {
    acc_t* srow = S + r * lds;
    const acc_t factor = online_softmax_rescale(st[r], row_max(srow, bn));
    if (st[r].m == neg_inf<acc_t>()) {
      // No visible finite score yet for this row: p = 0 (avoids -inf - -inf).
      online_softmax_mark_nan(st[r], srow, bn);
      for (int64_t j = 0; j < bn; ++j) srow[j] = acc_t(0);
    } else {
      st[r].l += exp_sub_sum(srow, bn, st[r].m);
    }
    if (factor != acc_t(1)) {
      acc_t* orow = O + r * ldo;
      for (int64_t i = 0; i < D; ++i) orow[i] *= factor;
    }
  }
}

inline void softmax_tile(double* S, int64_t lds, int64_t R, int64_t bn,
                         OnlineSoftmaxRow<double>* st, double* O, int64_t ldo, int64_t D) {
  softmax_tile_generic<double>(S, lds, R, bn, st, O, ldo, D);
}

}  // namespace rattention::cpu
