// Portable implementation of cpu/gemm.h (correct for every case; the fast paths live in
// the ISA-specific files when present).
#include "gemm.h"

#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "tile_io.h"

namespace rattention::cpu {

namespace avx512 {  // gemm_avx512.cpp (built with -mavx512f; call only when the CPU has it)
void gemm_f32(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
              const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
              int64_t ldc);
float row_max(const float* x, int64_t n);
float exp_sub_sum(float* x, int64_t n, float sub);
void softmax_tile(float* S, int64_t lds, int64_t R, int64_t bn, OnlineSoftmaxRow<float>* st,
                  float* O, int64_t ldo, int64_t D);
}  // namespace avx512

namespace avx2 {  // gemm_avx2.cpp (built with -mavx2 -mfma; call only when the CPU has both)
void gemm_f32(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
              const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
              int64_t ldc);
float row_max(const float* x, int64_t n);
float exp_sub_sum(float* x, int64_t n, float sub);
void softmax_tile(float* S, int64_t lds, int64_t R, int64_t bn, OnlineSoftmaxRow<float>* st,
                  float* O, int64_t ldo, int64_t D);
}  // namespace avx2

namespace {
enum class Isa { kPortable, kAvx2, kAvx512 };

// The widest float path this CPU runs, checked once per process. RATTENTION_CPU_ISA =
// portable | avx2 | avx512 caps it (tests and benchmarks of the narrower paths).
Isa cpu_isa() {
  static const Isa isa = [] {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    Isa best = Isa::kPortable;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (__builtin_cpu_supports("avx512f")) best = Isa::kAvx512;
    const char* env = std::getenv("RATTENTION_CPU_ISA");
    const std::string cap = env == nullptr ? "" : env;
    if (cap == "portable") return Isa::kPortable;
    if (cap == "avx2" && best == Isa::kAvx512) return Isa::kAvx2;
    return best;
#else
    return Isa::kPortable;
#endif
  }();
  return isa;
}

template <typename T>
void gemm_portable(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
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

}  // namespace

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    switch (cpu_isa()) {
      case Isa::kAvx512:
        return avx512::gemm_f32(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
      case Isa::kAvx2:
        return avx2::gemm_f32(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
      case Isa::kPortable:
        break;
    }
  }
  gemm_portable<T>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
                          const float*, int64_t, float, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                           const double*, int64_t, double, double*, int64_t);

// ---- online-softmax row primitives (portable) -------------------------------------------
float row_max(const float* x, int64_t n) {
  if (cpu_isa() == Isa::kAvx512) return avx512::row_max(x, n);
  if (cpu_isa() == Isa::kAvx2) return avx2::row_max(x, n);
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

float exp_sub_sum(float* x, int64_t n, float sub) {
  if (cpu_isa() == Isa::kAvx512) return avx512::exp_sub_sum(x, n, sub);
  if (cpu_isa() == Isa::kAvx2) return avx2::exp_sub_sum(x, n, sub);
  float s = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - sub);
    s += x[j];
  }
  return s;
}

void softmax_tile(float* S, int64_t lds, int64_t R, int64_t bn, OnlineSoftmaxRow<float>* st,
                  float* O, int64_t ldo, int64_t D) {
  if (cpu_isa() == Isa::kAvx512) return avx512::softmax_tile(S, lds, R, bn, st, O, ldo, D);
  if (cpu_isa() == Isa::kAvx2) return avx2::softmax_tile(S, lds, R, bn, st, O, ldo, D);
  softmax_tile_generic<float>(S, lds, R, bn, st, O, ldo, D);
}

}  // namespace rattention::cpu
