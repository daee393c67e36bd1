// CUDA implementations of swa_fwd: validate + fill params (op_common), make the rows the
// kernel reads 16-byte aligned (cp.async), launch on the current stream, check the launch.
// swa_bwd has no CUDA kernel yet (see csrc/cuda/README.md): it is not registered for CUDA,
// so the dispatcher reports that clearly instead of running a stub.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/swa_launch.h"
#include "op_common.h"

namespace rattention {
namespace {

// cp.async moves 16 B: the base pointer and every row start must be 16-byte aligned.
bool rows_aligned16(const void* ptr, const Strides4& s, int64_t elem_size) {
  auto ok = [&](int64_t stride) { return (stride * elem_size) % 16 == 0; };
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && ok(s.b) && ok(s.t) && ok(s.h);
}

std::tuple<at::Tensor, at::Tensor> swa_fwd_cuda_op(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, int64_t window_size,
                                                   double softmax_scale,
                                                   const c10::optional<at::Tensor>& rotary_cos,
                                                   const c10::optional<at::Tensor>& rotary_sin) {
  const c10::cuda::CUDAGuard guard(q.device());
  auto r = prepare_swa_fwd(q, k, v, window_size, softmax_scale, rotary_cos, rotary_sin, true);
  auto& p = r.params;
  const int64_t es = q.element_size();
  // Misaligned views (e.g. a slice at an odd offset) are copied once.
  if (!rows_aligned16(p.q, p.q_stride, es) || !rows_aligned16(p.k, p.k_stride, es) ||
      !rows_aligned16(p.v, p.v_stride, es)) {
    auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    r = prepare_swa_fwd(qc, kc, vc, window_size, softmax_scale, rotary_cos, rotary_sin, true);
    r.keep.push_back(qc);
    r.keep.push_back(kc);
    r.keep.push_back(vc);
  }
  const cudaError_t err = swa_fwd_cuda(r.params, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "swa_fwd: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return {r.out, r.lse};
}

}  // namespace
}  // namespace rattention

TORCH_LIBRARY_IMPL(rattention_ext, CUDA, m) {
  m.impl("swa_fwd", &rattention::swa_fwd_cuda_op);
}
