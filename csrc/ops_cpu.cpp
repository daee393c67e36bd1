// CPU implementations of the ops: validate + fill params (op_common), run the kernel.
#include <torch/library.h>

#include "cpu/kernels.h"
#include "op_common.h"
#include "op_guard.h"

namespace rattention {
namespace {

std::tuple<at::Tensor, at::Tensor> swa_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, int64_t window_size,
                                               double softmax_scale,
                                               const c10::optional<at::Tensor>& rotary_cos,
                                               const c10::optional<at::Tensor>& rotary_sin,
                                               const c10::optional<at::Tensor>& cu_seqlens) {
  auto r = prepare_swa_fwd(q, k, v, window_size, softmax_scale, rotary_cos, rotary_sin, false,
                           cu_seqlens);
  if (r.run_kernel) cpu::swa_fwd(r.params);
  return {r.out, r.lse};
}

// The CPU backend runs the two steps one after the other (the mixing is a small share of
// the time here); the CUDA backend fuses them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> swa_mix_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_size,
    double softmax_scale, const c10::optional<at::Tensor>& rotary_cos,
    const c10::optional<at::Tensor>& rotary_sin, const at::Tensor& o_rla,
    const at::Tensor& swa_weight, const at::Tensor& rla_weight, double eps,
    at::ScalarType out_dtype, bool save_for_backward,
    const c10::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK(out_dtype != at::kHalf, "out_dtype float16 is not supported on CPU");
  auto r = prepare_swa_mix_fwd(q, k, v, window_size, softmax_scale, rotary_cos, rotary_sin, o_rla,
                               swa_weight, rla_weight, eps, out_dtype, save_for_backward, false,
                               cu_seqlens);
  if (r.swa.run_kernel) {
    cpu::swa_fwd(r.swa.params);
    cpu::mix_fwd(r.mix);
  }
  if (!save_for_backward) return {r.out, r.swa.out.new_empty({0}), r.swa.lse.new_empty({0})};
  return {r.out, r.swa.out, r.swa.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swa_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    int64_t window_size, double softmax_scale, const c10::optional<at::Tensor>& rotary_cos,
    const c10::optional<at::Tensor>& rotary_sin, bool deterministic,
    const c10::optional<at::Tensor>& cu_seqlens) {
  auto r = prepare_swa_bwd(grad_out, grad_lse, q, k, v, out, lse, window_size, softmax_scale,
                           rotary_cos, rotary_sin, deterministic, false, cu_seqlens);
  if (r.run_kernel) cpu::swa_bwd(r.params);
  return {r.grad_q, r.grad_k, r.grad_v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rla_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_size,
    c10::string_view feature_map, const c10::optional<at::Tensor>& initial_state,
    int64_t chunk_size, int64_t checkpoint_every, const c10::optional<at::Tensor>& cu_seqlens,
    const c10::optional<at::Tensor>& carried_state) {
  auto r = prepare_rla_fwd(q, k, v, window_size, std::string(feature_map), initial_state,
                           chunk_size, checkpoint_every, false, cu_seqlens, carried_state);
  if (r.run_kernel) cpu::rla_fwd(r.params);
  return {r.out, r.final_state, r.checkpoints};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rla_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& initial_state, const at::Tensor& checkpoints,
    int64_t window_size, c10::string_view feature_map, int64_t chunk_size,
    int64_t checkpoint_every, const c10::optional<at::Tensor>& cu_seqlens,
    const c10::optional<at::Tensor>& carried_state) {
  auto r = prepare_rla_bwd(grad_out, grad_final_state, q, k, v, initial_state, checkpoints,
                           window_size, std::string(feature_map), chunk_size, checkpoint_every,
                           false, cu_seqlens, carried_state);
  if (r.run_kernel) cpu::rla_bwd(r.params);
  return {r.grad_q, r.grad_k, r.grad_v, reduce_grad_initial_state(r.grad_h0, initial_state),
          r.grad_carried};
}

at::Tensor mix_fwd_cpu(const at::Tensor& o_swa, const at::Tensor& o_rla,
                       const at::Tensor& swa_weight, const at::Tensor& rla_weight, double eps,
                       at::ScalarType out_dtype) {
  TORCH_CHECK(out_dtype != at::kHalf, "out_dtype float16 is not supported on CPU");
  auto r = prepare_mix_fwd(o_swa, o_rla, swa_weight, rla_weight, eps, out_dtype);
  if (r.run_kernel) cpu::mix_fwd(r.params);
  return r.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mix_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& o_swa, const at::Tensor& o_rla,
    const at::Tensor& swa_weight, const at::Tensor& rla_weight, double eps) {
  TORCH_CHECK(grad_out.scalar_type() != at::kHalf, "grad_out float16 is not supported on CPU");
  auto r = prepare_mix_bwd(grad_out, o_swa, o_rla, swa_weight, rla_weight, eps);
  if (r.run_kernel) cpu::mix_bwd(r.params);
  return {r.grad_o_swa, r.grad_o_rla, r.grad_swa_weight, r.grad_rla_weight};
}

at::Tensor decode_step_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& state,
                           at::Tensor& pos, c10::string_view feature_map, double softmax_scale,
                           const c10::optional<at::Tensor>& initial_state,
                           const c10::optional<at::Tensor>& rotary_cos,
                           const c10::optional<at::Tensor>& rotary_sin,
                           const at::Tensor& swa_weight, const at::Tensor& rla_weight,
                           double eps) {
  auto r = prepare_decode_step(q, k, v, k_cache, v_cache, state, pos, std::string(feature_map),
                               softmax_scale, initial_state, rotary_cos, rotary_sin, swa_weight,
                               rla_weight, eps, false);
  if (r.params.rotary_cos != nullptr && pos.numel() > 0) {
    const int64_t max_pos = pos.max().item<int64_t>();
    TORCH_CHECK_VALUE(max_pos < r.params.rotary_positions, "rotary_cos has ",
                      rotary_cos->size(0), " positions and rotary_sin ", rotary_sin->size(0),
                      ", so ", r.params.rotary_positions,
                      " positions have both, but a sequence is at position ", max_pos);
  }
  if (r.run_kernel) cpu::decode_step(r.params);
  return r.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rattention_ext, CPU, m) {
  m.impl("swa_fwd", RATT_GUARDED(swa_fwd_cpu));
  m.impl("swa_mix_fwd", RATT_GUARDED(swa_mix_fwd_cpu));
  m.impl("swa_bwd", RATT_GUARDED(swa_bwd_cpu));
  m.impl("rla_fwd", RATT_GUARDED(rla_fwd_cpu));
  m.impl("rla_bwd", RATT_GUARDED(rla_bwd_cpu));
  m.impl("mix_fwd", RATT_GUARDED(mix_fwd_cpu));
  m.impl("mix_bwd", RATT_GUARDED(mix_bwd_cpu));
  m.impl("decode_step", RATT_GUARDED(decode_step_cpu));
}

}  // namespace rattention
