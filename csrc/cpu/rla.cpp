// Residual linear attention on the CPU: chunked forward with state checkpoints, and the
// backward that recomputes states from those checkpoints.
//
// Chunk c holds query rows [t0, t1) and the shifted keys K~c = keys [ks0, ks1) that enter
// the state while these queries run (csrc/core/window.h rla_chunk_keys). With S_c the
// state at the chunk's start (keys < ks0) and H0 the per-query-head initial state:
//   O_c  = phi(Q_c) (H0 + S_c) + mask(phi(Q_c) phi(K~c)^T) V~c        mask: s <= t - w - 1
//   S_c+1 = S_c + phi(K~c)^T V~c
// Forward tasks are (b, kv head, value-column block): columns of v/o/S are independent,
// so B * Hkv * D / kColBlock tasks fill the cores even at B = 1. The backward runs one
// task per (b, kv head) because dphi(q), dphi(k) sum over all columns.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "../core/feature_map.h"
#include "../core/window.h"
#include "gemm.h"
#include "kernels.h"
#include "parallel.h"

namespace rattention::cpu {
namespace {

// Value columns per forward task: split only as far as needed to give every thread a task
// (each split recomputes the feature maps), and never below 16 columns.
int64_t column_block(int64_t D, int64_t tasks_without_split) {
  const int64_t want_splits = ceil_div(max_threads(), tasks_without_split);
  const int64_t splits = std::max<int64_t>(1, std::min(want_splits, D / 16));
  return ceil_div(D, splits);
}

// Rows [r0, r0 + n) of a [B, T, H, D] tensor at (b, h), converted to acc type: dst[n, D].
template <typename T, typename acc_t>
void load_rows(const void* base, const Strides4& st, int64_t b, int64_t h, int64_t r0, int64_t n,
               int64_t D, acc_t* dst) {
  const T* p = static_cast<const T*>(base) + b * st.b + h * st.h;
  for (int64_t i = 0; i < n; ++i) {
    const T* row = p + (r0 + i) * st.t;
    for (int64_t d = 0; d < D; ++d) dst[i * D + d] = Convert<T>::load(row[d * st.d]);
  }
}

// phi of n rows x[n, D] into y[n, 2D].
template <typename acc_t>
void phi_rows(FeatureMap fm, const acc_t* x, int64_t n, int64_t D, acc_t* y) {
  for (int64_t i = 0; i < n; ++i) feature_map_forward(fm, x + i * D, y + i * 2 * D, int(D));
}

// Zero A[i, j] (query row t0 + i, key ks0 + j) unless key is in the query's RLA state.
template <typename acc_t>
void mask_intra(acc_t* A, int64_t L, int64_t nk, int64_t t0, int64_t ks0, int64_t window) {
  for (int64_t i = 0; i < L; ++i)
    for (int64_t j = 0; j < nk; ++j)
      if (!rla_visible(t0 + i, ks0 + j, window)) A[i * nk + j] = acc_t(0);
}

template <typename T>
void rla_fwd_impl(const RlaFwdParams& p) {
  using acc_t = typename AccType<T>::type;
  const AttnDims& d = p.dims;
  const int64_t D = d.head_dim, D2 = 2 * D, T_ = d.seqlen, G = d.group(), C = p.chunk_size;
  const int64_t n_chunks = ceil_div(T_, C);
  const int64_t n_ckpt = rla_num_checkpoints(n_chunks, p.checkpoint_every);
  const int64_t kColBlock = column_block(D, d.batch * d.heads_kv);
  const int64_t n_cb = ceil_div(D, kColBlock);
  auto* out = static_cast<acc_t*>(p.out);
  auto* ckpt = static_cast<acc_t*>(p.checkpoints);
  auto* fin = static_cast<acc_t*>(p.final_state);
  const auto* h0 = static_cast<const acc_t*>(p.initial_state);

  parallel_for(d.batch * d.heads_kv * n_cb, 1, [&](int64_t task0, int64_t task1) {
    std::vector<acc_t> S(D2 * kColBlock), x(C * D), phiQ(C * D2), phiK(C * D2), V(C * kColBlock),
        A(C * C);
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t cb = task % n_cb, bh = task / n_cb, hk = bh % d.heads_kv, b = bh / d.heads_kv;
      const int64_t j0 = cb * kColBlock, nc = std::min(kColBlock, D - j0);
      std::fill(S.begin(), S.end(), acc_t(0));
      acc_t* ck_base = ckpt + (b * d.heads_kv + hk) * n_ckpt * D2 * D;
      for (int64_t c = 0; c < n_chunks; ++c) {
        if (c % p.checkpoint_every == 0) {
          acc_t* dst = ck_base + (c / p.checkpoint_every) * D2 * D + j0;
          for (int64_t r = 0; r < D2; ++r)
            std::memcpy(dst + r * D, S.data() + r * nc, nc * sizeof(acc_t));
        }
        const int64_t t0 = c * C, L = std::min(C, T_ - t0);
        const TileRange ks = rla_chunk_keys(c, int(C), T_, p.window_size);
        const int64_t nk = ks.end - ks.begin;
        if (nk > 0) {
          load_rows<T>(p.k, p.k_stride, b, hk, ks.begin, nk, D, x.data());
          phi_rows(p.feature_map, x.data(), nk, D, phiK.data());
          std::vector<acc_t> vrow(nk * D);
          load_rows<T>(p.v, p.v_stride, b, hk, ks.begin, nk, D, vrow.data());
          for (int64_t i = 0; i < nk; ++i)
            for (int64_t j = 0; j < nc; ++j) V[i * nc + j] = vrow[i * D + j0 + j];
        }
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g;
          load_rows<T>(p.q, p.q_stride, b, h, t0, L, D, x.data());
          phi_rows(p.feature_map, x.data(), L, D, phiQ.data());
          acc_t* o = out + b * p.out_stride.b + t0 * p.out_stride.t + h * p.out_stride.h + j0;
          const int64_t ldo = p.out_stride.t;
          gemm<acc_t>(false, false, L, nc, D2, acc_t(1), phiQ.data(), D2, S.data(), nc, acc_t(0),
                      o, ldo);
          if (h0 != nullptr) {
            const acc_t* h0h = h0 + b * p.initial_state_bstride + h * D2 * D + j0;
            gemm<acc_t>(false, false, L, nc, D2, acc_t(1), phiQ.data(), D2, h0h, D, acc_t(1), o,
                        ldo);
          }
          if (nk > 0) {
            gemm<acc_t>(false, true, L, nk, D2, acc_t(1), phiQ.data(), D2, phiK.data(), D2,
                        acc_t(0), A.data(), nk);
            mask_intra(A.data(), L, nk, t0, ks.begin, p.window_size);
            gemm<acc_t>(false, false, L, nc, nk, acc_t(1), A.data(), nk, V.data(), nc, acc_t(1), o,
                        ldo);
          }
        }
        if (nk > 0) {
          gemm<acc_t>(true, false, D2, nc, nk, acc_t(1), phiK.data(), D2, V.data(), nc, acc_t(1),
                      S.data(), nc);
        }
      }
      acc_t* f = fin + (b * d.heads_kv + hk) * D2 * D + j0;
      for (int64_t r = 0; r < D2; ++r) std::memcpy(f + r * D, S.data() + r * nc, nc * sizeof(acc_t));
    }
  });
}

// dphi rows [n, 2D] -> d(input) rows written as T into a contiguous [B, T, H, D] gradient.
template <typename T, typename acc_t>
void store_input_grad(FeatureMap fm, const acc_t* x, const acc_t* y, const acc_t* dy, int64_t n,
                      int64_t D, T* dst_row0, int64_t row_stride) {
  std::vector<acc_t> dx(D);
  for (int64_t i = 0; i < n; ++i) {
    feature_map_backward(fm, x + i * D, y + i * 2 * D, dy + i * 2 * D, dx.data(), int(D));
    T* dst = dst_row0 + i * row_stride;
    for (int64_t e = 0; e < D; ++e) dst[e] = Convert<T>::store(dx[e]);
  }
}

template <typename T>
void rla_bwd_impl(const RlaBwdParams& p) {
  using acc_t = typename AccType<T>::type;
  const AttnDims& d = p.dims;
  const int64_t D = d.head_dim, D2 = 2 * D, T_ = d.seqlen, G = d.group(), C = p.chunk_size;
  const int64_t Hq = d.heads_q, Hkv = d.heads_kv, E = p.checkpoint_every;
  const int64_t n_chunks = ceil_div(T_, C);
  const int64_t n_ckpt = rla_num_checkpoints(n_chunks, E);
  const auto* ckpt = static_cast<const acc_t*>(p.checkpoints);
  const auto* h0 = static_cast<const acc_t*>(p.initial_state);
  const auto* gfs = static_cast<const acc_t*>(p.grad_final_state);
  auto* dq = static_cast<T*>(p.grad_q);
  auto* dk = static_cast<T*>(p.grad_k);
  auto* dv = static_cast<T*>(p.grad_v);
  auto* dh0 = static_cast<acc_t*>(p.grad_initial_state);
  const int64_t SD = D2 * D;  // one state

  parallel_for(d.batch * Hkv, 1, [&](int64_t task0, int64_t task1) {
    std::vector<acc_t> Sseg(E * SD), U(SD), SH(SD), xk(C * D), phiK(C * D2), V(C * D),
        xq(G * C * D), phiQ(G * C * D2), dO(G * C * D), dphiQ(C * D2), dphiK(C * D2), dV(C * D),
        A(C * C), dA(C * C);
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t hk = task % Hkv, b = task / Hkv;
      if (gfs != nullptr) {
        std::memcpy(U.data(), gfs + (b * Hkv + hk) * SD, SD * sizeof(acc_t));
      } else {
        std::fill(U.begin(), U.end(), acc_t(0));
      }
      if (dh0 != nullptr) {
        for (int64_t g = 0; g < G; ++g)
          std::fill_n(dh0 + (b * Hq + hk * G + g) * SD, SD, acc_t(0));
      }
      // Keys that never enter a state (s >= T - w - 1) get zero gradients.
      for (int64_t s = rla_state_len(T_, p.window_size); s < T_; ++s) {
        std::fill_n(dk + ((b * T_ + s) * Hkv + hk) * D, D, Convert<T>::store(acc_t(0)));
        std::fill_n(dv + ((b * T_ + s) * Hkv + hk) * D, D, Convert<T>::store(acc_t(0)));
      }
      for (int64_t seg = n_ckpt - 1; seg >= 0; --seg) {
        const int64_t c_begin = seg * E, c_end = std::min(n_chunks, c_begin + E);
        // Recompute the states at the start of each chunk of the segment.
        std::memcpy(Sseg.data(), ckpt + ((b * Hkv + hk) * n_ckpt + seg) * SD, SD * sizeof(acc_t));
        for (int64_t c = c_begin; c + 1 < c_end; ++c) {
          acc_t* Snext = Sseg.data() + (c - c_begin + 1) * SD;
          std::memcpy(Snext, Snext - SD, SD * sizeof(acc_t));
          const TileRange ks = rla_chunk_keys(c, int(C), T_, p.window_size);
          const int64_t nk = ks.end - ks.begin;
          if (nk == 0) continue;
          load_rows<T>(p.k, p.k_stride, b, hk, ks.begin, nk, D, xk.data());
          phi_rows(p.feature_map, xk.data(), nk, D, phiK.data());
          load_rows<T>(p.v, p.v_stride, b, hk, ks.begin, nk, D, V.data());
          gemm<acc_t>(true, false, D2, D, nk, acc_t(1), phiK.data(), D2, V.data(), D, acc_t(1),
                      Snext, D);
        }
        for (int64_t c = c_end - 1; c >= c_begin; --c) {
          const acc_t* Sc = Sseg.data() + (c - c_begin) * SD;
          const int64_t t0 = c * C, L = std::min(C, T_ - t0);
          const TileRange ks = rla_chunk_keys(c, int(C), T_, p.window_size);
          const int64_t nk = ks.end - ks.begin;
          if (nk > 0) {
            load_rows<T>(p.k, p.k_stride, b, hk, ks.begin, nk, D, xk.data());
            phi_rows(p.feature_map, xk.data(), nk, D, phiK.data());
            load_rows<T>(p.v, p.v_stride, b, hk, ks.begin, nk, D, V.data());
            // Later chunks' queries see all of this chunk's keys: dphi_k = V U^T, dV = phiK U.
            gemm<acc_t>(false, true, nk, D2, D, acc_t(1), V.data(), D, U.data(), D, acc_t(0),
                        dphiK.data(), D2);
            gemm<acc_t>(false, false, nk, D, D2, acc_t(1), phiK.data(), D2, U.data(), D, acc_t(0),
                        dV.data(), D);
          }
          for (int64_t g = 0; g < G; ++g) {
            const int64_t h = hk * G + g;
            acc_t* xg = xq.data() + g * C * D;
            acc_t* pq = phiQ.data() + g * C * D2;
            acc_t* dog = dO.data() + g * C * D;
            load_rows<T>(p.q, p.q_stride, b, h, t0, L, D, xg);
            phi_rows(p.feature_map, xg, L, D, pq);
            load_rows<acc_t>(p.grad_out, p.grad_out_stride, b, h, t0, L, D, dog);
            // dphi_q = dO (S_c + H0_h)^T (+ intra-chunk term below)
            const acc_t* Sq = Sc;
            if (h0 != nullptr) {
              const acc_t* h0h = h0 + b * p.initial_state_bstride + h * SD;
              for (int64_t i = 0; i < SD; ++i) SH[i] = Sc[i] + h0h[i];
              Sq = SH.data();
              gemm<acc_t>(true, false, D2, D, L, acc_t(1), pq, D2, dog, D, acc_t(1),
                          dh0 + (b * Hq + h) * SD, D);
            }
            gemm<acc_t>(false, true, L, D2, D, acc_t(1), dog, D, Sq, D, acc_t(0), dphiQ.data(),
                        D2);
            if (nk > 0) {
              gemm<acc_t>(false, true, L, nk, D2, acc_t(1), pq, D2, phiK.data(), D2, acc_t(0),
                          A.data(), nk);
              mask_intra(A.data(), L, nk, t0, ks.begin, p.window_size);
              gemm<acc_t>(false, true, L, nk, D, acc_t(1), dog, D, V.data(), D, acc_t(0),
                          dA.data(), nk);
              mask_intra(dA.data(), L, nk, t0, ks.begin, p.window_size);
              gemm<acc_t>(false, false, L, D2, nk, acc_t(1), dA.data(), nk, phiK.data(), D2,
                          acc_t(1), dphiQ.data(), D2);
              gemm<acc_t>(true, false, nk, D2, L, acc_t(1), dA.data(), nk, pq, D2, acc_t(1),
                          dphiK.data(), D2);
              gemm<acc_t>(true, false, nk, D, L, acc_t(1), A.data(), nk, dog, D, acc_t(1),
                          dV.data(), D);
            }
            store_input_grad<T>(p.feature_map, xg, pq, dphiQ.data(), L, D,
                                dq + ((b * T_ + t0) * Hq + h) * D, Hq * D);
          }
          if (nk > 0) {
            store_input_grad<T>(p.feature_map, xk.data(), phiK.data(), dphiK.data(), nk, D,
                                dk + ((b * T_ + ks.begin) * Hkv + hk) * D, Hkv * D);
            for (int64_t i = 0; i < nk; ++i) {
              T* dst = dv + ((b * T_ + ks.begin + i) * Hkv + hk) * D;
              for (int64_t e = 0; e < D; ++e) dst[e] = Convert<T>::store(dV[i * D + e]);
            }
          }
          // This chunk's queries join the reverse state seen by earlier chunks' keys.
          for (int64_t g = 0; g < G; ++g) {
            gemm<acc_t>(true, false, D2, D, L, acc_t(1), phiQ.data() + g * C * D2, D2,
                        dO.data() + g * C * D, D, acc_t(1), U.data(), D);
          }
        }
      }
    }
  });
}

}  // namespace

void rla_fwd(const RlaFwdParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return rla_fwd_impl<float>(p);
    case DType::kFloat64: return rla_fwd_impl<double>(p);
    case DType::kBFloat16: return rla_fwd_impl<bf16_t>(p);
    default: throw std::invalid_argument("rla_fwd: unsupported dtype on CPU");
  }
}

void rla_bwd(const RlaBwdParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return rla_bwd_impl<float>(p);
    case DType::kFloat64: return rla_bwd_impl<double>(p);
    case DType::kBFloat16: return rla_bwd_impl<bf16_t>(p);
    default: throw std::invalid_argument("rla_bwd: unsupported dtype on CPU");
  }
}

}  // namespace rattention::cpu
