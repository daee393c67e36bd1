// Exact masked products for the NaN / Inf rule (SPEC.md): a masked score never multiplies a
// value. The tile GEMMs multiply a masked matrix (probabilities, dS, RLA scores) whose masked
// entries are exactly 0 by the other operand as a whole, so one NaN or Inf there (a later
// token, a key outside the window, padding) would turn 0 * NaN into NaN in rows that cannot
// see it. Kernels therefore check the other operand of each masked product (cheap: one pass
// over a tile that the GEMM reads anyway) and, only when it holds a non-finite value, run the
// product below instead, which sums visible pairs only. Finite tiles keep the fast GEMM.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

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

// C[r, 0:D] += alpha * sum_{j in vis(r)} A[r, j] * B[j, 0:D]      (A [R, *], B [*, D])
template <typename acc_t, typename Visible>
inline void masked_gemm_nn(int64_t R, int64_t D, acc_t alpha, const acc_t* A, int64_t lda,
                           const acc_t* B, int64_t ldb, acc_t* C, int64_t ldc, Visible vis) {
  for (int64_t r = 0; r < R; ++r) {
    const ColumnRange cr = vis(r);
    acc_t* c = C + r * ldc;
    for (int64_t j = cr.lo; j < cr.hi; ++j) {
      const acc_t a = alpha * A[r * lda + j];
      const acc_t* b = B + j * ldb;
      for (int64_t d = 0; d < D; ++d) c[d] += a * b[d];
    }
  }
}

// C[j, 0:D] += alpha * sum_{r : j in vis(r)} A[r, j] * B[r, 0:D]  (A [R, *], B [R, D])
template <typename acc_t, typename Visible>
inline void masked_gemm_tn(int64_t R, int64_t D, acc_t alpha, const acc_t* A, int64_t lda,
                           const acc_t* B, int64_t ldb, acc_t* C, int64_t ldc, Visible vis) {
  for (int64_t r = 0; r < R; ++r) {
    const ColumnRange cr = vis(r);
    const acc_t* b = B + r * ldb;
    for (int64_t j = cr.lo; j < cr.hi; ++j) {
      const acc_t a = alpha * A[r * lda + j];
      acc_t* c = C + j * ldc;
      for (int64_t d = 0; d < D; ++d) c[d] += a * b[d];
    }
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
