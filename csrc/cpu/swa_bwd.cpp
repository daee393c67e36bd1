// Sliding-window softmax attention, backward, CPU (flash-attention-2 math).
//
//   P  = exp(scale * Q'K'^T - lse)         recomputed per tile from the saved lse
//   dV = P^T dO,  dP = dO V^T,  Di = rowsum(dO * O) - grad_lse
//   dS = P * (dP - Di),  dQ' = scale * dS K',  dK' = scale * dS^T Q'
//   dQ = rope^-1(dQ'), dK = rope^-1(dK')   (rotary is a rotation: its adjoint is the inverse)
//
// Sizes, row offsets and rotary positions come from QkvParams (packed documents, halo):
// query row t of sequence b is the token at key row t + halo(b). Work lists are built per
// sequence, so a packed batch costs the sum of its documents' tiles.
//
// Deterministic by construction (no atomics, nothing depends on the thread count):
//   main pass: one task per (sequence, kv head, chunk of key tiles). For each key tile it owns
//           dK, dV and loops over the query tiles that see it, with the G query heads of the
//           group stacked as rows (so the GQA sum over the group is part of the GEMM's
//           reduction); its dQ' contributions go to a dQ buffer owned by the chunk;
//   dQ pass: one task per (batch, kv head, query tile) sums the chunk buffers that reach the
//           tile, in chunk order, and applies the inverse rotary.
// With too few chunk tasks to fill the machine (w ~ T and few heads), a two-pass variant
// runs instead: pass 1 as above without dQ, pass 2 per query tile recomputes P and dS over
// the key tiles of its window and owns dQ.
// Tile shapes (acc type, ld in brackets):
//   sQ, sdO [G*bm, D] (D)   sK, sV [bn, D] (D)   sP, sdS [G*bm, bn] (kBlockN)
//   accK, accV [bn, D] (D)  accQ [G*bm, D] (D)
#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
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

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

template <typename T>
struct BwdCtx {
  using acc_t = typename AccType<T>::type;
  const SwaBwdParams& p;
  int64_t Hq, Hkv, D, G, w;
  acc_t scale;
  const T *q, *k, *v;
  const acc_t *go, *lse, *cos, *sin;
  const acc_t* Di;  // lse-shaped

  // Sizes of sequence b: query rows, key rows, halo (query row t is key row t + off).
  struct Seq {
    int64_t b, Tq, Tk, off;
  };
  Seq seq(int64_t b) const { return Seq{b, p.seqlen_q(b), p.seqlen_k(b), p.halo(b)}; }

  // Pack the G stacked query tiles (rows r = g*bm + i): Q' and dO, plus lse and Di per row.
  void pack_query_block(const Seq& sq, int64_t hkv, int64_t m0, int64_t bm, acc_t* sQ,
                        acc_t* sdO, acc_t* rlse, acc_t* rDi) const {
    const int64_t b = sq.b;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t hq = hkv * G + g;
      pack_rows<T, acc_t>(q, p.q_stride, p.q_offset(p.q_stride, b, m0, hq), bm, D, cos, sin,
                          m0 + sq.off, sQ + g * bm * D);
      pack_rows<acc_t, acc_t>(go, p.grad_out_stride, p.q_offset(p.grad_out_stride, b, m0, hq),
                              bm, D, nullptr, nullptr, 0, sdO + g * bm * D);
      for (int64_t i = 0; i < bm; ++i) {
        rlse[g * bm + i] = lse[p.lse_index(b, hq, m0 + i)];
        rDi[g * bm + i] = Di[p.lse_index(b, hq, m0 + i)];
      }
    }
  }

  // Pack key/value tile n0 .. n0+bn-1 of kv head hkv: K' (rotated at its positions) and V.
  void pack_key_tile(const Seq& sq, int64_t hkv, int64_t n0, int64_t bn, acc_t* sK,
                     acc_t* sV) const {
    pack_rows<T, acc_t>(k, p.k_stride, p.k_offset(p.k_stride, sq.b, n0, hkv), bn, D, cos, sin,
                        n0, sK);
    pack_rows<T, acc_t>(v, p.v_stride, p.k_offset(p.v_stride, sq.b, n0, hkv), bn, D, nullptr,
                        nullptr, 0, sV);
  }

  // Given packed Q' [R, D], K' [bn, D], V [bn, D], dO [R, D]: sP = P, sdS = dS (scaled by
  // nothing: callers fold `scale` into the dQ/dK products).
  void probs_and_dscores(const Seq& sq, int64_t mt, int64_t n, int64_t m0, int64_t bm,
                         int64_t n0, int64_t bn, const acc_t* sQ, const acc_t* sK,
                         const acc_t* sV, const acc_t* sdO, const acc_t* rlse, const acc_t* rDi,
                         acc_t* sP, acc_t* sdS) const {
    const int64_t R = G * bm;
    gemm<acc_t>(false, true, R, bn, D, scale, sQ, D, sK, D, acc_t(0), sP, kBlockN);
    const bool need_mask =
        swa_tile_needs_mask(mt, n, kBlockM, kBlockN, sq.Tq, sq.Tk, sq.off, w);
    for (int64_t r = 0; r < R; ++r) {
      acc_t* prow = sP + r * kBlockN;
      if (need_mask) mask_row(prow, m0 + r % bm + sq.off, n0, bn, w);
      exp_sub_sum(prow, bn, rlse[r]);
      // exp(-inf - lse) is NaN when the row's lse is: masked P stays exactly 0
      if (need_mask) zero_outside(prow, bn, swa_visible_cols(m0 + r % bm + sq.off, n0, bn, w));
    }
    // dP = dO @ V^T   [R, bn]
    gemm<acc_t>(false, true, R, bn, D, acc_t(1), sdO, D, sV, D, acc_t(0), sdS, kBlockN);
    for (int64_t r = 0; r < R; ++r) {
      const acc_t* prow = sP + r * kBlockN;
      acc_t* drow = sdS + r * kBlockN;
      const acc_t di = rDi[r];
      for (int64_t j = 0; j < bn; ++j) drow[j] = prow[j] * (drow[j] - di);
      // 0 * (NaN - Di) from a non-finite V row or Di: masked dS stays exactly 0
      if (need_mask) zero_outside(drow, bn, swa_visible_cols(m0 + r % bm + sq.off, n0, bn, w));
    }
  }

  // The products of one (query tile, key tile) pair that multiply a masked matrix (P or dS)
  // by a whole tile: accV += P^T dO, accK += scale dS^T Q', dq += scale dS K' (each skipped
  // when its accumulator is null). At a window edge a non-finite dO / Q' / K' row outside a
  // pair's window must not meet its zero: those tiles take the exact masked product.
  void tile_products(const Seq& sq, int64_t mt, int64_t n, int64_t m0, int64_t bm, int64_t n0,
                     int64_t bn, const acc_t* sQ, const acc_t* sK, const acc_t* sdO, const acc_t* sP,
                     const acc_t* sdS, acc_t* accV, acc_t* accK, acc_t* dq) const {
    const int64_t R = G * bm;
    const bool edge = swa_tile_needs_mask(mt, n, kBlockM, kBlockN, sq.Tq, sq.Tk, sq.off, w);
    auto vis = [&](int64_t r) { return swa_visible_cols(m0 + r % bm + sq.off, n0, bn, w); };
    if (accV != nullptr) {
      if (edge && !all_finite(sdO, R, D, D))
        masked_gemm_tn<acc_t>(R, bn, D, acc_t(1), sP, kBlockN, sdO, D, accV, D, vis);
      else
        gemm<acc_t>(true, false, bn, D, R, acc_t(1), sP, kBlockN, sdO, D, acc_t(1), accV, D);
    }
    if (accK != nullptr) {
      if (edge && !all_finite(sQ, R, D, D))
        masked_gemm_tn<acc_t>(R, bn, D, scale, sdS, kBlockN, sQ, D, accK, D, vis);
      else
        gemm<acc_t>(true, false, bn, D, R, scale, sdS, kBlockN, sQ, D, acc_t(1), accK, D);
    }
    if (dq != nullptr) {
      if (edge && !all_finite(sK, bn, D, D))
        masked_gemm_nn<acc_t>(R, bn, D, scale, sdS, kBlockN, sK, D, dq, D, vis);
      else
        gemm<acc_t>(false, false, R, D, bn, scale, sdS, kBlockN, sK, D, acc_t(1), dq, D);
    }
  }
};

// One chunk of consecutive key tiles of one sequence, and the query tiles its keys reach.
struct KeyChunk {
  int64_t seq, n_first, n_end;  // key tiles [n_first, n_end)
  int64_t mt_lo, mt_hi;         // query tiles [mt_lo, mt_hi) (empty: mt_lo == mt_hi)
  int64_t buf_off;              // offset of its dQ buffer (per kv head)
};

template <typename T>
void swa_bwd_impl(const SwaBwdParams& p) {
  using acc_t = typename AccType<T>::type;
  const AttnDims& d = p.dims;
  BwdCtx<T> c{p};
  c.Hq = d.heads_q;
  c.Hkv = d.heads_kv;
  c.D = d.head_dim;
  c.G = d.group();
  c.w = p.window_size;
  c.scale = static_cast<acc_t>(p.softmax_scale);
  c.q = static_cast<const T*>(p.q);
  c.k = static_cast<const T*>(p.k);
  c.v = static_cast<const T*>(p.v);
  c.go = static_cast<const acc_t*>(p.grad_out);
  c.lse = static_cast<const acc_t*>(p.lse);
  c.cos = static_cast<const acc_t*>(p.rotary_cos);
  c.sin = static_cast<const acc_t*>(p.rotary_sin);
  using Seq = typename BwdCtx<T>::Seq;
  const int64_t Hq = c.Hq, Hkv = c.Hkv, D = c.D, G = c.G;
  const auto* out = static_cast<const acc_t*>(p.out);
  const auto* glse = static_cast<const acc_t*>(p.grad_lse);
  auto* dq = static_cast<T*>(p.grad_q);
  auto* dk = static_cast<T*>(p.grad_k);
  auto* dv = static_cast<T*>(p.grad_v);

  // Pass 0: Di = <dO, O> - grad_lse per (row, head) (O(T) per head: no T x T anything).
  // Elementwise, so a packed batch is walked as one sequence of `total` rows.
  const int64_t rows_per_seq = d.seqlen;
  const int64_t n_elem_seqs = p.packed() ? 1 : d.batch;
  std::vector<acc_t> Di(static_cast<size_t>(n_elem_seqs * Hq * rows_per_seq));
  c.Di = Di.data();
  parallel_for(n_elem_seqs * Hq * rows_per_seq, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % rows_per_seq, hq = (r / rows_per_seq) % Hq,
                    b = r / (rows_per_seq * Hq);
      const acc_t* orow = out + p.q_offset(p.out_stride, b, t, hq);
      const acc_t* grow = c.go + p.q_offset(p.grad_out_stride, b, t, hq);
      acc_t s = 0;
      for (int64_t i = 0; i < D; ++i) s += orow[i * p.out_stride.d] * grow[i * p.grad_out_stride.d];
      const int64_t li = p.lse_index(b, hq, t);
      Di[li] = s - (glse != nullptr ? glse[li] : acc_t(0));
    }
  });

  const int64_t rows_max = G * kBlockM;
  const int64_t half = D / 2;
  const std::vector<SeqTile> q_tiles = list_seq_tiles(p, kBlockM, /*over_keys=*/false);
  const std::vector<SeqTile> k_tiles = list_seq_tiles(p, kBlockN, /*over_keys=*/true);
  const int64_t n_qt = static_cast<int64_t>(q_tiles.size());
  const int64_t n_kt = static_cast<int64_t>(k_tiles.size());

  struct Scratch {
    std::vector<acc_t> sQ, sdO, sK, sV, sP, sdS, accK, accV, accQ, rlse, rDi;
  };
  // Per-thread scratch; `key_tiles` > 1 sizes the key-side buffers for a whole chunk.
  auto make_scratch_for = [&](int64_t key_tiles) {
    auto v = [](int64_t n) { return std::vector<acc_t>(static_cast<size_t>(n)); };
    const int64_t kv = key_tiles * kBlockN * D;
    return Scratch{v(rows_max * D), v(rows_max * D),       v(kv),
                   v(kv),           v(rows_max * kBlockN), v(rows_max * kBlockN),
                   v(kv),           v(kv),                 v(rows_max * D),
                   v(rows_max),     v(rows_max)};
  };
  auto make_scratch = [&] { return make_scratch_for(1); };

  // Single-pass variant: key tiles are grouped into chunks of CT tiles; the task of a chunk
  // also accumulates dQ' = scale * dS K' into a dQ buffer of its own covering the query tiles
  // its keys reach ([mt_lo, mt_hi), G*kBlockM*D values per tile), and a last pass sums,
  // per query tile, the buffers of the chunks that reach it in chunk order. That saves the
  // second recomputation of S, P, dP; memory is O(T) per head (about (1 + (w + 2 tiles) /
  // chunk) times dQ). The chunking depends on the sizes and w only, never on the thread
  // count, so results are reproducible bit for bit. When it would leave too few tasks
  // (w ~ T with few heads), the two-pass variant below runs instead.
  int64_t max_ntiles = 1;
  for (const SeqTile& kt : k_tiles) max_ntiles = imax(max_ntiles, kt.tile + 1);
  const int64_t CT = imin(max_ntiles, imax(4, ceil_div(c.w, kBlockN)));
  std::vector<KeyChunk> chunks;
  std::vector<int64_t> chunk_base(d.batch + 1, 0);  // first chunk of each sequence
  int64_t buf_per_h = 0;
  for (int64_t b = 0; b < d.batch; ++b) {
    chunk_base[b] = static_cast<int64_t>(chunks.size());
    const Seq sq = c.seq(b);
    const int64_t n_ntiles = ceil_div(sq.Tk, kBlockN);
    for (int64_t n_first = 0; n_first < n_ntiles; n_first += CT) {
      KeyChunk ch{b, n_first, imin(n_ntiles, n_first + CT), 0, 0, buf_per_h};
      bool any = false;
      for (int64_t n = ch.n_first; n < ch.n_end; ++n) {
        const TileRange qr =
            swa_query_tiles_for_key_tile(n, kBlockM, kBlockN, sq.Tq, sq.Tk, sq.off, c.w);
        if (qr.begin >= qr.end) continue;
        ch.mt_lo = any ? imin(ch.mt_lo, qr.begin) : qr.begin;
        ch.mt_hi = any ? imax(ch.mt_hi, qr.end) : qr.end;
        any = true;
      }
      buf_per_h += (ch.mt_hi - ch.mt_lo) * rows_max * D;
      chunks.push_back(ch);
    }
  }
  chunk_base[d.batch] = static_cast<int64_t>(chunks.size());
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  const bool single_pass = Hkv * n_chunks >= 8;
  std::unique_ptr<acc_t[]> dq_buf(single_pass ? new acc_t[Hkv * buf_per_h] : nullptr);

  // Inverse-rotate and store dK' rows [bn, D] and dV rows of key tile n0.
  auto store_dkv = [&](const Seq& sq, int64_t hkv, int64_t n0, int64_t bn, acc_t* accK,
                       const acc_t* accV) {
    for (int64_t j = 0; j < bn; ++j) {
      const int64_t s = n0 + j;
      acc_t* krow = accK + j * D;
      if (c.cos != nullptr)
        rotary_apply<acc_t>(krow, c.cos + s * half, c.sin + s * half, static_cast<int>(D),
                            /*inverse=*/true);
      const int64_t off = (p.k_row(sq.b, s) * Hkv + hkv) * D;
      store_row<T, acc_t>(krow, dk + off, D);
      store_row<T, acc_t>(accV + j * D, dv + off, D);
    }
  };

  // Two-pass variant, pass 1: dK, dV of key tile n.
  auto key_tile = [&](const Seq& sq, int64_t hkv, int64_t n, Scratch& s) {
    auto &sQ = s.sQ, &sdO = s.sdO, &sK = s.sK, &sV = s.sV, &sP = s.sP, &sdS = s.sdS;
    auto &accK = s.accK, &accV = s.accV, &rlse = s.rlse, &rDi = s.rDi;
    const int64_t n0 = n * kBlockN, bn = imin(kBlockN, sq.Tk - n0);
    c.pack_key_tile(sq, hkv, n0, bn, sK.data(), sV.data());
    std::fill(accK.begin(), accK.end(), acc_t(0));
    std::fill(accV.begin(), accV.end(), acc_t(0));
    const TileRange qr =
        swa_query_tiles_for_key_tile(n, kBlockM, kBlockN, sq.Tq, sq.Tk, sq.off, c.w);
    for (int64_t mt = qr.begin; mt < qr.end; ++mt) {
      const int64_t m0 = mt * kBlockM, bm = imin(kBlockM, sq.Tq - m0);
      c.pack_query_block(sq, hkv, m0, bm, sQ.data(), sdO.data(), rlse.data(), rDi.data());
      c.probs_and_dscores(sq, mt, n, m0, bm, n0, bn, sQ.data(), sK.data(), sV.data(),
                          sdO.data(), rlse.data(), rDi.data(), sP.data(), sdS.data());
      // accV += P^T dO   [bn, D];   accK += scale * dS^T Q'   [bn, D]
      c.tile_products(sq, mt, n, m0, bm, n0, bn, sQ.data(), sK.data(), sdO.data(), sP.data(),
                      sdS.data(), accV.data(), accK.data(), nullptr);
    }
    store_dkv(sq, hkv, n0, bn, accK.data(), accV.data());
  };

  // Inverse-rotate and store dQ' rows [R, D] of query tile mt.
  auto store_dq = [&](const Seq& sq, int64_t hkv, int64_t mt, acc_t* accQ) {
    const int64_t m0 = mt * kBlockM, bm = imin(kBlockM, sq.Tq - m0), R = G * bm;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t g = r / bm, t = m0 + r % bm, hq = hkv * G + g, pos = t + sq.off;
      acc_t* qrow = accQ + r * D;
      if (c.cos != nullptr)
        rotary_apply<acc_t>(qrow, c.cos + pos * half, c.sin + pos * half, static_cast<int>(D),
                            /*inverse=*/true);
      store_row<T, acc_t>(qrow, dq + (p.q_row(sq.b, t) * Hq + hq) * D, D);
    }
  };

  if (single_pass) {
    // Query tiles outer, the chunk's key tiles inner: Q' and dO are packed once per
    // (chunk, query tile) and the chunk's K', V once; each accumulator still sums in the
    // same order as the per-key-tile loop (query tiles ascending for dK/dV, key tiles
    // ascending for dQ').
    auto make_chunk_scratch = [&] { return make_scratch_for(CT); };
    parallel_items(Hkv * n_chunks, make_chunk_scratch, [&](int64_t item, Scratch& s) {
      const KeyChunk& ch = chunks[item % n_chunks];
      const int64_t hkv = item / n_chunks;
      const Seq sq = c.seq(ch.seq);
      const int64_t n_first = ch.n_first, n_end = ch.n_end;
      const int64_t tileKD = kBlockN * D;
      acc_t* buf = dq_buf.get() + hkv * buf_per_h + ch.buf_off;
      std::fill(buf, buf + (ch.mt_hi - ch.mt_lo) * rows_max * D, acc_t(0));
      for (int64_t n = n_first; n < n_end; ++n) {
        const int64_t n0 = n * kBlockN, bn = imin(kBlockN, sq.Tk - n0);
        c.pack_key_tile(sq, hkv, n0, bn, s.sK.data() + (n - n_first) * tileKD,
                        s.sV.data() + (n - n_first) * tileKD);
      }
      std::fill(s.accK.begin(), s.accK.begin() + (n_end - n_first) * tileKD, acc_t(0));
      std::fill(s.accV.begin(), s.accV.begin() + (n_end - n_first) * tileKD, acc_t(0));
      for (int64_t mt = ch.mt_lo; mt < ch.mt_hi; ++mt) {
        const TileRange kr =
            swa_key_tiles_for_query_tile(mt, kBlockM, kBlockN, sq.Tq, sq.off, c.w);
        const int64_t nb = imax(kr.begin, n_first), ne = imin(kr.end, n_end);
        if (nb >= ne) continue;
        const int64_t m0 = mt * kBlockM, bm = imin(kBlockM, sq.Tq - m0);
        c.pack_query_block(sq, hkv, m0, bm, s.sQ.data(), s.sdO.data(), s.rlse.data(),
                           s.rDi.data());
        acc_t* dq_blk = buf + (mt - ch.mt_lo) * rows_max * D;
        for (int64_t n = nb; n < ne; ++n) {
          const int64_t n0 = n * kBlockN, bn = imin(kBlockN, sq.Tk - n0);
          const acc_t* sK = s.sK.data() + (n - n_first) * tileKD;
          const acc_t* sV = s.sV.data() + (n - n_first) * tileKD;
          acc_t* accK = s.accK.data() + (n - n_first) * tileKD;
          acc_t* accV = s.accV.data() + (n - n_first) * tileKD;
          c.probs_and_dscores(sq, mt, n, m0, bm, n0, bn, s.sQ.data(), sK, sV, s.sdO.data(),
                              s.rlse.data(), s.rDi.data(), s.sP.data(), s.sdS.data());
          c.tile_products(sq, mt, n, m0, bm, n0, bn, s.sQ.data(), sK, s.sdO.data(),
                          s.sP.data(), s.sdS.data(), accV, accK, dq_blk);
        }
      }
      for (int64_t n = n_first; n < n_end; ++n) {
        const int64_t n0 = n * kBlockN, bn = imin(kBlockN, sq.Tk - n0);
        store_dkv(sq, hkv, n0, bn, s.accK.data() + (n - n_first) * tileKD,
                  s.accV.data() + (n - n_first) * tileKD);
      }
    });
    parallel_items(Hkv * n_qt, make_scratch, [&](int64_t item, Scratch& s) {
      const SeqTile& qt = q_tiles[item % n_qt];
      const int64_t hkv = item / n_qt, mt = qt.tile;
      const Seq sq = c.seq(qt.seq);
      const int64_t R = G * imin(kBlockM, sq.Tq - mt * kBlockM);
      acc_t* accQ = s.accQ.data();
      std::fill(accQ, accQ + R * D, acc_t(0));
      const TileRange kr = swa_key_tiles_for_query_tile(mt, kBlockM, kBlockN, sq.Tq, sq.off, c.w);
      for (int64_t ci = kr.begin / CT; ci <= (kr.end - 1) / CT; ++ci) {
        const KeyChunk& ch = chunks[chunk_base[qt.seq] + ci];
        const acc_t* src =
            dq_buf.get() + hkv * buf_per_h + ch.buf_off + (mt - ch.mt_lo) * rows_max * D;
        for (int64_t i = 0; i < R * D; ++i) accQ[i] += src[i];
      }
      store_dq(sq, hkv, mt, accQ);
    });
    return;
  }

  // Two-pass variant. Pass 1: dK, dV per (sequence, kv head, key tile).
  parallel_items(Hkv * n_kt, make_scratch, [&](int64_t item, Scratch& s) {
    const SeqTile& kt = k_tiles[item % n_kt];
    key_tile(c.seq(kt.seq), item / n_kt, kt.tile, s);
  });

  // Pass 2: dQ per (sequence, kv head, query tile), G heads stacked.
  parallel_items(Hkv * n_qt, make_scratch, [&](int64_t item, Scratch& s) {
    auto &sQ = s.sQ, &sdO = s.sdO, &sK = s.sK, &sV = s.sV, &sP = s.sP, &sdS = s.sdS;
    auto &accQ = s.accQ, &rlse = s.rlse, &rDi = s.rDi;
    const SeqTile& qt = q_tiles[item % n_qt];
    const int64_t hkv = item / n_qt, mt = qt.tile;
    const Seq sq = c.seq(qt.seq);
    const int64_t m0 = mt * kBlockM, bm = imin(kBlockM, sq.Tq - m0), R = G * bm;
    c.pack_query_block(sq, hkv, m0, bm, sQ.data(), sdO.data(), rlse.data(), rDi.data());
    std::fill(accQ.begin(), accQ.begin() + R * D, acc_t(0));
    const TileRange kr = swa_key_tiles_for_query_tile(mt, kBlockM, kBlockN, sq.Tq, sq.off, c.w);
    for (int64_t n = kr.begin; n < kr.end; ++n) {
      const int64_t n0 = n * kBlockN, bn = imin(kBlockN, sq.Tk - n0);
      c.pack_key_tile(sq, hkv, n0, bn, sK.data(), sV.data());
      c.probs_and_dscores(sq, mt, n, m0, bm, n0, bn, sQ.data(), sK.data(), sV.data(),
                          sdO.data(), rlse.data(), rDi.data(), sP.data(), sdS.data());
      // accQ += scale * dS @ K'   [R, D]
      c.tile_products(sq, mt, n, m0, bm, n0, bn, sQ.data(), sK.data(), sdO.data(), sP.data(),
                      sdS.data(), nullptr, nullptr, accQ.data());
    }
    store_dq(sq, hkv, mt, accQ.data());
  });
}

}  // namespace

void swa_bwd(const SwaBwdParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return swa_bwd_impl<float>(p);
    case DType::kFloat64: return swa_bwd_impl<double>(p);
    case DType::kBFloat16: return swa_bwd_impl<bf16_t>(p);
    default: throw std::invalid_argument("swa_bwd: unsupported dtype (float32, float64, bfloat16)");
  }
}

}  // namespace rattention::cpu
