// CPU residual linear attention, forward (SPEC.md branch 2), chunked.
//
// Per (batch b, kv head g) and chunk c (query rows [t0, t0+nq), shifted keys [s0, s0+nk)):
//   gO[nq, D]  = phi(gQ) (H0[h] + S_c)                       inter-chunk, per query head h
//              + mask(phi(gQ) phi(gK~)^T) gV~                intra-chunk, s <= t - w - 1
//   S_{c+1}    = S_c + phi(gK~)^T gV~                         [2D, D], shared by the group
// phi is computed per chunk in acc type into scratch; gK~/gV~ are the chunk's shifted keys,
// addressed by index (nothing shifted is materialised). The state at each segment start
// (every `checkpoint_every` chunks) goes to p.checkpoints for the backward.
//
// Sequences: every (sequence b, kv head g) runs its own chunks (rla_common.h: Geometry per
// sequence, halo as index arithmetic); the state starts at the carried state (or 0).
//
// Parallelism. Linear attention is independent across value columns, so a task may own
// (b, g, value-column block): it recomputes phi (cheap) and the [nq, nk] score block per
// column block. When B * Hkv cannot fill the threads and there are >= 2 segments, a cheap
// state-only pass (column-split) writes the checkpoints first and then every segment is an
// independent output task starting from its checkpoint.
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "rla_common.h"

namespace rattention::cpu {
namespace {

using namespace rla_detail;

template <typename scalar_t>
struct RlaFwd {
  using acc_t = typename AccType<scalar_t>::type;
  const RlaFwdParams& p;
  const int64_t Hkv, D, F;

  explicit RlaFwd(const RlaFwdParams& params)
      : p(params), Hkv(params.dims.heads_kv), D(params.dims.head_dim),
        F(2 * params.dims.head_dim) {}

  const scalar_t* q() const { return static_cast<const scalar_t*>(p.q); }
  const scalar_t* k() const { return static_cast<const scalar_t*>(p.k); }
  const scalar_t* v() const { return static_cast<const scalar_t*>(p.v); }
  acc_t* ckpt(int64_t b, int64_t g, int64_t i) const {
    return static_cast<acc_t*>(p.checkpoints) + p.ckpt_index(b, g, i) * F * D;
  }
  acc_t* final_state(int64_t b, int64_t g) const {
    return static_cast<acc_t*>(p.final_state) + (b * Hkv + g) * F * D;
  }
  const acc_t* h0(int64_t b, int64_t h) const {
    return static_cast<const acc_t*>(p.initial_state) + b * p.initial_state_bstride +
           h * F * D;
  }
  // sS [F, nc] = columns [j0, j0 + nc) of the carried state of (b, g), or 0.
  void init_state(int64_t b, int64_t g, int64_t j0, int64_t nc, acc_t* sS) const {
    if (p.carried_state != nullptr) {
      copy_block(static_cast<const acc_t*>(p.carried_state) + (b * Hkv + g) * F * D + j0, D, sS,
                 nc, F, nc);
    } else {
      std::fill(sS, sS + F * nc, acc_t(0));
    }
  }

  // Chunks [c_begin, c_end) of (b, g), value columns [j0, j0 + nc).
  // sS: [F, nc] state at c_begin on entry, after c_end - 1 on exit.
  // outputs: write o for the group's query heads; save_ckpt: write sS at segment starts.
  void run(const Geometry& geo, int64_t b, int64_t g, int64_t j0, int64_t nc, int64_t c_begin,
           int64_t c_end, acc_t* sS, bool outputs, bool save_ckpt) const {
    const int64_t C = geo.C;
    std::vector<acc_t> scratch(C * D + C * F + C * nc +
                               (outputs ? C * D + C * F + C * C + C * nc + F * nc : 0));
    acc_t* sXk = scratch.data();   // [C, D]  raw k~ rows
    acc_t* sPk = sXk + C * D;      // [C, F]  phi(k~)
    acc_t* sV = sPk + C * F;       // [C, nc] v~ columns
    acc_t* sXq = sV + C * nc;      // [C, D]  raw q rows
    acc_t* sPq = sXq + C * D;      // [C, F]  phi(q)
    acc_t* sA = sPq + C * F;       // [C, C]  masked scores
    acc_t* sO = sA + C * C;        // [C, nc] output block
    acc_t* sSh = sO + C * nc;      // [F, nc] H0[h] + S
    auto* out = static_cast<acc_t*>(p.out);
    const auto& os = p.out_stride;

    for (int64_t c = c_begin; c < c_end; ++c) {
      if (save_ckpt && c % geo.every == 0) {
        copy_block(sS, nc, ckpt(b, g, c / geo.every) + j0, D, F, nc);
      }
      const ChunkRange r = chunk_range(geo, c);
      bool v_finite = true;
      if (r.nk > 0) {
        load_rows(k(), p.k_stride, p.k_offset(p.k_stride, b, r.s0, g), r.nk, 0, D, sXk, D);
        feature_rows(p.feature_map, sXk, sPk, r.nk, D);
        load_rows(v(), p.v_stride, p.k_offset(p.v_stride, b, r.s0, g), r.nk, j0, nc, sV, nc);
        if (outputs) v_finite = all_finite(sV, r.nk, nc, nc);
      }
      if (outputs) {
        for (int64_t hh = 0; hh < geo.G; ++hh) {
          const int64_t h = g * geo.G + hh;
          load_rows(q(), p.q_stride, p.q_offset(p.q_stride, b, r.t0, h), r.nq, 0, D, sXq, D);
          feature_rows(p.feature_map, sXq, sPq, r.nq, D);
          const acc_t* state = sS;
          if (p.initial_state != nullptr) {
            const acc_t* gH0 = h0(b, h) + j0;
            for (int64_t i = 0; i < F; ++i)
              for (int64_t j = 0; j < nc; ++j) sSh[i * nc + j] = sS[i * nc + j] + gH0[i * D + j];
            state = sSh;
          }
          // sO[nq, nc] = phi(Q) [nq, F] @ state [F, nc]
          gemm<acc_t>(false, false, r.nq, nc, F, acc_t(1), sPq, F, state, nc, acc_t(0), sO, nc);
          if (r.nk > 0) {
            // sA[nq, nk] = phi(Q) @ phi(K~)^T, masked; sO += sA @ V~
            gemm<acc_t>(false, true, r.nq, r.nk, F, acc_t(1), sPq, F, sPk, F, acc_t(0), sA, r.nk);
            mask_chunk(sA, r.nk, r, geo.w);
            if (v_finite) {
              gemm<acc_t>(false, false, r.nq, nc, r.nk, acc_t(1), sA, r.nk, sV, nc, acc_t(1), sO, nc);
            } else {  // a non-finite v~ row must not meet the zeros of earlier queries
              masked_gemm_nn<acc_t>(r.nq, r.nk, nc, acc_t(1), sA, r.nk, sV, nc, sO, nc,
                                    [&](int64_t i) { return chunk_visible_cols(r, geo.w, i); });
            }
          }
          for (int64_t i = 0; i < r.nq; ++i) {
            acc_t* dst = out + p.q_offset(os, b, r.t0 + i, h) + j0 * os.d;
            for (int64_t j = 0; j < nc; ++j) dst[j * os.d] = sO[i * nc + j];
          }
        }
      }
      if (r.nk > 0) {
        // S[F, nc] += phi(K~)^T [F, nk] @ V~ [nk, nc]
        gemm<acc_t>(true, false, F, nc, r.nk, acc_t(1), sPk, F, sV, nc, acc_t(1), sS, nc);
      }
    }
  }

  // Whole sequences, one task per (b, g, value-column block): `outputs` as in run(); the
  // checkpoints and the final state are always written.
  void whole_sequences(int64_t want_blocks, int64_t min_width, bool outputs) const {
    const int64_t BH = p.num_seqs() * Hkv;
    const int64_t nc0 = column_block(D, want_blocks, min_width);
    const int64_t nb = ceil_div(D, nc0);
    parallel_for(BH * nb, 1, [&](int64_t t_begin, int64_t t_end) {
      for (int64_t task = t_begin; task < t_end; ++task) {
        const int64_t bg = task / nb, j0 = (task % nb) * nc0, nc = imin(nc0, D - j0);
        const int64_t b = bg / Hkv, g = bg % Hkv;
        const Geometry geo(p, b);
        std::vector<acc_t> sS(F * nc);
        init_state(b, g, j0, nc, sS.data());
        run(geo, b, g, j0, nc, 0, geo.n_chunks, sS.data(), outputs, true);
        copy_block(sS.data(), nc, final_state(b, g) + j0, D, F, nc);
      }
    });
  }

  void operator()() const {
    const int64_t BH = p.num_seqs() * Hkv;
    const int64_t threads = max_threads();
    if (BH == 0) return;
    if (!use_segment_parallel(p)) {
      // One pass per (b, g, column block): outputs, checkpoints and final state together.
      whole_sequences(BH >= threads ? 1 : ceil_div(threads, BH), 32, true);
      return;
    }
    // 1) State-only pass, split over value columns: checkpoints + final state.
    whole_sequences(ceil_div(threads, BH), 16, false);
    // 2) Outputs: one task per (b, g, segment), starting from that segment's checkpoint.
    const std::vector<SeqSegment> segs = list_segments(p);
    const int64_t n_segs = static_cast<int64_t>(segs.size());
    parallel_for(n_segs * Hkv, 1, [&](int64_t t_begin, int64_t t_end) {
      std::vector<acc_t> sS(F * D);
      for (int64_t task = t_begin; task < t_end; ++task) {
        const SeqSegment& ss = segs[task / Hkv];
        const int64_t b = ss.seq, g = task % Hkv, sg = ss.seg;
        const Geometry geo(p, b);
        std::memcpy(sS.data(), ckpt(b, g, sg), F * D * sizeof(acc_t));
        run(geo, b, g, 0, D, geo.seg_first_chunk(sg), geo.seg_end_chunk(sg), sS.data(), true,
            false);
      }
    });
  }
};

}  // namespace

void rla_fwd(const RlaFwdParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: RlaFwd<float>{p}(); break;
    case DType::kFloat64: RlaFwd<double>{p}(); break;
    case DType::kBFloat16: RlaFwd<bf16_t>{p}(); break;
    default: throw std::runtime_error("rla_fwd: unsupported dtype on CPU");
  }
}

}  // namespace rattention::cpu
