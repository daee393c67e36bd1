// AVX2 + FMA float paths of cpu/gemm.h and the online-softmax row primitives of tile_io.h,
// for x86-64 CPUs without AVX-512 (AMD Zen 1-4 client parts, most Intel client cores).
// Compiled with -mavx2 -mfma (CMake gives *_avx2.cpp the flags); only called after gemm.cpp
// has checked __builtin_cpu_supports("avx2") and ("fma").
//
// Same structure as gemm_avx512.cpp with 8-lane vectors: B packed into zero-padded panels of
// kNR = 16 columns (or read in place when its rows already hold whole panels), A read through
// (row, col) strides, a kMR x kNR = 6 x 16 register block of C (12 ymm accumulators + 2 B
// vectors + 1 broadcast = 15 of the 16 ymm registers) updated with broadcast-FMA over K.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "../core/online_softmax.h"
#include "gemm_blocked.h"

namespace rattention::cpu::avx2 {
namespace {

constexpr int kNV = 2;             // ymm vectors per row of the register block
constexpr int kNR = 8 * kNV;       // columns per panel
constexpr int kMR = 6;             // rows per register block
constexpr int64_t kKC = 512;       // K block (a panel of B stays in L1/L2 for long K)
constexpr int64_t kNC = 1024;      // N block of the packed B buffer

// Lanes [0, n) of an 8-lane vector as a maskload/maskstore mask (n clamped to [0, 8]).
inline __m256i tail_mask(int64_t n) {
  const int k = n >= 8 ? 8 : (n <= 0 ? 0 : static_cast<int>(n));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// Thread-local 32-byte aligned scratch for packed B.
float* packed_buffer(int64_t n_floats) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n_floats + 8) buf.resize(n_floats + 8);
  auto addr = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<float*>((addr + 31) & ~uintptr_t(31));
}

// dst[c][r] = src[r][c] for an 8 x 8 block (row strides lds, ldd).
inline void transpose_8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * ldd, t[i]);
}

// Pack op(B)[k0:k0+kc, n0:n0+nc] into panels of kNR columns: Bp[p][k][j], zero padding.
void pack_b(bool trans_b, const float* B, int64_t ldb, int64_t k0, int64_t kc, int64_t n0,
            int64_t nc, float* Bp) {
  const int64_t n_panels = (nc + kNR - 1) / kNR;
  for (int64_t p = 0; p < n_panels; ++p) {
    float* dst = Bp + p * kc * kNR;
    const int64_t j0 = n0 + p * kNR;
    const int64_t nj = std::min<int64_t>(kNR, n0 + nc - j0);
    if (!trans_b) {
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = B + (k0 + k) * ldb + j0;
        for (int v = 0; v < kNV; ++v)
          _mm256_store_ps(dst + k * kNR + 8 * v, _mm256_maskload_ps(src + 8 * v, tail_mask(nj - 8 * v)));
      }
    } else {
      // B stored [N, K]: full 8 x 8 blocks are transposed in registers, the ragged rest
      // element by element.
      if (nj < kNR) std::memset(dst, 0, sizeof(float) * kc * kNR);
      const int64_t nj8 = nj & ~int64_t(7), kc8 = kc & ~int64_t(7);
      for (int64_t jb = 0; jb < nj8; jb += 8)
        for (int64_t kb = 0; kb < kc8; kb += 8)
          transpose_8x8(B + (j0 + jb) * ldb + k0 + kb, ldb, dst + kb * kNR + jb, kNR);
      for (int64_t j = 0; j < nj; ++j) {
        const float* src = B + (j0 + j) * ldb + k0;
        for (int64_t k = (j < nj8 ? kc8 : 0); k < kc; ++k) dst[k * kNR + j] = src[k];
      }
    }
  }
}

// C[MR, nj] (ldc) = alpha * A[MR, kc] @ Bp[kc, kNR] + beta * C, A element (i, k) at
// A[i * rs + k * cs], Bp row k at Bp + k * ldbp; nj <= kNR columns stored (masked).
template <int MR>
inline void micro_kernel(int64_t kc, const float* A, int64_t rs, int64_t cs, const float* Bp,
                         int64_t ldbp, float alpha, float beta, float* C, int64_t ldc, int64_t nj) {
  __m256 acc[MR][kNV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < kNV; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m256 b[kNV];
#pragma GCC unroll 2
    for (int v = 0; v < kNV; ++v) b[v] = _mm256_loadu_ps(Bp + k * ldbp + 8 * v);
    const float* ak = A + k * cs;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(ak + i * rs);
#pragma GCC unroll 2
      for (int v = 0; v < kNV; ++v) acc[i][v] = _mm256_fmadd_ps(a, b[v], acc[i][v]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha);
  const __m256 vb = _mm256_set1_ps(beta);
  __m256i mask[kNV];
#pragma GCC unroll 2
  for (int v = 0; v < kNV; ++v) mask[v] = tail_mask(nj - 8 * v);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* c = C + i * ldc;
#pragma GCC unroll 2
    for (int v = 0; v < kNV; ++v) {
      __m256 r = _mm256_mul_ps(va, acc[i][v]);
      if (beta != 0.f) r = _mm256_fmadd_ps(vb, _mm256_maskload_ps(c + 8 * v, mask[v]), r);
      _mm256_maskstore_ps(c + 8 * v, mask[v], r);
    }
  }
}

using MicroKernel = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t,
                             float, float, float*, int64_t, int64_t);
template <int... I>
constexpr std::array<MicroKernel, sizeof...(I) + 1> make_kernels(std::integer_sequence<int, I...>) {
  return {nullptr, &micro_kernel<I + 1>...};
}
constexpr auto kKernels = make_kernels(std::make_integer_sequence<int, kMR>{});

// The blocking driver (gemm_blocked.h) over this file's packing and micro-kernels.
struct Isa {
  static constexpr int kMR = ::rattention::cpu::avx2::kMR;
  static constexpr int kNR = ::rattention::cpu::avx2::kNR;
  static constexpr int64_t kKC = ::rattention::cpu::avx2::kKC;
  static constexpr int64_t kNC = ::rattention::cpu::avx2::kNC;
  static MicroKernel kernel(int mr) { return kKernels[mr]; }
  static float* packed_buffer(int64_t n) { return ::rattention::cpu::avx2::packed_buffer(n); }
  static void pack_b(bool trans_b, const float* B, int64_t ldb, int64_t k0, int64_t kc,
                     int64_t n0, int64_t nc, float* Bp) {
    ::rattention::cpu::avx2::pack_b(trans_b, B, ldb, k0, kc, n0, nc, Bp);
  }
};

}  // namespace

void gemm_f32(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
              const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
              int64_t ldc) {
  gemm_blocked<Isa>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// ---- online-softmax row primitives -------------------------------------------------------
namespace {
// exp(x), the Cephes expf polynomial of gemm_avx512.cpp (~1 ulp); 2^n is built in the
// exponent field, so x is clamped to [-86, 88.3] (n in [-124, 127]: no denormal, no
// overflow of the field) and inputs below -86 (masked -inf scores included) give exactly 0.
// NaN propagates.
inline __m256 exp_ps(__m256 x_in) {
  const __m256 lo = _mm256_set1_ps(-86.f);
  const __m256 keep = _mm256_cmp_ps(x_in, lo, _CMP_NLT_UQ);  // x >= lo or NaN
  __m256 x = _mm256_max_ps(lo, x_in);  // max(lo, NaN) returns NaN (2nd operand)
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  const __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

// x[0:n] with lanes past n set to `fill`.
inline __m256 load_tail(const float* x, int64_t n, float fill) {
  const __m256i m = tail_mask(n);
  return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(x, m), _mm256_castsi256_ps(m));
}

}  // namespace

float row_max(const float* x, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  __m256 m = _mm256_set1_ps(ninf);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
  if (j < n) m = _mm256_max_ps(m, load_tail(x + j, n - j, ninf));
  return hmax(m);
}

float exp_sub_sum(float* x, int64_t n, float sub) {
  const __m256 vs = _mm256_set1_ps(sub);
  __m256 s = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vs));
    _mm256_storeu_ps(x + j, e);
    s = _mm256_add_ps(s, e);
  }
  if (j < n) {
    const __m256i m = tail_mask(n - j);
    const __m256 e = _mm256_and_ps(exp_ps(_mm256_sub_ps(_mm256_maskload_ps(x + j, m), vs)),
                                   _mm256_castsi256_ps(m));
    _mm256_maskstore_ps(x + j, m, e);
    s = _mm256_add_ps(s, e);
  }
  return hsum(s);
}

// One online-softmax step for a score tile (see gemm_avx512.cpp softmax_tile).
void softmax_tile(float* S, int64_t lds, int64_t R, int64_t bn, OnlineSoftmaxRow<float>* st,
                  float* O, int64_t ldo, int64_t D) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t nv = (bn + 7) / 8;
  for (int64_t r = 0; r < R; ++r) {
    float* srow = S + r * lds;
    __m256 vmax = _mm256_set1_ps(ninf);
    for (int64_t v = 0; v < nv; ++v) vmax = _mm256_max_ps(vmax, load_tail(srow + 8 * v, bn - 8 * v, ninf));
    const float bmax = hmax(vmax);
    const float m_old = st[r].m;
    const float m_new = bmax > m_old ? bmax : m_old;
    if (m_new == ninf) {  // no visible finite score yet: p = 0, nothing to rescale
      online_softmax_mark_nan(st[r], srow, bn);
      for (int64_t v = 0; v < nv; ++v)
        _mm256_maskstore_ps(srow + 8 * v, tail_mask(bn - 8 * v), _mm256_setzero_ps());
      continue;
    }
    const float factor =
        m_old == ninf ? 0.f : _mm_cvtss_f32(_mm256_castps256_ps128(exp_ps(_mm256_set1_ps(m_old - m_new))));
    const __m256 vm = _mm256_set1_ps(m_new);
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t v = 0; v < nv; ++v) {
      const __m256i mk = tail_mask(bn - 8 * v);
      const __m256 e = _mm256_and_ps(exp_ps(_mm256_sub_ps(_mm256_maskload_ps(srow + 8 * v, mk), vm)),
                                     _mm256_castsi256_ps(mk));
      _mm256_maskstore_ps(srow + 8 * v, mk, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    st[r].m = m_new;
    st[r].l = st[r].l * factor + hsum(vsum);
    if (factor != 1.f) {
      float* orow = O + r * ldo;
      const __m256 vf = _mm256_set1_ps(factor);
      for (int64_t c = 0; c < D; c += 8) {
        const __m256i mk = tail_mask(D - c);
        _mm256_maskstore_ps(orow + c, mk, _mm256_mul_ps(vf, _mm256_maskload_ps(orow + c, mk)));
      }
    }
  }
}

}  // namespace rattention::cpu::avx2
