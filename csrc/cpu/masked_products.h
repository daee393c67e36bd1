// Exact masked products for the NaN / Inf rule (SPEC.md): a masked score never multiplies a
// value. The tile GEMMs multiply a masked matrix (probabilities, dS, RLA scores) whose masked
// entries are exactly 0 by the other operand as a whole, so one NaN or Inf there (a later
// token, a key outside the window, padding) would turn 0 * NaN into NaN in rows that cannot
// see it. Kernels therefore check the other operand of each masked product (cheap: one pass
// over a tile that the GEMM reads anyway) and, only when it holds a non-finite value, run the
// product below instead. Finite tiles keep the fast GEMM.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "gemm.h"

namespace rattention::cpu {

// True when every value of the [n, D] block (row stride ld) is finite. An integer OR over
// "exponent all ones" so the compiler vectorises it (no floating-point reduction).
template <typename acc_t>
inline bool all_finite(const acc_t* x, int64_t n, int64_t D, int64_t ld) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 8, uint64_t, uint32_t>;
  constexpr bits_t kExp = sizeof(acc_t) == 8 ? bits_t(0x7ff0000000000000ull) : bits_t(0x7f800000u);
  bits_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* row = x + i * ld;
    for (int64_t j = 0; j < D; ++j) {
      bits_t b;
      std::memcpy(&b, row + j, sizeof(b));
      bad |= static_cast<bits_t>((b & kExp) == kExp);
    }
  }
  return bad == 0;
}

// Visible columns [lo, hi) of a row, as a masked kernel defines them.
struct ColumnRange {
  int64_t lo, hi;
};

namespace masked_detail {
struct Entry {
  int64_t row, col;
};
// B [rows, D] (row stride ldb) with its non-finite entries set to 0, into a dense [rows, D]
// scratch `buf`; the positions of those entries into `bad`.
template <typename acc_t>
inline const acc_t* finite_copy(const acc_t* B, int64_t rows, int64_t D, int64_t ldb,
                                std::vector<acc_t>& buf, std::vector<Entry>& bad) {
  buf.resize(static_cast<size_t>(rows * D));
  bad.clear();
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < D; ++d) {
      const acc_t x = B[i * ldb + d];
      const bool finite = x - x == acc_t(0);  // x - x is NaN for NaN and +-Inf
      buf[i * D + d] = finite ? x : acc_t(0);
      if (!finite) bad.push_back({i, d});
    }
  return buf.data();
}
}  // namespace masked_detail

// The products below are the tile GEMMs of the fast path, run on B with its non-finite
// entries replaced by 0 (the same GEMM call, so every output that cannot see them comes out
// bit for bit as with finite inputs: fma(0, 0, c) = fma(0, b, c) = c), followed by the terms
// of the non-finite entries for the rows that see them, which makes exactly those outputs
// non-finite. A masked entry of A is exactly 0 and never meets a non-finite B entry.

// C[R, D] += alpha * A[R, n] @ B[n, D], non-finite B[j, d] reaching row r iff j in vis(r).
template <typename acc_t, typename Visible>
inline void masked_gemm_nn(int64_t R, int64_t n, int64_t D, acc_t alpha, const acc_t* A,
                           int64_t lda, const acc_t* B, int64_t ldb, acc_t* C, int64_t ldc,
                           Visible vis) {
  thread_local std::vector<acc_t> buf;
  thread_local std::vector<masked_detail::Entry> bad;
  const acc_t* Bz = masked_detail::finite_copy(B, n, D, ldb, buf, bad);
  gemm<acc_t>(false, false, R, D, n, alpha, A, lda, Bz, D, acc_t(1), C, ldc);
  for (int64_t r = 0; r < R; ++r) {
    const ColumnRange cr = vis(r);
    for (const auto& e : bad)  // e.row is a key j of B
      if (e.row >= cr.lo && e.row < cr.hi)
        C[r * ldc + e.col] += alpha * A[r * lda + e.row] * B[e.row * ldb + e.col];
  }
}

// C[n, D] += alpha * A[R, n]^T @ B[R, D], non-finite B[r, d] reaching row j iff j in vis(r).
template <typename acc_t, typename Visible>
inline void masked_gemm_tn(int64_t R, int64_t n, int64_t D, acc_t alpha, const acc_t* A,
                           int64_t lda, const acc_t* B, int64_t ldb, acc_t* C, int64_t ldc,
                           Visible vis) {
  thread_local std::vector<acc_t> buf;
  thread_local std::vector<masked_detail::Entry> bad;
  const acc_t* Bz = masked_detail::finite_copy(B, R, D, ldb, buf, bad);
  gemm<acc_t>(true, false, n, D, R, alpha, A, lda, Bz, D, acc_t(1), C, ldc);
  for (const auto& e : bad) {  // e.row is a query row r of B
    const ColumnRange cr = vis(e.row);
    const acc_t b = B[e.row * ldb + e.col];
    for (int64_t j = cr.lo; j < cr.hi; ++j) C[j * ldc + e.col] += alpha * A[e.row * lda + j] * b;
  }
}

// Zero row entries outside [lo, hi) (masked probabilities / dS stay exactly 0 even when the
// row's lse or Di is not finite).
template <typename acc_t>
inline void zero_outside(acc_t* row, int64_t n, ColumnRange cr) {
  for (int64_t j = 0; j < cr.lo; ++j) row[j] = acc_t(0);
  for (int64_t j = cr.hi; j < n; ++j) row[j] = acc_t(0);
}

}  // namespace rattention::cpu
