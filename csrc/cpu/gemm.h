// Small dense matrix products for the CPU kernels' per-tile work (row-major, BLAS-like).
//
//   C[M, N] = alpha * op(A) @ op(B) + beta * C
//   op(A) is A[M, K] (lda) or, with trans_a, A stored as [K, M]; op(B) is B[K, N] (ldb) or,
//   with trans_b, B stored as [N, K]. beta == 0 ignores C's old contents (even NaN).
//
// Implemented for float and double; the float path picks an AVX-512 / AVX2 micro-kernel
// at run time when the CPU has one.
#pragma once
#include <cstdint>

namespace rattention::cpu {

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

}  // namespace rattention::cpu
