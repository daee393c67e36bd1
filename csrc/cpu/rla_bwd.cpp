// CPU residual linear attention, backward, chunked with state checkpoints.
//
// Forward (per query head h of kv group g): o[t] = phi(q[t])^T (H0[h] + S[t]),
// S[t] = sum_{s <= t-w-1} phi(k[s]) v[s]^T. With do = grad_out:
//   dphi_q[t] = (H0[h] + S[t]) do[t]
//   dphi_k[s] = U_s v[s],  dv[s] = U_s^T phi(k[s]),   U_s = GF + sum_{h, t >= s+w+1} phi(q_h[t]) do_h[t]^T
//   dH0[b, h] = sum_t phi(q_h[t]) do_h[t]^T
// where GF = grad_final_state (every key that enters the state is in the final state).
// A carried state C starts S (S[t] = C + ...), so dC = U after the first chunk:
// GF + sum_{h, t} phi(q_h[t]) do_h[t]^T. Sequences (packed documents, halo) as in
// rla_common.h.
// Chunked, for chunk c (queries [t0, t0+nq), shifted keys [s0, s0+nk)), per head h:
//   dphi(Q)  = dO (H0 + S_c)^T + mask(dO V~^T) phi(K~)
//   dphi(K~) += mask(dO V~^T)^T phi(Q)           dV~ += mask(phi(Q) phi(K~)^T)^T dO
// and per kv head: dphi(K~) += V~ U_c^T, dV~ += phi(K~) U_c, then U_{c-1} = U_c + sum_h phi(Q)^T dO.
// S_c is recomputed from the nearest checkpoint: a segment's states are rebuilt forward into
// a small buffer ([checkpoint_every, 2D, D]) and the segment is then walked backward.
// dq, dk come from the feature-map backward (core/feature_map.h) per row.
//
// Parallelism: one task per (b, g) walks all segments backward, carrying U. When B * Hkv
// cannot fill the threads, a reverse pass over value-column blocks (U and dH0 are separable
// by value column) first stores U at each segment end; then every (b, g, segment) is an
// independent task.
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "rla_common.h"

namespace rattention::cpu {
namespace {

using namespace rla_detail;

template <typename scalar_t>
struct RlaBwd {
  using acc_t = typename AccType<scalar_t>::type;
  const RlaBwdParams& p;
  const int64_t Hq, Hkv, D, F;

  explicit RlaBwd(const RlaBwdParams& params)
      : p(params), Hq(params.dims.heads_q), Hkv(params.dims.heads_kv), D(params.dims.head_dim),
        F(2 * params.dims.head_dim) {}

  const scalar_t* q() const { return static_cast<const scalar_t*>(p.q); }
  const scalar_t* k() const { return static_cast<const scalar_t*>(p.k); }
  const scalar_t* v() const { return static_cast<const scalar_t*>(p.v); }
  const acc_t* grad_out() const { return static_cast<const acc_t*>(p.grad_out); }
  const acc_t* ckpt(int64_t b, int64_t g, int64_t i) const {
    return static_cast<const acc_t*>(p.checkpoints) + p.ckpt_index(b, g, i) * F * D;
  }
  const acc_t* h0(int64_t b, int64_t h) const {
    return static_cast<const acc_t*>(p.initial_state) + b * p.initial_state_bstride +
           h * F * D;
  }
  acc_t* dh0(int64_t b, int64_t h) const {
    return static_cast<acc_t*>(p.grad_initial_state) + (b * Hq + h) * F * D;
  }
  const acc_t* grad_final(int64_t b, int64_t g) const {
    return static_cast<const acc_t*>(p.grad_final_state) + (b * Hkv + g) * F * D;
  }
  acc_t* grad_carried(int64_t b, int64_t g) const {
    return static_cast<acc_t*>(p.grad_carried_state) + (b * Hkv + g) * F * D;
  }
  bool has_h0() const { return p.initial_state != nullptr; }
  bool has_carried() const { return p.grad_carried_state != nullptr; }

  // Reverse pass over value columns [j0, j0 + nc) of (b, g): U at the last chunk of each
  // segment into gUck [n_seg, F, D] (columns j0..), dH0 for the group's heads and the
  // carried state's gradient.
  void reverse_scan(const Geometry& geo, int64_t b, int64_t g, int64_t j0, int64_t nc,
                    acc_t* gUck) const {
    const int64_t C = geo.C;
    std::vector<acc_t> scratch(F * nc + C * D + C * F + C * nc + 2 * F * nc);
    acc_t* sU = scratch.data();  // [F, nc]
    acc_t* sXq = sU + F * nc;    // [C, D]
    acc_t* sPq = sXq + C * D;    // [C, F]
    acc_t* sdO = sPq + C * F;    // [C, nc]
    acc_t* sT = sdO + C * nc;    // [F, nc] one head's phi(Q)^T dO
    acc_t* sdU = sT + F * nc;    // [F, nc] the chunk's sum over the group's heads
    if (p.grad_final_state != nullptr) {
      copy_block(grad_final(b, g) + j0, D, sU, nc, F, nc);
    } else {
      std::fill(sU, sU + F * nc, acc_t(0));
    }
    for (int64_t sg = geo.n_seg - 1; sg >= 0; --sg) {
      const int64_t cb = geo.seg_first_chunk(sg), ce = geo.seg_end_chunk(sg);
      copy_block(sU, nc, gUck + sg * F * D + j0, D, F, nc);
      // U is needed only at segment ends (and, for the carried state, after chunk 0); dH0
      // needs every chunk.
      const int64_t c_stop = (has_h0() || has_carried()) ? 0 : geo.seg_first_chunk(1);
      for (int64_t c = ce - 1; c >= cb && c >= c_stop; --c) {
        const ChunkRange r = chunk_range(geo, c);
        // The same additions in the same order as run() (the heads' sum first, then into U),
        // so results do not depend on which path the thread count chose.
        std::fill(sdU, sdU + F * nc, acc_t(0));
        for (int64_t hh = 0; hh < geo.G; ++hh) {
          const int64_t h = g * geo.G + hh;
          load_rows(q(), p.q_stride, p.q_offset(p.q_stride, b, r.t0, h), r.nq, 0, D, sXq, D);
          feature_rows(p.feature_map, sXq, sPq, r.nq, D);
          load_rows(grad_out(), p.grad_out_stride, p.q_offset(p.grad_out_stride, b, r.t0, h),
                    r.nq, j0, nc, sdO, nc);
          if (has_h0()) {
            gemm<acc_t>(true, false, F, nc, r.nq, acc_t(1), sPq, F, sdO, nc, acc_t(0), sT, nc);
            add_block(sT, nc, dh0(b, h) + j0, D, F, nc);
            add_block(sT, nc, sdU, nc, F, nc);
          } else {
            gemm<acc_t>(true, false, F, nc, r.nq, acc_t(1), sPq, F, sdO, nc, acc_t(1), sdU, nc);
          }
        }
        add_block(sdU, nc, sU, nc, F, nc);
      }
    }
    if (has_carried()) copy_block(sU, nc, grad_carried(b, g) + j0, D, F, nc);
  }

  // Gradients for segments [sg_begin, sg_end) of (b, g), walked backward. sU [F, D]: U for
  // the last chunk of segment sg_end - 1 (updated in place; after segment 0 it is the
  // carried state's gradient). with_dh0: accumulate dH0.
  void run(const Geometry& geo, int64_t b, int64_t g, int64_t sg_begin, int64_t sg_end,
           acc_t* sU, bool with_dh0) const {
    const int64_t C = geo.C, w = geo.w;
    const int64_t n_states = imax(1, imin(geo.every, geo.n_chunks));
    std::vector<acc_t> states(n_states * F * D);
    std::vector<acc_t> scratch(3 * F * D + 5 * C * D + 4 * C * F + 2 * C * C + D);
    acc_t* sSh = scratch.data();  // [F, D] H0[h] + S_c
    acc_t* sdU = sSh + F * D;     // [F, D] this chunk's sum_h phi(Q)^T dO
    acc_t* sT = sdU + F * D;      // [F, D] one head's phi(Q)^T dO (for dH0)
    acc_t* sXk = sT + F * D;      // [C, D] raw k~
    acc_t* sV = sXk + C * D;      // [C, D] v~
    acc_t* sdV = sV + C * D;      // [C, D] dv~
    acc_t* sdO = sdV + C * D;     // [C, D] dO
    acc_t* sXq = sdO + C * D;     // [C, D] raw q
    acc_t* sPk = sXq + C * D;     // [C, F] phi(k~)
    acc_t* sdPk = sPk + C * F;    // [C, F] dphi(k~)
    acc_t* sPq = sdPk + C * F;    // [C, F] phi(q)
    acc_t* sdPq = sPq + C * F;    // [C, F] dphi(q)
    acc_t* sA = sdPq + C * F;     // [C, C] masked phi(Q) phi(K~)^T
    acc_t* sdP = sA + C * C;      // [C, C] masked dO V~^T
    acc_t* sdx = sdP + C * C;     // [D] one row's dq / dk
    auto* gdq = static_cast<scalar_t*>(p.grad_q);
    auto* gdk = static_cast<scalar_t*>(p.grad_k);
    auto* gdv = static_cast<scalar_t*>(p.grad_v);
    const FeatureMap fm = p.feature_map;

    auto load_keys = [&](const ChunkRange& r) {
      load_rows(k(), p.k_stride, p.k_offset(p.k_stride, b, r.s0, g), r.nk, 0, D, sXk, D);
      feature_rows(fm, sXk, sPk, r.nk, D);
      load_rows(v(), p.v_stride, p.k_offset(p.v_stride, b, r.s0, g), r.nk, 0, D, sV, D);
    };
    // The masked products below multiply a masked matrix by a whole tile; a non-finite
    // phi(k~), phi(q) or dO row there takes the exact masked product (masked_products.h).
    auto vis_of = [&](const ChunkRange& r) {
      return [&r, w](int64_t i) { return chunk_visible_cols(r, w, i); };
    };

    for (int64_t sg = sg_end - 1; sg >= sg_begin; --sg) {
      const int64_t cb = geo.seg_first_chunk(sg), ce = geo.seg_end_chunk(sg);
      // Rebuild S_c for the segment's chunks from its checkpoint.
      std::memcpy(states.data(), ckpt(b, g, sg), F * D * sizeof(acc_t));
      for (int64_t c = cb; c + 1 < ce; ++c) {
        acc_t* next = states.data() + (c - cb + 1) * F * D;
        std::memcpy(next, next - F * D, F * D * sizeof(acc_t));
        const ChunkRange r = chunk_range(geo, c);
        if (r.nk > 0) {
          load_keys(r);
          gemm<acc_t>(true, false, F, D, r.nk, acc_t(1), sPk, F, sV, D, acc_t(1), next, D);
        }
      }
      for (int64_t c = ce - 1; c >= cb; --c) {
        const acc_t* sS = states.data() + (c - cb) * F * D;
        const ChunkRange r = chunk_range(geo, c);
        // U below chunk 0 is needed only as the carried state's gradient.
        const bool need_dU = c > 0 || has_carried();
        bool pk_finite = true;
        if (r.nk > 0) {
          load_keys(r);
          pk_finite = all_finite(sPk, r.nk, F, F);
          std::fill(sdPk, sdPk + r.nk * F, acc_t(0));
          std::fill(sdV, sdV + r.nk * D, acc_t(0));
        }
        if (need_dU) std::fill(sdU, sdU + F * D, acc_t(0));
        for (int64_t hh = 0; hh < geo.G; ++hh) {
          const int64_t h = g * geo.G + hh;
          load_rows(q(), p.q_stride, p.q_offset(p.q_stride, b, r.t0, h), r.nq, 0, D, sXq, D);
          feature_rows(fm, sXq, sPq, r.nq, D);
          load_rows(grad_out(), p.grad_out_stride, p.q_offset(p.grad_out_stride, b, r.t0, h),
                    r.nq, 0, D, sdO, D);
          const acc_t* state = sS;
          if (has_h0()) {
            const acc_t* gH0 = h0(b, h);
            for (int64_t i = 0; i < F * D; ++i) sSh[i] = sS[i] + gH0[i];
            state = sSh;
          }
          // dphi(Q)[nq, F] = dO [nq, D] @ state^T (state stored [F, D])
          gemm<acc_t>(false, true, r.nq, F, D, acc_t(1), sdO, D, state, D, acc_t(0), sdPq, F);
          if (r.nk > 0) {
            // sdP[nq, nk] = dO @ V~^T, masked
            gemm<acc_t>(false, true, r.nq, r.nk, D, acc_t(1), sdO, D, sV, D, acc_t(0), sdP, r.nk);
            mask_chunk(sdP, r.nk, r, w);
            const auto vis = vis_of(r);
            // dphi(Q) += sdP @ phi(K~); dphi(K~) += sdP^T @ phi(Q)
            if (pk_finite)
              gemm<acc_t>(false, false, r.nq, F, r.nk, acc_t(1), sdP, r.nk, sPk, F, acc_t(1), sdPq, F);
            else
              masked_gemm_nn<acc_t>(r.nq, r.nk, F, acc_t(1), sdP, r.nk, sPk, F, sdPq, F, vis);
            if (all_finite(sPq, r.nq, F, F))
              gemm<acc_t>(true, false, r.nk, F, r.nq, acc_t(1), sdP, r.nk, sPq, F, acc_t(1), sdPk, F);
            else
              masked_gemm_tn<acc_t>(r.nq, r.nk, F, acc_t(1), sdP, r.nk, sPq, F, sdPk, F, vis);
            // sA = phi(Q) phi(K~)^T masked; dV~ += sA^T @ dO
            gemm<acc_t>(false, true, r.nq, r.nk, F, acc_t(1), sPq, F, sPk, F, acc_t(0), sA, r.nk);
            mask_chunk(sA, r.nk, r, w);
            if (all_finite(sdO, r.nq, D, D))
              gemm<acc_t>(true, false, r.nk, D, r.nq, acc_t(1), sA, r.nk, sdO, D, acc_t(1), sdV, D);
            else
              masked_gemm_tn<acc_t>(r.nq, r.nk, D, acc_t(1), sA, r.nk, sdO, D, sdV, D, vis);
          }
          for (int64_t i = 0; i < r.nq; ++i) {
            feature_map_backward<acc_t>(fm, sXq + i * D, sPq + i * F, sdPq + i * F, sdx,
                                        static_cast<int>(D));
            scalar_t* dst = gdq + (p.q_row(b, r.t0 + i) * Hq + h) * D;
            for (int64_t j = 0; j < D; ++j) dst[j] = Convert<scalar_t>::store(sdx[j]);
          }
          if (with_dh0) {
            gemm<acc_t>(true, false, F, D, r.nq, acc_t(1), sPq, F, sdO, D, acc_t(0), sT, D);
            add_block(sT, D, dh0(b, h), D, F, D);
            if (need_dU) add_block(sT, D, sdU, D, F, D);
          } else if (need_dU) {
            gemm<acc_t>(true, false, F, D, r.nq, acc_t(1), sPq, F, sdO, D, acc_t(1), sdU, D);
          }
        }
        if (r.nk > 0) {
          // Later queries see all of this chunk's keys: dphi(K~) += V~ U^T, dV~ += phi(K~) U.
          gemm<acc_t>(false, true, r.nk, F, D, acc_t(1), sV, D, sU, D, acc_t(1), sdPk, F);
          gemm<acc_t>(false, false, r.nk, D, F, acc_t(1), sPk, F, sU, D, acc_t(1), sdV, D);
          for (int64_t i = 0; i < r.nk; ++i) {
            feature_map_backward<acc_t>(fm, sXk + i * D, sPk + i * F, sdPk + i * F, sdx,
                                        static_cast<int>(D));
            const int64_t row = (p.k_row(b, r.s0 + i) * Hkv + g) * D;
            for (int64_t j = 0; j < D; ++j) {
              gdk[row + j] = Convert<scalar_t>::store(sdx[j]);
              gdv[row + j] = Convert<scalar_t>::store(sdV[i * D + j]);
            }
          }
        }
        if (need_dU) add_block(sdU, D, sU, D, F, D);
      }
    }
  }

  void operator()() const {
    const int64_t N = p.num_seqs(), BH = N * Hkv;
    const int64_t threads = max_threads();
    // Keys that never enter the state (the last w + 1 of each sequence) get zero gradients.
    {
      auto* gdk = static_cast<scalar_t*>(p.grad_k);
      auto* gdv = static_cast<scalar_t*>(p.grad_v);
      const scalar_t zero = Convert<scalar_t>::store(0);
      for (int64_t b = 0; b < N; ++b) {
        const Geometry geo(p, b);
        for (int64_t s = geo.state_len(); s < p.seqlen_k(b); ++s) {
          const int64_t row = p.k_row(b, s) * Hkv * D;
          std::fill(gdk + row, gdk + row + Hkv * D, zero);
          std::fill(gdv + row, gdv + row + Hkv * D, zero);
        }
      }
    }
    if (has_h0()) {
      std::fill(dh0(0, 0), dh0(0, 0) + N * Hq * F * D, acc_t(0));
    }
    if (BH == 0) return;
    auto init_u = [&](int64_t b, int64_t g, acc_t* sU) {
      if (p.grad_final_state != nullptr) {
        std::memcpy(sU, grad_final(b, g), F * D * sizeof(acc_t));
      } else {
        std::fill(sU, sU + F * D, acc_t(0));
      }
    };
    if (!use_segment_parallel(p)) {
      parallel_for(BH, 1, [&](int64_t t_begin, int64_t t_end) {
        std::vector<acc_t> sU(F * D);
        for (int64_t bg = t_begin; bg < t_end; ++bg) {
          const int64_t b = bg / Hkv, g = bg % Hkv;
          const Geometry geo(p, b);
          init_u(b, g, sU.data());
          run(geo, b, g, 0, geo.n_seg, sU.data(), has_h0());
          if (has_carried()) std::memcpy(grad_carried(b, g), sU.data(), F * D * sizeof(acc_t));
        }
      });
      return;
    }
    // 1) Reverse state U at each segment end (and dH0, dC), split over value columns.
    std::vector<int64_t> u_off(N + 1, 0);  // first segment of each sequence in u_ckpt
    for (int64_t b = 0; b < N; ++b) u_off[b + 1] = u_off[b] + Geometry(p, b).n_seg;
    std::vector<acc_t> u_ckpt(Hkv * u_off[N] * F * D);
    auto u_at = [&](int64_t b, int64_t g, int64_t sg) {
      return u_ckpt.data() + ((g * u_off[N]) + u_off[b] + sg) * F * D;
    };
    {
      const int64_t nc0 = column_block(D, ceil_div(threads, BH), 16);
      const int64_t nb = ceil_div(D, nc0);
      parallel_for(BH * nb, 1, [&](int64_t t_begin, int64_t t_end) {
        for (int64_t task = t_begin; task < t_end; ++task) {
          const int64_t bg = task / nb, j0 = (task % nb) * nc0, nc = imin(nc0, D - j0);
          const int64_t b = bg / Hkv, g = bg % Hkv;
          reverse_scan(Geometry(p, b), b, g, j0, nc, u_at(b, g, 0));
        }
      });
    }
    // 2) Every (b, g, segment) independently.
    const std::vector<SeqSegment> segs = list_segments(p);
    const int64_t n_segs = static_cast<int64_t>(segs.size());
    parallel_for(n_segs * Hkv, 1, [&](int64_t t_begin, int64_t t_end) {
      std::vector<acc_t> sU(F * D);
      for (int64_t task = t_begin; task < t_end; ++task) {
        const SeqSegment& ss = segs[task / Hkv];
        const int64_t b = ss.seq, g = task % Hkv, sg = ss.seg;
        std::memcpy(sU.data(), u_at(b, g, sg), F * D * sizeof(acc_t));
        // The carried state's gradient came from the reverse scan; no U below chunk 0 here.
        run(Geometry(p, b), b, g, sg, sg + 1, sU.data(), false);
      }
    });
  }
};

}  // namespace

void rla_bwd(const RlaBwdParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: RlaBwd<float>{p}(); break;
    case DType::kFloat64: RlaBwd<double>{p}(); break;
    case DType::kBFloat16: RlaBwd<bf16_t>{p}(); break;
    default: throw std::runtime_error("rla_bwd: unsupported dtype on CPU");
  }
}

}  // namespace rattention::cpu
