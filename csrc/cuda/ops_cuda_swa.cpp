// CUDA implementations of swa_fwd, swa_mix_fwd and swa_bwd: validate and fill params (op_common,
// cuda_backend = true), launch on the current stream, check the launch.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/ops_cuda_common.h"
#include "cuda/swa_launch.h"
#include "op_common.h"
#include "op_guard.h"

namespace rattention {
namespace {

void check_swa_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_cuda_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

std::tuple<at::Tensor, at::Tensor> swa_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, int64_t window_size,
                                                double softmax_scale,
                                                const c10::optional<at::Tensor>& rotary_cos,
                                                const c10::optional<at::Tensor>& rotary_sin,
                                                const c10::optional<at::Tensor>& cu_seqlens) {
  check_cuda_input(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  auto r = prepare_swa_fwd(q, k, v, window_size,
                           softmax_scale, rotary_cos, rotary_sin, /*cuda_backend=*/true,
                           cu_seqlens);
  if (!r.run_kernel) return {r.out, r.lse};  // empty inputs: outputs already final
  check_smem_fits(cuda::swa_fwd_smem_bytes(r.params), "swa_fwd", r.params.dims.head_dim);
  check_swa_launch(cuda::swa_fwd(r.params, at::cuda::getCurrentCUDAStream()), "swa_fwd_kernel");
  return {r.out, r.lse};
}

// SWA forward with the mixing in its epilogue: one kernel reads q/k/v and o_rla and writes
// the RAttention output (plus o_swa and lse when the backward needs them).
std::tuple<at::Tensor, at::Tensor, at::Tensor> swa_mix_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_size,
    double softmax_scale, const c10::optional<at::Tensor>& rotary_cos,
    const c10::optional<at::Tensor>& rotary_sin, const at::Tensor& o_rla,
    const at::Tensor& swa_weight, const at::Tensor& rla_weight, double eps,
    at::ScalarType out_dtype, bool save_for_backward,
    const c10::optional<at::Tensor>& cu_seqlens) {
  check_cuda_input(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  auto r = prepare_swa_mix_fwd(q, k, v,
                               window_size, softmax_scale, rotary_cos, rotary_sin, o_rla,
                               swa_weight, rla_weight, eps, out_dtype, save_for_backward,
                               /*cuda_backend=*/true, cu_seqlens);
  if (!r.swa.run_kernel) return {r.out, r.swa.out, r.swa.lse};
  check_smem_fits(cuda::swa_fwd_smem_bytes(r.swa.params), "swa_mix_fwd",
                  r.swa.params.dims.head_dim);
  check_swa_launch(cuda::swa_fwd(r.swa.params, at::cuda::getCurrentCUDAStream()),
                   "swa_fwd_kernel (fused mixing)");
  return {r.out, r.swa.out, r.swa.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swa_bwd_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    int64_t window_size, double softmax_scale, const c10::optional<at::Tensor>& rotary_cos,
    const c10::optional<at::Tensor>& rotary_sin, bool deterministic,
    const c10::optional<at::Tensor>& cu_seqlens) {
  check_cuda_input(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  // The CUDA backward is deterministic whatever `deterministic` says (no atomics).
  auto r = prepare_swa_bwd(grad_out, grad_lse, q, k,
                           v, out, lse, window_size, softmax_scale, rotary_cos,
                           rotary_sin, deterministic, /*cuda_backend=*/true, cu_seqlens);
  if (!r.run_kernel) return {r.grad_q, r.grad_k, r.grad_v};
  check_smem_fits(cuda::swa_bwd_smem_bytes(r.params), "swa_bwd", r.params.dims.head_dim);
  at::Tensor ws = at::empty({cuda::swa_bwd_workspace_floats(r.params)},
                            q.options().dtype(at::kFloat));
  check_swa_launch(cuda::swa_bwd(r.params, ws.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
                   "swa_bwd (swa_bwd_preprocess_kernel / swa_bwd_dkdv_kernel / swa_bwd_dq_kernel)");
  return {r.grad_q, r.grad_k, r.grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(rattention_ext, CUDA, m) {
  m.impl("swa_fwd", RATT_GUARDED(swa_fwd_cuda));
  m.impl("swa_mix_fwd", RATT_GUARDED(swa_mix_fwd_cuda));
  m.impl("swa_bwd", RATT_GUARDED(swa_bwd_cuda));
}

}  // namespace rattention
