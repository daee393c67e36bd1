// Backend-independent half of every op: validate the tensors (errors name the argument
// and the expected value), allocate outputs on the inputs' device, fill the params struct.
// ops_cpu.cpp and cuda/ops_cuda.cpp then only call their kernel with the params.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

#include "core/params.h"

namespace rattention {

// Accumulation dtype of an input dtype (float64 -> float64, otherwise float32).
at::ScalarType acc_scalar_type(at::ScalarType t);
DType to_dtype(at::ScalarType t);
FeatureMap parse_feature_map(const std::string& name);

// Validated q/k/v: dims and the dtype. `allow_*` say which dtypes the backend supports.
struct QkvInfo {
  AttnDims dims;
  at::ScalarType dtype;
};
QkvInfo check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  bool cuda_backend);
void check_window(int64_t window_size);
// Windows at or beyond the sequence behave exactly like window = T (every earlier key is in
// the window, none in the RLA state); kernels get the clamped value so no index arithmetic
// on the window can overflow (e.g. window_size = 2^63 - 1).
int64_t clamp_window(int64_t window_size, int64_t seqlen);
// softmax_scale must be finite and > 0; norm_eps must be finite and > 0.
void check_softmax_scale(double softmax_scale);
void check_norm_eps(double eps);

// The one place q/k/v become a QkvParams: validates q, k, v and cu_seqlens (dense: 4-D,
// k/v may hold 0 <= halo <= window_size + 1 rows more than q; packed: 3-D [total, H, D]
// with an int32 cu_seqlens [N+1] on q's device), makes rows contiguous where needed and
// fills pointers, strides, sizes and cu_seqlens. Value checks of cu_seqlens (starts at 0,
// non-decreasing, last == total) need its data on the host: they run for CPU tensors; for
// CUDA tensors only dtype / device / shape are checked here (no device sync per op) and the
// kernels clamp every document to [0, total).
struct QkvPrepared {
  QkvParams params;
  at::Tensor q, k, v;      // what params point into (inputs or row-contiguous copies)
  at::Tensor cu_seqlens;   // undefined when dense
  at::ScalarType dtype;    // of q, k, v
  int64_t max_seqlen_k;    // longest sequence of k/v rows (host-known; CUDA packed: total)
  bool packed() const { return cu_seqlens.defined(); }
  std::vector<int64_t> lse_shape() const;  // [B, Hq, T] or [Hq, total]
};
QkvPrepared prepare_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const c10::optional<at::Tensor>& cu_seqlens, int64_t window_size,
                        bool cuda_backend);

// Rotary tables: both or neither, [P >= T, D/2]; returned as contiguous acc-type tensors.
std::tuple<at::Tensor, at::Tensor> prepare_rotary(const c10::optional<at::Tensor>& cos,
                                                  const c10::optional<at::Tensor>& sin,
                                                  int64_t min_positions, int64_t head_dim,
                                                  const at::Tensor& like);
// H0: [B or 1, Hq, 2D, D]; returned contiguous in acc type (undefined if absent).
at::Tensor prepare_initial_state(const c10::optional<at::Tensor>& h0, const AttnDims& d,
                                 const at::Tensor& like);

struct SwaFwdPrepared {
  SwaFwdParams params;
  at::Tensor out, lse, cos, sin;
  std::vector<at::Tensor> keep;  // inputs/copies the params point into
  bool run_kernel = true;  // false: empty inputs, the outputs are already final
};
SwaFwdPrepared prepare_swa_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               int64_t window_size, double softmax_scale,
                               const c10::optional<at::Tensor>& rotary_cos,
                               const c10::optional<at::Tensor>& rotary_sin, bool cuda_backend,
                               const c10::optional<at::Tensor>& cu_seqlens = c10::nullopt);

// SWA forward with the mixing fused into its epilogue (op swa_mix_fwd). `swa` carries the
// SWA params with `mix` filled for the CUDA epilogue; `mix` is the same mixing as separate
// MixParams over swa.out, for backends that run the two steps one after the other (CPU).
// With save_branch false on CUDA, o_swa and lse are not written (swa.out/lse empty).
struct SwaMixFwdPrepared {
  SwaFwdPrepared swa;
  MixParams mix;
  at::Tensor out;
  std::vector<at::Tensor> keep;
};
SwaMixFwdPrepared prepare_swa_mix_fwd(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, int64_t window_size,
                                      double softmax_scale,
                                      const c10::optional<at::Tensor>& rotary_cos,
                                      const c10::optional<at::Tensor>& rotary_sin,
                                      const at::Tensor& o_rla, const at::Tensor& swa_weight,
                                      const at::Tensor& rla_weight, double eps,
                                      at::ScalarType out_dtype, bool save_branch,
                                      bool cuda_backend,
                                      const c10::optional<at::Tensor>& cu_seqlens = c10::nullopt);

struct SwaBwdPrepared {
  SwaBwdParams params;
  at::Tensor grad_q, grad_k, grad_v;
  std::vector<at::Tensor> keep;  // inputs/copies the params point into
  bool run_kernel = true;  // false: empty inputs, the outputs are already final
};
SwaBwdPrepared prepare_swa_bwd(const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse,
                               const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& out, const at::Tensor& lse, int64_t window_size,
                               double softmax_scale, const c10::optional<at::Tensor>& rotary_cos,
                               const c10::optional<at::Tensor>& rotary_sin, bool deterministic,
                               bool cuda_backend,
                               const c10::optional<at::Tensor>& cu_seqlens = c10::nullopt);

struct RlaFwdPrepared {
  RlaFwdParams params;
  at::Tensor out, final_state, checkpoints, h0, carried;
  std::vector<at::Tensor> keep;  // inputs/copies the params point into
  bool run_kernel = true;  // false: empty inputs, the outputs are already final
};
RlaFwdPrepared prepare_rla_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               int64_t window_size, const std::string& feature_map,
                               const c10::optional<at::Tensor>& initial_state, int64_t chunk_size,
                               int64_t checkpoint_every, bool cuda_backend,
                               const c10::optional<at::Tensor>& cu_seqlens = c10::nullopt,
                               const c10::optional<at::Tensor>& carried_state = c10::nullopt);

struct RlaBwdPrepared {
  RlaBwdParams params;
  at::Tensor grad_q, grad_k, grad_v, grad_h0, grad_carried;  // empty [0] when absent
  std::vector<at::Tensor> keep;  // inputs/copies the params point into
  bool run_kernel = true;  // false: empty inputs, the outputs are already final
};
RlaBwdPrepared prepare_rla_bwd(const at::Tensor& grad_out,
                               const c10::optional<at::Tensor>& grad_final_state,
                               const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const c10::optional<at::Tensor>& initial_state,
                               const at::Tensor& checkpoints, int64_t window_size,
                               const std::string& feature_map, int64_t chunk_size,
                               int64_t checkpoint_every, bool cuda_backend,
                               const c10::optional<at::Tensor>& cu_seqlens = c10::nullopt,
                               const c10::optional<at::Tensor>& carried_state = c10::nullopt);
// The H0 gradient as the op returns it: the kernels write one per sequence; a broadcast H0
// ([1, ...]) gets their sum.
at::Tensor reduce_grad_initial_state(const at::Tensor& grad_h0,
                                     const c10::optional<at::Tensor>& initial_state);

struct MixPrepared {
  MixParams params;
  at::Tensor out;
  std::vector<at::Tensor> keep;  // inputs/copies the params point into
  bool run_kernel = true;  // false: empty inputs, the outputs are already final
};
MixPrepared prepare_mix_fwd(const at::Tensor& o_swa, const at::Tensor& o_rla,
                            const at::Tensor& swa_weight, const at::Tensor& rla_weight, double eps,
                            at::ScalarType out_dtype);

struct MixBwdPrepared {
  MixBwdParams params;
  at::Tensor grad_o_swa, grad_o_rla, grad_swa_weight, grad_rla_weight;
  std::vector<at::Tensor> keep;  // inputs/copies the params point into
  bool run_kernel = true;  // false: empty inputs, the outputs are already final
};
MixBwdPrepared prepare_mix_bwd(const at::Tensor& grad_out, const at::Tensor& o_swa,
                               const at::Tensor& o_rla, const at::Tensor& swa_weight,
                               const at::Tensor& rla_weight, double eps);

struct DecodePrepared {
  DecodeParams params;
  at::Tensor out;
  std::vector<at::Tensor> keep;  // inputs/copies the params point into
  bool run_kernel = true;  // false: empty inputs, the outputs are already final
};
DecodePrepared prepare_decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& state, const at::Tensor& pos,
                                   const std::string& feature_map, double softmax_scale,
                                   const c10::optional<at::Tensor>& initial_state,
                                   const c10::optional<at::Tensor>& rotary_cos,
                                   const c10::optional<at::Tensor>& rotary_sin,
                                   const at::Tensor& swa_weight, const at::Tensor& rla_weight,
                                   double eps, bool cuda_backend);

}  // namespace rattention
