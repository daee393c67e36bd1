// Parameter structs: everything a kernel needs, filled by the op layer from tensors.
// Kernels (CPU and CUDA) take these and never see an at::Tensor. Data pointers are
// `void*` of the storage dtype `dtype`; strides are in elements; all int64.
//
// Layouts (user-facing, flash-attn convention):
//   q, o, grad_o           [B, T, Hq, D]   (any strides)
//   k, v                   [B, T, Hkv, D]  (any strides)
//   lse                    [B, Hq, T]      contiguous, acc type
//   rotary_cos/sin         [P, D/2]        contiguous, acc type, P >= T (row t for token t)
//   RLA states             [B, Hkv, 2D, D] contiguous, acc type
//   initial_state (H0)     [B or 1, Hq, 2D, D] contiguous, acc type (batch stride 0 if 1)
// "acc type" = float64 for float64 inputs, float32 otherwise. SWA/RLA branch outputs and
// their gradients that the mixing consumes are in acc type as well.
//
// Variable length (planned): when cu_seqlens != nullptr the batch is packed, B == 1, and
// sequence i is rows [cu_seqlens[i], cu_seqlens[i+1]); windows and RLA states restart at
// each sequence start. Not implemented yet: the op layer rejects it.
#pragma once
#include <cstdint>

#include "dtype.h"
#include "feature_map.h"

namespace rattention {

struct Strides4 {
  int64_t b, t, h, d;
};

struct AttnDims {
  int64_t batch;     // B
  int64_t seqlen;    // T
  int64_t heads_q;   // Hq
  int64_t heads_kv;  // Hkv
  int64_t head_dim;  // D
  int64_t group() const { return heads_q / heads_kv; }
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

struct SwaFwdParams {
  AttnDims dims;
  DType dtype;  // of q, k, v
  const void* q;
  const void* k;
  const void* v;
  Strides4 q_stride, k_stride, v_stride;
  void* out;  // [B, T, Hq, D] acc type, strides out_stride (CUDA: nullptr = not written)
  Strides4 out_stride;
  void* lse;  // [B, Hq, T] acc type, contiguous (CUDA: nullptr = not written)
  const void* rotary_cos;  // nullptr: no rotary
  const void* rotary_sin;
  int64_t window_size;
  double softmax_scale;
  const int64_t* cu_seqlens;  // planned varlen; nullptr
  MixEpilogueParams mix;      // fused mixing (CUDA); mix.out == nullptr: off
};

struct SwaBwdParams {
  AttnDims dims;
  DType dtype;
  const void* q;
  const void* k;
  const void* v;
  Strides4 q_stride, k_stride, v_stride;
  const void* out;  // acc type [B, T, Hq, D]
  Strides4 out_stride;
  const void* grad_out;  // acc type [B, T, Hq, D]
  Strides4 grad_out_stride;
  const void* lse;       // acc type [B, Hq, T]
  const void* grad_lse;  // acc type [B, Hq, T] or nullptr
  void* grad_q;          // dtype, [B, T, Hq, D] contiguous
  void* grad_k;          // dtype, [B, T, Hkv, D] contiguous
  void* grad_v;          // dtype, [B, T, Hkv, D] contiguous
  const void* rotary_cos;
  const void* rotary_sin;
  int64_t window_size;
  double softmax_scale;
  bool deterministic;
  const int64_t* cu_seqlens;
};

struct RlaFwdParams {
  AttnDims dims;
  DType dtype;
  FeatureMap feature_map;
  const void* q;
  const void* k;
  const void* v;
  Strides4 q_stride, k_stride, v_stride;
  void* out;  // acc type [B, T, Hq, D], strides out_stride
  Strides4 out_stride;
  const void* initial_state;    // acc type [B or 1, Hq, 2D, D] or nullptr
  int64_t initial_state_bstride;  // 0 when broadcast over batch
  void* final_state;            // acc type [B, Hkv, 2D, D]
  void* checkpoints;            // acc type [B, Hkv, n_checkpoints, 2D, D]: state at chunk starts
  int64_t window_size;
  int64_t chunk_size;        // C
  int64_t checkpoint_every;  // save the state every this many chunks
  const int64_t* cu_seqlens;
};

struct RlaBwdParams {
  AttnDims dims;
  DType dtype;
  FeatureMap feature_map;
  const void* q;
  const void* k;
  const void* v;
  Strides4 q_stride, k_stride, v_stride;
  const void* grad_out;  // acc type [B, T, Hq, D]
  Strides4 grad_out_stride;
  const void* initial_state;  // as in RlaFwdParams
  int64_t initial_state_bstride;
  const void* checkpoints;       // from the forward
  const void* grad_final_state;  // acc type [B, Hkv, 2D, D] or nullptr
  void* grad_q;                  // dtype [B, T, Hq, D] contiguous
  void* grad_k;                  // dtype [B, T, Hkv, D] contiguous
  void* grad_v;                  // dtype [B, T, Hkv, D] contiguous
  void* grad_initial_state;      // acc type [B or 1, Hq, 2D, D] contiguous or nullptr
  int64_t window_size;
  int64_t chunk_size;
  int64_t checkpoint_every;
  const int64_t* cu_seqlens;
};

struct MixParams {
  int64_t rows;      // B * T * Hq (rows of D values)
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
};

}  // namespace rattention
