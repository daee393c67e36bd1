// Parameter structs: everything a kernel needs, filled by the op layer from tensors.
// Kernels (CPU and CUDA) take these and never see an at::Tensor. Data pointers are
// `void*` of the storage dtype `dtype`; strides are in elements; all int64.
//
// Every attention kernel's params start with QkvParams (below): the q/k/v description and
// how its rows split into sequences. Kernels read every per-sequence size and row offset
// through its accessors, so dense batches, packed batches and continued chunks share one
// code path.
//
// Dense layouts (user-facing, flash-attn convention):
//   q, o, grad_o           [B, T, Hq, D]    (any strides)
//   k, v                   [B, T_k, Hkv, D] (any strides), T_k = T + halo (see below)
//   lse                    [B, Hq, T]       contiguous, acc type
//   rotary_cos/sin         [P, D/2]         contiguous, acc type, P >= T_k; row i is the
//                                           position of k/v row i; q row t uses row t + halo
//   RLA states             [B, Hkv, 2D, D]  contiguous, acc type
//   initial_state (H0)     [B or 1, Hq, 2D, D] contiguous, acc type (batch stride 0 if 1)
//   carried_state          [B, Hkv, 2D, D]  contiguous, acc type
// "acc type" = float64 for float64 inputs, float32 otherwise. SWA/RLA branch outputs and
// their gradients that the mixing consumes are in acc type as well.
//
// Packed batches (cu_seqlens != nullptr): N documents back to back. q, o, grad_o are
// [total, Hq, D], k, v [total, Hkv, D] (the tensors' batch stride is stored as 0), lse is
// [Hq, total], H0 [N or 1, Hq, 2D, D], final / carried states [N, Hkv, 2D, D]. cu_seqlens is
// int32 [N+1]: 0, non-decreasing, last = total; document b is rows [cu[b], cu[b+1]).
// dims.batch = N, dims.seqlen = dims.seqlen_k = total. Each document is computed as if it
// were alone: window, RLA shift and rotary positions restart at its first row.
//
// Continuation (dense only): k/v may hold `halo = T_k - T` more rows than q, the keys and
// values of the tokens just before q's first token (bottom-right alignment, like flash-attn
// with seqlen_k > seqlen_q): q row t is the token at k/v row t + halo. Halo rows are
// attended to and shifted into the RLA state but produce no output. 0 <= halo <= w + 1
// (older tokens belong in the carried state). The carried state (per kv head, kept apart
// from the per-query-head H0) is the RLA state of everything before the halo; it is the
// starting value of S, so the final state is carried + the k/v rows s <= T_k - w - 2.
#pragma once
#include <cstdint>

#include "dtype.h"
#include "feature_map.h"
#include "macros.h"

namespace rattention {

struct Strides4 {
  int64_t b, t, h, d;
};

struct AttnDims {
  int64_t batch;     // B (dense) or N, the number of documents (packed)
  int64_t seqlen;    // T = rows of q per sequence (dense) or total rows (packed)
  int64_t heads_q;   // Hq
  int64_t heads_kv;  // Hkv
  int64_t head_dim;  // D
  int64_t seqlen_k;  // T_k = rows of k/v per sequence (dense, T + halo) or total (packed)
  RATT_HD int64_t group() const { return heads_q / heads_kv; }
};

// The q/k/v description every attention kernel reads its sizes through. Accessors that
// read cu_seqlens must run where it lives: host memory for the CPU kernels, device memory
// for the CUDA kernels (never dereference it in a CUDA launcher).
struct QkvParams {
  AttnDims dims;
  DType dtype;  // of q, k, v
  const void* q;
  const void* k;
  const void* v;
  Strides4 q_stride, k_stride, v_stride;  // packed: .b == 0
  const int32_t* cu_seqlens;              // [N+1] (packed) or nullptr (dense)

  RATT_HD bool packed() const { return cu_seqlens != nullptr; }
  RATT_HD int64_t num_seqs() const { return dims.batch; }
  // Document b's rows [doc_begin(b), doc_end(b)). The values are clamped to [0, total] and
  // to each other: on the host the op layer has checked cu_seqlens, but on a GPU it is not
  // read back (that would synchronise), so a bad one gives wrong rows, never an access out
  // of bounds.
  RATT_HD int64_t doc_begin(int64_t b) const {
    const int64_t x = cu_seqlens[b];
    return x < 0 ? 0 : (x > dims.seqlen ? dims.seqlen : x);
  }
  RATT_HD int64_t doc_end(int64_t b) const {
    const int64_t lo = doc_begin(b), x = cu_seqlens[b + 1];
    return x < lo ? lo : (x > dims.seqlen ? dims.seqlen : x);
  }
  // First row of sequence b in the row dimension of q (and of k/v: seq_start_k).
  RATT_HD int64_t seq_start_q(int64_t b) const { return packed() ? doc_begin(b) : 0; }
  RATT_HD int64_t seq_start_k(int64_t b) const { return packed() ? doc_begin(b) : 0; }
  RATT_HD int64_t seqlen_q(int64_t b) const {
    return packed() ? doc_end(b) - doc_begin(b) : dims.seqlen;
  }
  RATT_HD int64_t seqlen_k(int64_t b) const {
    return packed() ? doc_end(b) - doc_begin(b) : dims.seqlen_k;
  }
  // k/v rows before q's first token: q row t is the token at k/v row t + halo(b).
  RATT_HD int64_t halo(int64_t b) const { return seqlen_k(b) - seqlen_q(b); }
  // Largest seqlen_q over the sequences (host only when packed; O(N)).
  int64_t max_seqlen_q() const {
    if (!packed()) return dims.seqlen;
    int64_t m = 0;
    for (int64_t b = 0; b < dims.batch; ++b) m = seqlen_q(b) > m ? seqlen_q(b) : m;
    return m;
  }
  // Flat row of token t (k/v row s) of sequence b in a contiguous q-shaped ([B*T | total,
  // Hq, D]) or k-shaped tensor: its element offset is (row * H + h) * D.
  RATT_HD int64_t q_row(int64_t b, int64_t t) const {
    return packed() ? doc_begin(b) + t : b * dims.seqlen + t;
  }
  RATT_HD int64_t k_row(int64_t b, int64_t s) const {
    return packed() ? doc_begin(b) + s : b * dims.seqlen_k + s;
  }
  // Element offset of (sequence b, row t, head h) in a strided q-shaped / k-shaped tensor
  // (strides with .b == 0 when packed).
  RATT_HD int64_t q_offset(const Strides4& st, int64_t b, int64_t t, int64_t h) const {
    return b * st.b + (seq_start_q(b) + t) * st.t + h * st.h;
  }
  RATT_HD int64_t k_offset(const Strides4& st, int64_t b, int64_t s, int64_t h) const {
    return b * st.b + (seq_start_k(b) + s) * st.t + h * st.h;
  }
  // Index of (sequence b, query head h, row t) in lse-shaped tensors ([B, Hq, T] dense,
  // [Hq, total] packed).
  RATT_HD int64_t lse_index(int64_t b, int64_t h, int64_t t) const {
    return packed() ? h * dims.seqlen + doc_begin(b) + t
                    : (b * dims.heads_q + h) * dims.seqlen + t;
  }

  // Packed work lists of the CUDA kernels: the tiles of `rows` rows of every document in one
  // grid dimension, document b's first tile at slot cu[b] / rows + b. The same O(1) rule as
  // the RLA checkpoints (RlaCheckpointLayout): documents never overlap (the next one starts
  // at least ceil(len_b / rows) slots later) and there are at most total / rows + N slots, so
  // a short document costs its own tiles, never the longest document's. A slot past its
  // document's last tile (at most one per document) has no work.
  RATT_HD static int64_t packed_tile_slots(int64_t total, int64_t n_seqs, int64_t rows) {
    return total / rows + n_seqs;
  }
  RATT_HD int64_t tile_slot0(int64_t b, int64_t rows) const { return doc_begin(b) / rows + b; }
  // The document whose tiles hold `slot`: the last b with tile_slot0(b) <= slot (O(log N)).
  RATT_HD int64_t seq_of_tile_slot(int64_t slot, int64_t rows) const {
    int64_t lo = 0, hi = dims.batch - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (tile_slot0(mid, rows) <= slot) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }
  // The document holding packed row r: the last b with doc_begin(b) <= r (O(log N)).
  RATT_HD int64_t seq_of_row(int64_t r) const {
    int64_t lo = 0, hi = dims.batch - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (doc_begin(mid) <= r) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }
};

// Mixing fused into the SWA forward's epilogue (CUDA; op swa_mix_fwd). Off when out ==
// nullptr. The epilogue owns whole rows of o_swa, so it can finish the RAttention output
//   out = rms(o_swa) * swa_weight + rms(o_rla) * rla_weight
// without o_swa making a round trip through memory.
struct MixEpilogueParams {
  const void* o_rla;         // acc type [B, T, Hq, D], strides o_rla_stride
  Strides4 o_rla_stride;
  const void* swa_weight;    // acc type [Hq, D] contiguous
  const void* rla_weight;    // acc type [Hq, D] contiguous
  void* out;                 // out_dtype [B, T, Hq, D], strides out_stride; nullptr: no mixing
  Strides4 out_stride;
  DType out_dtype;
  double eps;
};

struct SwaFwdParams : QkvParams {
  void* out;  // q-shaped, acc type, strides out_stride (CUDA: nullptr = not written)
  Strides4 out_stride;
  void* lse;  // lse-shaped, acc type, contiguous (CUDA: nullptr = not written)
  const void* rotary_cos;  // nullptr: no rotary
  const void* rotary_sin;
  int64_t window_size;
  double softmax_scale;
  MixEpilogueParams mix;      // fused mixing (CUDA); mix.out == nullptr: off
};

struct SwaBwdParams : QkvParams {
  const void* out;  // acc type, q-shaped
  Strides4 out_stride;
  const void* grad_out;  // acc type, q-shaped
  Strides4 grad_out_stride;
  const void* lse;       // acc type, lse-shaped
  const void* grad_lse;  // acc type, lse-shaped, or nullptr
  void* grad_q;          // dtype, q-shaped, contiguous
  void* grad_k;          // dtype, k-shaped, contiguous
  void* grad_v;          // dtype, k-shaped, contiguous
  const void* rotary_cos;
  const void* rotary_sin;
  int64_t window_size;
  double softmax_scale;
  bool deterministic;
};

// RLA state checkpoints: the state (carried state included) at the start of every
// `checkpoint_every`-th chunk of each sequence. Dense: n slots of [2D, D] per (b, kv head),
// n = ceil(T / (C * every)). Packed: total / (C * every) + N slots per kv head; document b's
// checkpoints start at slot cu[b] / (C * every) + b (an O(1) rule that never overlaps:
// the next document starts at least ceil(len_b / (C * every)) slots later). The tensor is
// [B (1 packed), Hkv, slots * 2D, D] (op_common.cpp checkpoint_shape says why).
struct RlaCheckpointLayout {
  RATT_HD static int64_t per_seq(int64_t T, int64_t chunk, int64_t every) {
    return (T + chunk * every - 1) / (chunk * every);
  }
  RATT_HD static int64_t packed_slots(int64_t total, int64_t n_seqs, int64_t chunk,
                                      int64_t every) {
    return total / (chunk * every) + n_seqs;
  }
};

// What the RLA forward and backward share: the chunking and where checkpoints live.
struct RlaCommonParams : QkvParams {
  FeatureMap feature_map;
  int64_t window_size;
  int64_t chunk_size;        // C
  int64_t checkpoint_every;  // save the state every this many chunks
  // CUDA only: the device's opt-in dynamic shared memory per block (bytes), from which the
  // kernels' configuration is chosen (cuda/rla_plan.h with_rla_traits); 0: no limit (the
  // fastest configuration, as on an H100 / H200).
  int64_t max_smem_per_block = 0;

  // First checkpoint slot of sequence b, and the slots per (kv head) row of the buffer.
  RATT_HD int64_t ckpt_slot0(int64_t b) const {
    return packed() ? doc_begin(b) / (chunk_size * checkpoint_every) + b : 0;
  }
  RATT_HD int64_t ckpt_slots() const {
    return packed() ? RlaCheckpointLayout::packed_slots(dims.seqlen, dims.batch, chunk_size,
                                                        checkpoint_every)
                    : RlaCheckpointLayout::per_seq(dims.seqlen, chunk_size, checkpoint_every);
  }
  // Index (in states of 2D x D) of checkpoint i of (sequence b, kv head g).
  RATT_HD int64_t ckpt_index(int64_t b, int64_t g, int64_t i) const {
    return packed() ? g * ckpt_slots() + ckpt_slot0(b) + i
                    : (b * dims.heads_kv + g) * ckpt_slots() + i;
  }
};

struct RlaFwdParams : RlaCommonParams {
  void* out;  // acc type, q-shaped, strides out_stride
  Strides4 out_stride;
  const void* initial_state;    // acc type [B or 1, Hq, 2D, D] or nullptr
  int64_t initial_state_bstride;  // 0 when broadcast over batch
  const void* carried_state;    // acc type [B, Hkv, 2D, D] or nullptr (= 0)
  void* final_state;            // acc type [B, Hkv, 2D, D]
  void* checkpoints;            // acc type, RlaCheckpointLayout
};

struct RlaBwdParams : RlaCommonParams {
  const void* grad_out;  // acc type, q-shaped
  Strides4 grad_out_stride;
  const void* initial_state;  // as in RlaFwdParams
  int64_t initial_state_bstride;
  const void* checkpoints;       // from the forward (carried state included)
  const void* grad_final_state;  // acc type [B, Hkv, 2D, D] or nullptr
  void* grad_q;                  // dtype, q-shaped, contiguous
  void* grad_k;                  // dtype, k-shaped, contiguous
  void* grad_v;                  // dtype, k-shaped, contiguous
  void* grad_initial_state;      // acc type [B, Hq, 2D, D] contiguous or nullptr
  void* grad_carried_state;      // acc type [B, Hkv, 2D, D] contiguous or nullptr
};

struct MixParams {
  int64_t rows;      // B * T * Hq or total * Hq (rows of D values)
  int64_t heads_q;   // Hq: row r uses weight row r % Hq
  int64_t head_dim;  // D
  DType acc_dtype;   // of o_swa, o_rla, weights (kFloat32 or kFloat64)
  DType out_dtype;
  const void* o_swa;  // [rows, D] contiguous
  const void* o_rla;
  const void* swa_weight;  // [Hq, D]
  const void* rla_weight;
  void* out;  // [rows, D] out_dtype
  double eps;
};

struct MixBwdParams {
  int64_t rows, heads_q, head_dim;
  DType acc_dtype;
  DType grad_dtype;        // of grad_out
  const void* grad_out;    // [rows, D]
  const void* o_swa;
  const void* o_rla;
  const void* swa_weight;
  const void* rla_weight;
  void* grad_o_swa;        // acc [rows, D]
  void* grad_o_rla;        // acc [rows, D]
  void* grad_swa_weight;   // acc [Hq, D]
  void* grad_rla_weight;   // acc [Hq, D]
  double eps;
};

// One decode step for a batch; every sequence at its own position pos[b].
struct DecodeParams {
  int64_t batch, heads_q, heads_kv, head_dim;
  DType dtype;  // of q, k, v, caches, out
  FeatureMap feature_map;
  const void* q;  // [B, Hq, D] (strides q_stride: b, h)
  const void* k;  // [B, Hkv, D]
  const void* v;
  int64_t q_bstride, q_hstride, k_bstride, k_hstride, v_bstride, v_hstride;
  void* k_cache;  // [B, w+1, Hkv, D] contiguous
  void* v_cache;
  void* state;     // acc [B, Hkv, 2D, D] contiguous
  int64_t* pos;    // [B]
  const void* initial_state;  // acc [B or 1, Hq, 2D, D] or nullptr
  int64_t initial_state_bstride;
  const void* rotary_cos;  // acc [P, D/2] or nullptr, read at row pos[b]
  const void* rotary_sin;
  int64_t rotary_positions;  // P
  const void* swa_weight;  // acc [Hq, D]
  const void* rla_weight;
  void* out;  // [B, Hq, D] dtype, contiguous
  int64_t window_size;
  double softmax_scale;
  double eps;
  // The CTA count the CUDA decode aims at when it splits a (sequence, kv head) across CTAs
  // (the device's SM count); 0: the plan's default (cuda/decode_plan.h).
  int64_t target_ctas;
};

}  // namespace rattention
