// Sliding-window softmax attention, forward, CPU (SPEC.md branch 1).
//
// Flash-attention structure on the CPU: one task per (batch, kv head, query tile). The task
// stacks the query tiles of the G query heads that share the kv head into one row block
// (row r = g * bm + i is query head hkv*G + g, token m0 + i), so every key/value tile is
// packed once and every per-tile product is one taller GEMM:
//
//   sQ   [G*bm, D]   rotated, scaled-later queries (acc type)
//   sK   [bn, D]     rotated keys, sV [bn, D] values
//   sS   [G*bm, bn]  scores, overwritten in place by probabilities
//   accO [G*bm, D]   running sum of p * v (online softmax: rescaled when the row max grows)
//
// Key tiles come from core/window.h (the same tile math the CUDA kernels use); only the
// tiles at the window's two edges (and the ragged tail) are masked element by element.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "../core/online_softmax.h"
#include "../core/window.h"
#include "gemm.h"
#include "kernels.h"
#include "parallel.h"
#include "tile_io.h"

namespace rattention::cpu {
namespace {

constexpr int kBlockM = 64;  // query rows per tile (per query head)
constexpr int kBlockN = 64;  // keys per tile

template <typename T>
void swa_fwd_impl(const SwaFwdParams& p) {
  using acc_t = typename AccType<T>::type;
  const AttnDims& d = p.dims;
  const int64_t B = d.batch, T_len = d.seqlen, Hq = d.heads_q, Hkv = d.heads_kv,
                D = d.head_dim, G = d.group();
  const int64_t w = p.window_size;
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const auto* q = static_cast<const T*>(p.q);
  const auto* k = static_cast<const T*>(p.k);
  const auto* v = static_cast<const T*>(p.v);
  auto* out = static_cast<acc_t*>(p.out);
  auto* lse = static_cast<acc_t*>(p.lse);
  const auto* cos = static_cast<const acc_t*>(p.rotary_cos);
  const auto* sin = static_cast<const acc_t*>(p.rotary_sin);
  const int64_t n_mtiles = ceil_div(T_len, kBlockM);
  const int64_t n_items = B * Hkv * n_mtiles;
  const acc_t kNegInf = neg_inf<acc_t>();

  struct Scratch {
    std::vector<acc_t> sQ, sK, sV, sS, accO;
    std::vector<OnlineSoftmaxRow<acc_t>> st;
  };
  const int64_t rows_max = G * kBlockM;
  auto make_scratch = [&] {
    // Per-thread scratch, sized for full tiles.
    return Scratch{std::vector<acc_t>(rows_max * D), std::vector<acc_t>(kBlockN * D),
                   std::vector<acc_t>(kBlockN * D), std::vector<acc_t>(rows_max * kBlockN),
                   std::vector<acc_t>(rows_max * D),
                   std::vector<OnlineSoftmaxRow<acc_t>>(rows_max)};
  };
  parallel_items(n_items, make_scratch, [&](int64_t item, Scratch& sc) {
    auto& sQ = sc.sQ;
    auto& sK = sc.sK;
    auto& sV = sc.sV;
    auto& sS = sc.sS;
    auto& accO = sc.accO;
    auto& st = sc.st;
    {  // one (b, kv head, query tile) task
      const int64_t mt = item % n_mtiles;
      const int64_t hkv = (item / n_mtiles) % Hkv;
      const int64_t b = item / (n_mtiles * Hkv);
      const int64_t m0 = mt * kBlockM;
      const int64_t bm = imin(kBlockM, T_len - m0);
      const int64_t R = G * bm;

      for (int64_t g = 0; g < G; ++g)
        pack_rows<T, acc_t>(q, p.q_stride, b, hkv * G + g, m0, bm, D, cos, sin,
                            sQ.data() + g * bm * D);
      for (int64_t r = 0; r < R; ++r) st[r] = OnlineSoftmaxRow<acc_t>{kNegInf, acc_t(0)};
      std::fill(accO.begin(), accO.begin() + R * D, acc_t(0));

      const TileRange kr = swa_key_tiles_for_query_tile(mt, kBlockM, kBlockN, T_len, w);
      for (int64_t n = kr.begin; n < kr.end; ++n) {
        const int64_t n0 = n * kBlockN;
        const int64_t bn = imin(kBlockN, T_len - n0);
        pack_rows<T, acc_t>(k, p.k_stride, b, hkv, n0, bn, D, cos, sin, sK.data());
        pack_rows<T, acc_t>(v, p.v_stride, b, hkv, n0, bn, D, nullptr, nullptr, sV.data());
        // sS = scale * sQ @ sK^T   [R, bn]
        gemm<acc_t>(false, true, R, bn, D, scale, sQ.data(), D, sK.data(), D, acc_t(0),
                    sS.data(), kBlockN);
        const bool need_mask = swa_tile_needs_mask(mt, n, kBlockM, kBlockN, T_len, w);
        for (int64_t r = 0; r < R; ++r) {
          acc_t* srow = sS.data() + r * kBlockN;
          const int64_t t = m0 + r % bm;
          if (need_mask) mask_row(srow, t, n0, bn, w);
          const acc_t factor = online_softmax_rescale(st[r], row_max(srow, bn));
          if (st[r].m == kNegInf) {
            // No visible key yet for this row: p = 0 (avoids -inf - -inf).
            for (int64_t j = 0; j < bn; ++j) srow[j] = acc_t(0);
          } else {
            st[r].l += exp_sub_sum(srow, bn, st[r].m);
          }
          if (factor != acc_t(1)) {
            acc_t* orow = accO.data() + r * D;
            for (int64_t i = 0; i < D; ++i) orow[i] *= factor;
          }
        }
        // accO += P @ sV   [R, D]
        gemm<acc_t>(false, false, R, D, bn, acc_t(1), sS.data(), kBlockN, sV.data(), D,
                    acc_t(1), accO.data(), D);
      }

      for (int64_t r = 0; r < R; ++r) {
        const int64_t g = r / bm, i = r % bm, t = m0 + i, hq = hkv * G + g;
        const acc_t inv_l = st[r].l > acc_t(0) ? acc_t(1) / st[r].l : acc_t(0);
        const acc_t* orow = accO.data() + r * D;
        acc_t* dst = out + b * p.out_stride.b + t * p.out_stride.t + hq * p.out_stride.h;
        for (int64_t c = 0; c < D; ++c) dst[c * p.out_stride.d] = orow[c] * inv_l;
        lse[(b * Hq + hq) * T_len + t] = online_softmax_lse(st[r]);
      }
    }
  });
}

}  // namespace

void swa_fwd(const SwaFwdParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return swa_fwd_impl<float>(p);
    case DType::kFloat64: return swa_fwd_impl<double>(p);
    case DType::kBFloat16: return swa_fwd_impl<bf16_t>(p);
    default: throw std::invalid_argument("swa_fwd: unsupported dtype (float32, float64, bfloat16)");
  }
}

}  // namespace rattention::cpu
