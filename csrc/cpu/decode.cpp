// One decode step of RAttention for a batch of sequences, each at its own position
// (SPEC.md, "Decoding"). Torch-free: takes DecodeParams (csrc/core/params.h).
//
// Per sequence b at position p = pos[b], ring of W1 = w + 1 slots, slot(s) = s mod W1:
//   1. p >= W1: token p - W1 leaves the window; it sits in slot(p) (the slot the new token
//      is about to overwrite). state[b, kvh] += phi(k_old) (outer) v_old.
//   2. write the new k, v (raw, not rotated) into slot(p).
//   3. o_swa = softmax over positions s = max(0, p - w) .. p of scale * <rope_p(q), rope_s(k_s)>,
//      o_rla = phi(q)^T (H0[b or 0, h] + state[b, kvh]); o = rms(o_swa) g_swa + rms(o_rla) g_rla.
//   pos[b] += 1 after every KV head of b is done.
//
// Work split: one task per (b, kv head). A task owns its cache rows and its state, so the
// tasks write disjoint memory. The group's G query heads share the rotated keys (rotated
// once per task) and every product is a [G x ...] gemm (cpu/gemm.h), so the ring and the
// state are each read once per task, not once per query head: a decode step is
// memory-bound (per KV head: the state, 2 D^2 acc values, read + written; the ring, 2 W1 D).
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../core/feature_map.h"
#include "../core/online_softmax.h"
#include "../core/rms_mix.h"
#include "../core/rotary.h"
#include "gemm.h"
#include "kernels.h"
#include "parallel.h"

namespace rattention::cpu {
namespace {

template <typename T, typename acc_t>
void load_row(const T* src, acc_t* dst, int D) {
  for (int i = 0; i < D; ++i) dst[i] = static_cast<acc_t>(Convert<T>::load(src[i]));
}

// Keys per SWA block: 64 keys x D = 128 x 4 B = 32 KiB each for sKt and sV.
constexpr int64_t kBlockN = 64;

template <typename T>
void decode_impl(const DecodeParams& p) {
  using acc_t = typename AccType<T>::type;
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv;
  const int D = static_cast<int>(p.head_dim);
  const int64_t G = Hq / Hkv;
  const int64_t W1 = p.window_size + 1;  // ring slots
  const int64_t D2 = 2 * static_cast<int64_t>(D);
  const auto* gQ = static_cast<const T*>(p.q);  // [B, Hq, D] (q_bstride, q_hstride)
  const auto* gK = static_cast<const T*>(p.k);  // [B, Hkv, D]
  const auto* gV = static_cast<const T*>(p.v);
  auto* gKc = static_cast<T*>(p.k_cache);  // [B, W1, Hkv, D]
  auto* gVc = static_cast<T*>(p.v_cache);
  auto* gS = static_cast<acc_t*>(p.state);  // [B, Hkv, 2D, D]
  const auto* gH0 = static_cast<const acc_t*>(p.initial_state);  // [B or 1, Hq, 2D, D]
  const auto* gCos = static_cast<const acc_t*>(p.rotary_cos);     // [P, D/2]
  const auto* gSin = static_cast<const acc_t*>(p.rotary_sin);
  const auto* gGa = static_cast<const acc_t*>(p.swa_weight);  // [Hq, D]
  const auto* gGb = static_cast<const acc_t*>(p.rla_weight);
  auto* gO = static_cast<T*>(p.out);  // [B, Hq, D] contiguous
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const acc_t eps = static_cast<acc_t>(p.eps);
  const int64_t d2 = D / 2;

  // The op layer checks positions against the rotary table on CPU; the kernel checks again
  // (cheap) so a direct caller cannot read out of bounds.
  for (int64_t b = 0; b < B; ++b) {
    if (p.pos[b] < 0) throw std::invalid_argument("decode_step: negative cache position");
    if (gCos != nullptr && p.pos[b] >= p.rotary_positions) {
      throw std::invalid_argument("decode_step: position " + std::to_string(p.pos[b]) +
                                  " is past the rotary table (" +
                                  std::to_string(p.rotary_positions) + " rows)");
    }
  }

  parallel_for(B * Hkv, 1, [&](int64_t task0, int64_t task1) {
    // Scratch per chunk of tasks (acc type):
    //   sKt [D, kBlockN] rotated keys of a block (transposed), sV [kBlockN, D] values,
    //   sP [G, kBlockN] scores/probabilities, rows [G] online-softmax state,
    //   sQ [G, D] (rotated) queries, sPhiQ [G, 2D], sPhiK [2D], sOs/sOr [G, D] branch outputs.
    std::vector<acc_t> sKt(kBlockN * D), sKrow(D), sV(kBlockN * D), sP(G * kBlockN), sQ(G * D),
        sQraw(D), sPhiQ(G * D2), sPhiK(D2), sKold(D), sVold(D), sOs(G * D), sOr(G * D);
    std::vector<OnlineSoftmaxRow<acc_t>> rows(G);
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t b = task / Hkv, hk = task % Hkv;
      const int64_t pos = p.pos[b];
      const int64_t slot = pos % W1;
      T* kc_new = gKc + ((b * W1 + slot) * Hkv + hk) * D;
      T* vc_new = gVc + ((b * W1 + slot) * Hkv + hk) * D;
      acc_t* S = gS + (b * Hkv + hk) * D2 * D;  // [2D, D]

      // ---- 1. evicted token (position pos - W1) -> phi(k_old), v_old, read before step 2
      // overwrites its slot; added to the state after the SWA part below.
      const bool evict = pos >= W1;
      if (evict) {
        load_row(kc_new, sKold.data(), D);
        load_row(vc_new, sVold.data(), D);
        feature_map_forward(p.feature_map, sKold.data(), sPhiK.data(), D);
      }
      // ---- 2. new token into the ring (raw: rotary is applied at read time).
      const T* k_new = gK + b * p.k_bstride + hk * p.k_hstride;
      const T* v_new = gV + b * p.v_bstride + hk * p.v_hstride;
      std::memcpy(kc_new, k_new, sizeof(T) * D);
      std::memcpy(vc_new, v_new, sizeof(T) * D);

      // ---- queries of the group: raw for phi (RLA), rotated at row pos for SWA.
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        load_row(gQ + b * p.q_bstride + h * p.q_hstride, sQraw.data(), D);
        feature_map_forward(p.feature_map, sQraw.data(), sPhiQ.data() + g * D2, D);
        acc_t* q = sQ.data() + g * D;
        for (int i = 0; i < D; ++i) q[i] = sQraw[i];
        if (gCos != nullptr) rotary_apply(q, gCos + pos * d2, gSin + pos * d2, D, false);
      }

      // ---- 3a. SWA over positions s0 .. pos (n keys), each key rotated at its own position,
      // in blocks of kBlockN keys with the online softmax (flash-decoding order): the block's
      // scratch (transposed keys sKt [D, kBlockN], values sV [kBlockN, D])
      // stays in L1/L2 however long the window. sKt is transposed so both products are
      // row-major gemms whose inner loops run over contiguous, independent outputs.
      const int64_t s0 = pos - W1 + 1 > 0 ? pos - W1 + 1 : 0;
      const int64_t n = pos - s0 + 1;
      for (int64_t g = 0; g < G; ++g) rows[g] = OnlineSoftmaxRow<acc_t>{neg_inf<acc_t>(), acc_t(0)};
      for (int i = 0; i < G * D; ++i) sOs[i] = 0;
      for (int64_t j0 = 0; j0 < n; j0 += kBlockN) {
        const int64_t nb = n - j0 < kBlockN ? n - j0 : kBlockN;
        for (int64_t j = 0; j < nb; ++j) {
          const int64_t s = s0 + j0 + j;
          const int64_t sl = s % W1;
          load_row(gKc + ((b * W1 + sl) * Hkv + hk) * D, sKrow.data(), D);
          load_row(gVc + ((b * W1 + sl) * Hkv + hk) * D, sV.data() + j * D, D);
          if (gCos != nullptr) rotary_apply(sKrow.data(), gCos + s * d2, gSin + s * d2, D, false);
          for (int i = 0; i < D; ++i) sKt[i * nb + j] = sKrow[i];
        }
        // sP [G, nb] = scale * sQ [G, D] @ sKt [D, nb]
        gemm<acc_t>(false, false, G, nb, D, scale, sQ.data(), D, sKt.data(), nb, acc_t(0),
                    sP.data(), nb);
        for (int64_t g = 0; g < G; ++g) {
          acc_t* pr = sP.data() + g * nb;
          acc_t mx = neg_inf<acc_t>();
          for (int64_t j = 0; j < nb; ++j) mx = pr[j] > mx ? pr[j] : mx;
          const acc_t factor = online_softmax_rescale(rows[g], mx);
          if (rows[g].m == neg_inf<acc_t>()) online_softmax_mark_nan(rows[g], pr, nb);
          acc_t* os = sOs.data() + g * D;
          for (int i = 0; i < D; ++i) os[i] *= factor;
          for (int64_t j = 0; j < nb; ++j) {
            pr[j] = online_softmax_prob(rows[g], pr[j]);
            rows[g].l += pr[j];
          }
        }
        // sOs [G, D] += sP [G, nb] @ sV [nb, D]
        gemm<acc_t>(false, false, G, D, nb, acc_t(1), sP.data(), nb, sV.data(), D, acc_t(1),
                    sOs.data(), D);
      }
      for (int64_t g = 0; g < G; ++g) {
        // l >= 1 (the row max contributes exp(0)) unless the row is NaN: then NaN out
        const acc_t inv_l = online_softmax_inv_sum(rows[g]);
        for (int i = 0; i < D; ++i) sOs[g * D + i] *= inv_l;
      }

      // ---- 1. state update: S += phi(k_old) (outer) v_old (rank 1, rows of D contiguous).
      if (evict) {
        for (int64_t i = 0; i < D2; ++i) {
          acc_t* Si = S + i * D;
          const acc_t a = sPhiK[i];
          for (int d = 0; d < D; ++d) Si[d] += a * sVold[d];
        }
      }
      // ---- 3b. sOr [G, D] = sPhiQ [G, 2D] @ S [2D, D]  (+ phi(q_g) @ H0[h] per query head).
      // The state was just swept by the update; at 2 D^2 acc values (128 KiB for D = 128)
      // it is still in L2 for this read.
      gemm<acc_t>(false, false, G, D, D2, acc_t(1), sPhiQ.data(), D2, S, D, acc_t(0), sOr.data(), D);
      if (gH0 != nullptr) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g;
          gemm<acc_t>(false, false, 1, D, D2, acc_t(1), sPhiQ.data() + g * D2, D2,
                      gH0 + b * p.initial_state_bstride + h * D2 * D, D, acc_t(1),
                      sOr.data() + g * D, D);
        }
      }

      // ---- mixing: rms(o_swa) g_swa + rms(o_rla) g_rla, stored in the output dtype.
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        const acc_t* os = sOs.data() + g * D;
        const acc_t* orr = sOr.data() + g * D;
        const acc_t ra = rms_inv(os, D, eps), rb = rms_inv(orr, D, eps);
        T* o = gO + (b * Hq + h) * D;
        for (int d = 0; d < D; ++d) {
          const acc_t y = os[d] * ra * gGa[h * D + d] + orr[d] * rb * gGb[h * D + d];
          o[d] = Convert<T>::store(y);
        }
      }
    }
  });
  for (int64_t b = 0; b < B; ++b) p.pos[b] += 1;
}

}  // namespace

void decode_step(const DecodeParams& p) {
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) {
    throw std::invalid_argument("decode_step: heads_q must be a multiple of heads_kv");
  }
  if (p.window_size < 0) throw std::invalid_argument("decode_step: window_size must be >= 0");
  switch (p.dtype) {
    case DType::kFloat32: return decode_impl<float>(p);
    case DType::kFloat64: return decode_impl<double>(p);
    case DType::kBFloat16: return decode_impl<bf16_t>(p);
    default: throw std::invalid_argument("decode_step: unsupported dtype on CPU");
  }
}

}  // namespace rattention::cpu
