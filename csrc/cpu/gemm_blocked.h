// Cache-blocking driver of the float GEMM micro-kernels (gemm_avx2.cpp, gemm_avx512.cpp).
//
// C[M, N] = alpha * op(A) @ op(B) + beta * C (cpu/gemm.h). B is packed into zero-padded
// panels of Isa::kNR columns per (kKC x kNC) block, unless its rows already hold whole panels
// (read in place); A is read through (row, col) strides; each Isa::kMR x Isa::kNR block of C
// is one micro-kernel call over the block's K. `Isa` is a struct of the including file
// (its own namespace), so every instantiation is compiled with that file's ISA flags.
#pragma once
#include <algorithm>
#include <cstdint>

namespace rattention::cpu {

template <class Isa>
void gemm_blocked(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                  const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                  int64_t ldc) {
  constexpr int kMR = Isa::kMR, kNR = Isa::kNR;
  constexpr int64_t kKC = Isa::kKC, kNC = Isa::kNC;
  if (M <= 0 || N <= 0) return;
  const int64_t rs = trans_a ? 1 : lda;  // A(i, k) = A[i * rs + k * cs]
  const int64_t cs = trans_a ? lda : 1;
  if (K <= 0) {
    // C = beta * C (beta == 0: zeros, even over NaN)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
    return;
  }
  if (!trans_b && N % kNR == 0) {  // rows of B already hold whole panels: read in place
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min<int64_t>(kKC, K - k0);
      const float b_eff = k0 == 0 ? beta : 1.f;
      for (int64_t i0 = 0; i0 < M; i0 += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, M - i0));
        const float* Ai = A + i0 * rs + k0 * cs;
        for (int64_t j0 = 0; j0 < N; j0 += kNR)
          Isa::kernel(mr)(kc, Ai, rs, cs, B + k0 * ldb + j0, ldb, alpha, b_eff,
                          C + i0 * ldc + j0, ldc, kNR);
      }
    }
    return;
  }
  const int64_t nc_max = std::min<int64_t>(N, kNC);
  const int64_t kc_max = std::min<int64_t>(K, kKC);
  float* Bp = Isa::packed_buffer(((nc_max + kNR - 1) / kNR) * kNR * kc_max);
  for (int64_t n0 = 0; n0 < N; n0 += kNC) {
    const int64_t nc = std::min<int64_t>(kNC, N - n0);
    const int64_t n_panels = (nc + kNR - 1) / kNR;
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min<int64_t>(kKC, K - k0);
      const float b_eff = k0 == 0 ? beta : 1.f;
      Isa::pack_b(trans_b, B, ldb, k0, kc, n0, nc, Bp);
      for (int64_t i0 = 0; i0 < M; i0 += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, M - i0));
        const float* Ai = A + i0 * rs + k0 * cs;
        for (int64_t p = 0; p < n_panels; ++p) {
          const int64_t j0 = p * kNR;
          const int64_t nj = std::min<int64_t>(kNR, nc - j0);
          Isa::kernel(mr)(kc, Ai, rs, cs, Bp + p * kc * kNR, kNR, alpha, b_eff,
                          C + i0 * ldc + n0 + j0, ldc, nj);
        }
      }
    }
  }
}

}  // namespace rattention::cpu
