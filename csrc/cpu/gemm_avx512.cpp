// AVX-512 float paths of cpu/gemm.h and the online-softmax row primitives of tile_io.h.
// Compiled with -mavx512f (CMake gives *_avx512.cpp the flags); only called after
// gemm.cpp has checked __builtin_cpu_supports("avx512f").
//
// GEMM: B is packed once per call into zero-padded panels of kNR = 64 columns
// (Bp[panel][k][64], 64-byte aligned, so the micro-kernel does four aligned loads per k),
// A is read in place through (row, col) strides (the attention tiles are already packed
// contiguous by the caller, and a transposed A is then just another stride), and an
// kMR x kNR register block of C (kMR * kNV <= 28 zmm accumulators) is updated with broadcast-FMA
// over the whole K. The C tile is written once: C = alpha * acc + beta * C.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <utility>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../core/online_softmax.h"
#include "gemm_blocked.h"

namespace rattention::cpu::avx512 {
namespace {

#ifndef RATT_GEMM_NV
#define RATT_GEMM_NV 4  // 6 x 64 block: 24 accumulators, 4 loads + 6 broadcasts per 24 FMAs
#define RATT_GEMM_MR 6   // (measured best on Sapphire Rapids vs 8x32, 12x32, 14x32, 7x64)
#endif
constexpr int kNV = RATT_GEMM_NV;  // zmm vectors per row of the register block
constexpr int kNR = 16 * kNV;      // columns per panel
constexpr int kMR = RATT_GEMM_MR;  // rows per register block

// Lanes [0, n) of a 16-lane vector (n clamped to [0, 16]).
inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : (n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1));
}
constexpr int64_t kKC = 512;   // K block (keeps a panel of B in L1/L2 for long K)
constexpr int64_t kNC = 1024;  // N block of the packed B buffer

// Thread-local 64-byte aligned scratch for packed B.
float* packed_buffer(int64_t n_floats) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n_floats + 16) buf.resize(n_floats + 16);
  auto addr = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<float*>((addr + 63) & ~uintptr_t(63));
}

// dst[c][r] = src[r][c] for a 16 x 16 block (row strides lds, ldd).
inline void transpose_16x16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  // 32-bit interleave within 128-bit lanes, then 64-bit, then 128-bit lane shuffles.
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
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
      // rows of B are contiguous in j: copy kNR (or fewer, masked) floats per k.
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = B + (k0 + k) * ldb + j0;
        for (int v = 0; v < kNV; ++v)
          _mm512_store_ps(dst + k * kNR + 16 * v,
                          _mm512_maskz_loadu_ps(tail_mask(nj - 16 * v), src + 16 * v));
      }
    } else {
      // B stored [N, K]: column j of op(B) is row j of B, contiguous in k. Full 16 x 16
      // blocks are transposed in registers; the ragged rest element by element.
      if (nj < kNR) std::memset(dst, 0, sizeof(float) * kc * kNR);
      const int64_t nj16 = nj & ~int64_t(15), kc16 = kc & ~int64_t(15);
      for (int64_t jb = 0; jb < nj16; jb += 16)
        for (int64_t kb = 0; kb < kc16; kb += 16)
          transpose_16x16(B + (j0 + jb) * ldb + k0 + kb, ldb, dst + kb * kNR + jb, kNR);
      for (int64_t j = 0; j < nj; ++j) {
        const float* src = B + (j0 + j) * ldb + k0;
        for (int64_t k = (j < nj16 ? kc16 : 0); k < kc; ++k) dst[k * kNR + j] = src[k];
      }
    }
  }
}

// C[MR, nj] (ldc) = alpha * A[MR, kc] @ Bp[kc, kNR] + beta * C, A element (i, k) at
// A[i * rs + k * cs], Bp row k at Bp + k * ldbp (a packed panel, or B itself when its rows
// already hold kNR valid contiguous columns). nj <= kNR columns are stored (masked at the right edge).
template <int MR>
inline void micro_kernel(int64_t kc, const float* A, int64_t rs, int64_t cs, const float* Bp,
                         int64_t ldbp, float alpha, float beta, float* C, int64_t ldc, int64_t nj) {
  __m512 acc[MR][kNV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) acc[i][v] = _mm512_setzero_ps();
  const float* a_row[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) a_row[i] = A + i * rs;
  if (cs == 1) {
    for (int64_t k = 0; k < kc; ++k) {
      __m512 b[kNV];
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) b[v] = _mm512_loadu_ps(Bp + k * ldbp + 16 * v);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const __m512 a = _mm512_set1_ps(a_row[i][k]);
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
      }
    }
  } else {
    for (int64_t k = 0; k < kc; ++k) {
      __m512 b[kNV];
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) b[v] = _mm512_loadu_ps(Bp + k * ldbp + 16 * v);
      const float* ak = A + k * cs;
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const __m512 a = _mm512_set1_ps(ak[i * rs]);
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
      }
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  const __m512 vb = _mm512_set1_ps(beta);
  __mmask16 mask[kNV];
#pragma GCC unroll 4
  for (int v = 0; v < kNV; ++v) mask[v] = tail_mask(nj - 16 * v);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    float* c = C + i * ldc;
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) {
      __m512 r = _mm512_mul_ps(va, acc[i][v]);
      if (beta != 0.f) r = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mask[v], c + 16 * v), r);
      _mm512_mask_storeu_ps(c + 16 * v, mask[v], r);
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
  static constexpr int kMR = ::rattention::cpu::avx512::kMR;
  static constexpr int kNR = ::rattention::cpu::avx512::kNR;
  static constexpr int64_t kKC = ::rattention::cpu::avx512::kKC;
  static constexpr int64_t kNC = ::rattention::cpu::avx512::kNC;
  static MicroKernel kernel(int mr) { return kKernels[mr]; }
  static float* packed_buffer(int64_t n) { return ::rattention::cpu::avx512::packed_buffer(n); }
  static void pack_b(bool trans_b, const float* B, int64_t ldb, int64_t k0, int64_t kc,
                     int64_t n0, int64_t nc, float* Bp) {
    ::rattention::cpu::avx512::pack_b(trans_b, B, ldb, k0, kc, n0, nc, Bp);
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
// exp(x) for a vector, ~1 ulp (Cephes expf polynomial on [-ln2/2, ln2/2], 2^n by scalef).
// Inputs below -86 (masked -inf scores included) give exactly 0 without ever producing a
// denormal (a denormal result costs a ~100-cycle microcode assist per instruction on Intel);
// exp(-86) ~ 4e-38 is far below anything a probability row can resolve. NaN propagates.
inline __m512 exp_ps(__m512 x_in) {
  const __m512 lo = _mm512_set1_ps(-86.f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x_in, lo, _CMP_NLT_UQ);  // x >= lo or NaN
  __m512 x = _mm512_max_ps(lo, x_in);  // max(lo, NaN) returns NaN (2nd operand)
  x = _mm512_min_ps(_mm512_set1_ps(88.7f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  const __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

}  // namespace

float row_max(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + j));
  if (j < n)
    m = _mm512_mask_max_ps(m, tail_mask(n - j), m, _mm512_maskz_loadu_ps(tail_mask(n - j), x + j));
  return _mm512_reduce_max_ps(m);
}

float exp_sub_sum(float* x, int64_t n, float sub) {
  const __m512 vs = _mm512_set1_ps(sub);
  __m512 s = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(x + j), vs));
    _mm512_storeu_ps(x + j, e);
    s = _mm512_add_ps(s, e);
  }
  if (j < n) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), vs));
    _mm512_mask_storeu_ps(x + j, m, e);
    s = _mm512_mask_add_ps(s, m, s, e);
  }
  return _mm512_reduce_add_ps(s);
}

// One online-softmax step for a tile of scores S [R, bn] (row stride lds, masked entries
// already -inf): per row, the new running max, p = exp(s - m) in place, l = l * f + sum(p),
// and the accumulator row O[r, 0:D] *= f where f = exp(m_old - m_new) (0 for a row that had
// seen no key). Everything stays in registers per row and no call sits between rows, so
// consecutive rows' dependency chains (reduce, exp, reduce) overlap in the core.
void softmax_tile(float* S, int64_t lds, int64_t R, int64_t bn, OnlineSoftmaxRow<float>* st,
                  float* O, int64_t ldo, int64_t D) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t nv = (bn + 15) / 16;
  for (int64_t r = 0; r < R; ++r) {
    float* srow = S + r * lds;
    __m512 vmax = _mm512_set1_ps(ninf);
    for (int64_t v = 0; v < nv; ++v)
      vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(_mm512_set1_ps(ninf),
                                                      tail_mask(bn - 16 * v), srow + 16 * v));
    const float bmax = _mm512_reduce_max_ps(vmax);
    const float m_old = st[r].m;
    const float m_new = bmax > m_old ? bmax : m_old;
    if (m_new == ninf) {  // no visible finite score yet: p = 0, nothing to rescale
      online_softmax_mark_nan(st[r], srow, bn);
      for (int64_t v = 0; v < nv; ++v)
        _mm512_mask_storeu_ps(srow + 16 * v, tail_mask(bn - 16 * v), _mm512_setzero_ps());
      continue;
    }
    const float factor =
        m_old == ninf ? 0.f : _mm512_cvtss_f32(exp_ps(_mm512_set1_ps(m_old - m_new)));
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t v = 0; v < nv; ++v) {
      const __mmask16 mk = tail_mask(bn - 16 * v);
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, srow + 16 * v), vm));
      _mm512_mask_storeu_ps(srow + 16 * v, mk, e);
      vsum = _mm512_mask_add_ps(vsum, mk, vsum, e);
    }
    st[r].m = m_new;
    st[r].l = st[r].l * factor + _mm512_reduce_add_ps(vsum);
    if (factor != 1.f) {
      float* orow = O + r * ldo;
      const __m512 vf = _mm512_set1_ps(factor);
      for (int64_t c = 0; c < D; c += 16) {
        const __mmask16 mk = tail_mask(D - c);
        _mm512_mask_storeu_ps(orow + c, mk, _mm512_mul_ps(vf, _mm512_maskz_loadu_ps(mk, orow + c)));
      }
    }
  }
}

}  // namespace rattention::cpu::avx512
