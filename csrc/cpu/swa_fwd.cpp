// Sliding-window softmax attention, forward, CPU (SPEC.md branch 1).
//
// Flash-attention structure on the CPU: one task per (sequence, kv head, query tile), the
// tiles of every sequence listed once (seq_tiles.h), so a packed batch's short documents
// cost only their own tiles. The task
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
// Sizes and row offsets come from QkvParams: query row t of sequence b sits at key row
// t + halo(b) (halo = 0 except for continued chunks) and reads rotary row t + halo(b).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "../core/online_softmax.h"
#include "../core/window.h"
#include "gemm.h"
#include "kernels.h"
#include "parallel.h"
#include "seq_tiles.h"
#include "tile_io.h"

namespace rattention::cpu {
namespace {

constexpr int kBlockM = 64;  // query rows per tile (per query head)
constexpr int kBlockN = 64;  // keys per tile

template <typename T>
void swa_fwd_impl(const SwaFwdParams& p) {
  using acc_t = typename AccType<T>::type;
  const AttnDims& d = p.dims;
  const int64_t Hkv = d.heads_kv, D = d.head_dim, G = d.group();
  const int64_t w = p.window_size;
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const auto* q = static_cast<const T*>(p.q);
  const auto* k = static_cast<const T*>(p.k);
  const auto* v = static_cast<const T*>(p.v);
  auto* out = static_cast<acc_t*>(p.out);
  auto* lse = static_cast<acc_t*>(p.lse);
  const auto* cos = static_cast<const acc_t*>(p.rotary_cos);
  const auto* sin = static_cast<const acc_t*>(p.rotary_sin);
  const std::vector<SeqTile> tiles = list_seq_tiles(p, kBlockM, /*over_keys=*/false);
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  const int64_t n_items = n_tiles * Hkv;
  const acc_t kNegInf = neg_inf<acc_t>();
  constexpr bool kAccInPlace = std::is_same_v<T, acc_t>;  // storage already acc type

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
    {  // one (sequence, kv head, query tile) task
      const SeqTile& tile = tiles[item % n_tiles];
      const int64_t hkv = item / n_tiles;
      const int64_t b = tile.seq, mt = tile.tile;
      const int64_t Tq = p.seqlen_q(b), Tk = p.seqlen_k(b), off = p.halo(b);
      const int64_t m0 = mt * kBlockM;
      const int64_t bm = imin(kBlockM, Tq - m0);
      const int64_t R = G * bm;

      for (int64_t g = 0; g < G; ++g)
        pack_rows<T, acc_t>(q, p.q_stride, p.q_offset(p.q_stride, b, m0, hkv * G + g), bm, D,
                            cos, sin, m0 + off, sQ.data() + g * bm * D);
      for (int64_t r = 0; r < R; ++r) st[r] = OnlineSoftmaxRow<acc_t>{kNegInf, acc_t(0)};
      std::fill(accO.begin(), accO.begin() + R * D, acc_t(0));

      const TileRange kr = swa_key_tiles_for_query_tile(mt, kBlockM, kBlockN, Tq, off, w);
      for (int64_t n = kr.begin; n < kr.end; ++n) {
        const int64_t n0 = n * kBlockN;
        const int64_t bn = imin(kBlockN, Tk - n0);
        // K', V tiles [bn, D]: read in place when they already are acc-type rows with unit
        // stride over D (no rotary, no conversion); packed otherwise.
        const acc_t *gK = sK.data(), *gV = sV.data();
        int64_t ldk = D, ldv = D;
        const int64_t k_off = p.k_offset(p.k_stride, b, n0, hkv);
        const int64_t v_off = p.k_offset(p.v_stride, b, n0, hkv);
        if (kAccInPlace && cos == nullptr && p.k_stride.d == 1) {
          gK = reinterpret_cast<const acc_t*>(k + k_off);
          ldk = p.k_stride.t;
        } else {
          pack_rows<T, acc_t>(k, p.k_stride, k_off, bn, D, cos, sin, n0, sK.data());
        }
        if (kAccInPlace && p.v_stride.d == 1) {
          gV = reinterpret_cast<const acc_t*>(v + v_off);
          ldv = p.v_stride.t;
        } else {
          pack_rows<T, acc_t>(v, p.v_stride, v_off, bn, D, nullptr, nullptr, 0, sV.data());
        }
        // sS = scale * sQ @ sK^T   [R, bn]
        gemm<acc_t>(false, true, R, bn, D, scale, sQ.data(), D, gK, ldk, acc_t(0),
                    sS.data(), kBlockN);
        const bool need_mask = swa_tile_needs_mask(mt, n, kBlockM, kBlockN, Tq, Tk, off, w);
        if (need_mask) {
          for (int64_t r = 0; r < R; ++r)
            mask_row(sS.data() + r * kBlockN, m0 + r % bm + off, n0, bn, w);
        }
        // online softmax: sS <- P, running max/sum per row, accO rows rescaled
        softmax_tile(sS.data(), kBlockN, R, bn, st.data(), accO.data(), D, D);
        // accO += P @ sV   [R, D]; at a window edge a non-finite value outside a row's window
        // must not meet its zero probability (masked_products.h)
        if (need_mask && !all_finite(gV, bn, D, ldv)) {
          masked_gemm_nn<acc_t>(R, bn, D, acc_t(1), sS.data(), kBlockN, gV, ldv, accO.data(), D,
                                [&](int64_t r) { return swa_visible_cols(m0 + r % bm + off, n0, bn, w); });
        } else {
          gemm<acc_t>(false, false, R, D, bn, acc_t(1), sS.data(), kBlockN, gV, ldv,
                      acc_t(1), accO.data(), D);
        }
      }

      for (int64_t r = 0; r < R; ++r) {
        const int64_t g = r / bm, i = r % bm, t = m0 + i, hq = hkv * G + g;
        const acc_t inv_l = online_softmax_inv_sum(st[r]);  // NaN for a NaN row
        const acc_t* orow = accO.data() + r * D;
        acc_t* dst = out + p.q_offset(p.out_stride, b, t, hq);
        for (int64_t c = 0; c < D; ++c) dst[c * p.out_stride.d] = orow[c] * inv_l;
        lse[p.lse_index(b, hq, t)] =
            st[r].l > acc_t(0) ? online_softmax_lse(st[r]) : std::numeric_limits<acc_t>::quiet_NaN();
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
