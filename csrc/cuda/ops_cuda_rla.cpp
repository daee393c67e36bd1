// CUDA implementations of rla_fwd, rla_bwd, mix_fwd, mix_bwd and decode_step: validate and
// fill params (op_common, cuda_backend = true), launch on the current stream, check the launch.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/decode_launch.h"
#include "cuda/mix_launch.h"
#include "cuda/ops_cuda_common.h"
#include "cuda/rla_launch.h"
#include "op_common.h"
#include "op_guard.h"

namespace rattention {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_cuda_chunk(int64_t chunk_size) {
  TORCH_CHECK_VALUE(chunk_size == cuda::kRlaChunk, "chunk_size: the CUDA RLA kernels use chunk_size=",
                    cuda::kRlaChunk, ", got ", chunk_size);
}

void check_cuda_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rla_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_size,
    c10::string_view feature_map, const c10::optional<at::Tensor>& initial_state,
    int64_t chunk_size, int64_t checkpoint_every, const c10::optional<at::Tensor>& cu_seqlens,
    const c10::optional<at::Tensor>& carried_state) {
  check_cuda_chunk(chunk_size);
  const c10::cuda::CUDAGuard guard(q.device());
  auto r = prepare_rla_fwd(q, k, v, window_size, std::string(feature_map), initial_state,
                           chunk_size, checkpoint_every, /*cuda_backend=*/true, cu_seqlens,
                           carried_state);
  if (!r.run_kernel) return {r.out, r.final_state, r.checkpoints};  // empty inputs
  // the kernels' configuration follows this GPU's shared memory per block (rla_plan.h)
  r.params.max_smem_per_block = device_smem_per_block();
  check_smem_fits(cuda::rla_fwd_smem_bytes(r.params), "rla_fwd", r.params.dims.head_dim);
  // the segment parts (and so the workspace) are sized for this GPU's SMs
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t ws_floats = cuda::rla_fwd_workspace_floats(r.params, num_sms);
  at::Tensor ws = at::empty({ws_floats}, q.options().dtype(at::kFloat));
  check_launch(cuda::rla_fwd(r.params, num_sms, ws_floats > 0 ? ws.data_ptr<float>() : nullptr,
                             at::cuda::getCurrentCUDAStream()),
               "rla_fwd");
  return {r.out, r.final_state, r.checkpoints};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rla_bwd_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& initial_state, const at::Tensor& checkpoints,
    int64_t window_size, c10::string_view feature_map, int64_t chunk_size,
    int64_t checkpoint_every, const c10::optional<at::Tensor>& cu_seqlens,
    const c10::optional<at::Tensor>& carried_state) {
  check_cuda_chunk(chunk_size);
  const c10::cuda::CUDAGuard guard(q.device());
  auto r = prepare_rla_bwd(grad_out, grad_final_state, q, k, v, initial_state, checkpoints,
                           window_size, std::string(feature_map), chunk_size, checkpoint_every,
                           /*cuda_backend=*/true, cu_seqlens, carried_state);
  if (!r.run_kernel)
    return {r.grad_q, r.grad_k, r.grad_v, reduce_grad_initial_state(r.grad_h0, initial_state),
            r.grad_carried};
  // the kernels' configuration follows this GPU's shared memory per block (rla_plan.h)
  r.params.max_smem_per_block = device_smem_per_block();
  check_smem_fits(cuda::rla_bwd_smem_bytes(r.params), "rla_bwd", r.params.dims.head_dim);
  // the dk/dv segments (and so the workspace) are sized for this GPU's SMs; the workspace is
  // one sub-batch's (kRlaTemporariesCapBytes), the launches reuse it in turn
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  at::Tensor ws = at::empty({cuda::rla_bwd_workspace_floats(r.params, num_sms)},
                            q.options().dtype(at::kFloat));
  check_launch(cuda::rla_bwd(r.params, num_sms, ws.data_ptr<float>(),
                             at::cuda::getCurrentCUDAStream()),
               "rla_bwd");
  return {r.grad_q, r.grad_k, r.grad_v, reduce_grad_initial_state(r.grad_h0, initial_state),
          r.grad_carried};
}

at::Tensor mix_fwd_cuda(const at::Tensor& o_swa, const at::Tensor& o_rla,
                        const at::Tensor& swa_weight, const at::Tensor& rla_weight, double eps,
                        at::ScalarType out_dtype) {
  check_cuda_tensor(o_swa, "o_swa");
  TORCH_CHECK(o_swa.scalar_type() == at::kFloat,
              "o_swa: the CUDA mixing kernels take float32 branch outputs, got ", o_swa.scalar_type());
  // other ranks: prepare_mix_* names the expected shapes
  TORCH_CHECK_VALUE(o_swa.dim() < 3 || o_swa.size(-1) <= cuda::kMixMaxHeadDim,
                    "o_swa: the CUDA mixing kernels support head dim <= ", cuda::kMixMaxHeadDim);
  const c10::cuda::CUDAGuard guard(o_swa.device());
  auto r = prepare_mix_fwd(o_swa, o_rla, swa_weight, rla_weight, eps, out_dtype);
  if (!r.run_kernel) return r.out;
  check_launch(cuda::mix_fwd(r.params, at::cuda::getCurrentCUDAStream()), "mix_fwd");
  return r.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mix_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& o_swa, const at::Tensor& o_rla,
    const at::Tensor& swa_weight, const at::Tensor& rla_weight, double eps) {
  check_cuda_tensor(o_swa, "o_swa");
  TORCH_CHECK(o_swa.scalar_type() == at::kFloat,
              "o_swa: the CUDA mixing kernels take float32 branch outputs, got ", o_swa.scalar_type());
  // other ranks: prepare_mix_* names the expected shapes
  TORCH_CHECK_VALUE(o_swa.dim() < 3 || o_swa.size(-1) <= cuda::kMixMaxHeadDim,
                    "o_swa: the CUDA mixing kernels support head dim <= ", cuda::kMixMaxHeadDim);
  const c10::cuda::CUDAGuard guard(o_swa.device());
  auto r = prepare_mix_bwd(grad_out, o_swa, o_rla, swa_weight, rla_weight, eps);
  if (!r.run_kernel) return {r.grad_o_swa, r.grad_o_rla, r.grad_swa_weight, r.grad_rla_weight};
  at::Tensor ws = at::empty({cuda::mix_bwd_workspace_floats(r.params)},
                            o_swa.options().dtype(at::kFloat));
  check_launch(cuda::mix_bwd(r.params, ws.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
               "mix_bwd");
  return {r.grad_o_swa, r.grad_o_rla, r.grad_swa_weight, r.grad_rla_weight};
}

at::Tensor decode_step_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& state,
                            at::Tensor& pos, c10::string_view feature_map, double softmax_scale,
                            const c10::optional<at::Tensor>& initial_state,
                            const c10::optional<at::Tensor>& rotary_cos,
                            const c10::optional<at::Tensor>& rotary_sin,
                            const at::Tensor& swa_weight, const at::Tensor& rla_weight,
                            double eps) {
  const c10::cuda::CUDAGuard guard(q.device());
  auto r = prepare_decode_step(q, k, v, k_cache, v_cache, state, pos, std::string(feature_map),
                               softmax_scale, initial_state, rotary_cos, rotary_sin, swa_weight,
                               rla_weight, eps, /*cuda_backend=*/true);
  // No position check on the host (it would synchronise): the kernel writes NaN outputs for
  // a sequence whose position is past the rotary table.
  if (!r.run_kernel) return r.out;
  // the split across CTAs aims at one wave of the device (properties are cached: no sync)
  r.params.target_ctas = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  check_smem_fits(cuda::decode_smem_bytes(r.params), "decode_step", r.params.head_dim);
  // from the caching allocator on the current stream: capturable in a CUDA graph
  at::Tensor ws = at::empty({cuda::decode_workspace_bytes(r.params)}, q.options().dtype(at::kByte));
  check_launch(cuda::decode_step(r.params, ws.data_ptr(), at::cuda::getCurrentCUDAStream()),
               "decode_step");
  return r.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rattention_ext, CUDA, m) {
  m.impl("rla_fwd", RATT_GUARDED(rla_fwd_cuda));
  m.impl("rla_bwd", RATT_GUARDED(rla_bwd_cuda));
  m.impl("mix_fwd", RATT_GUARDED(mix_fwd_cuda));
  m.impl("mix_bwd", RATT_GUARDED(mix_bwd_cuda));
  m.impl("decode_step", RATT_GUARDED(decode_step_cuda));
}

}  // namespace rattention
