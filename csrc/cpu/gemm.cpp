// Portable implementation of cpu/gemm.h (correct for every case; the fast paths live in
// the ISA-specific files when present).
#include "gemm.h"

#include <cmath>
#include <limits>
#include <vector>

#include "tile_io.h"

namespace rattention::cpu {

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  auto a_at = [&](int64_t i, int64_t k) { return trans_a ? A[k * lda + i] : A[i * lda + k]; };
  auto b_at = [&](int64_t k, int64_t j) { return trans_b ? B[j * ldb + k] : B[k * ldb + j]; };
  std::vector<T> row(N);
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) row[j] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T a = a_at(i, k);
      if (!trans_b) {
        const T* brow = B + k * ldb;
        for (int64_t j = 0; j < N; ++j) row[j] += a * brow[j];
      } else {
        for (int64_t j = 0; j < N; ++j) row[j] += a * b_at(k, j);
      }
    }
    T* crow = C + i * ldc;
    if (beta == T(0)) {
      for (int64_t j = 0; j < N; ++j) crow[j] = alpha * row[j];
    } else {
      for (int64_t j = 0; j < N; ++j) crow[j] = alpha * row[j] + beta * crow[j];
    }
  }
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
                          const float*, int64_t, float, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                           const double*, int64_t, double, double*, int64_t);

// ---- online-softmax row primitives (portable) -------------------------------------------
float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

float exp_sub_sum(float* x, int64_t n, float sub) {
  float s = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - sub);
    s += x[j];
  }
  return s;
}

}  // namespace rattention::cpu
