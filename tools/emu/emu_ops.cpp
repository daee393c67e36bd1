// Python bindings of the emulated CUDA ops (tools/emu): the same validation and params as the
// CUDA op layer (op_common.cpp with cuda_backend = true), then the real launchers of
// csrc/cuda, compiled for the host emulator, on CPU tensors (bfloat16 / float16). Mirrors
// csrc/cuda/ops_cuda_swa.cpp and ops_cuda_rla.cpp minus the device guards and stream lookup.
#include <torch/extension.h>

#include "cuda/decode_launch.h"
#include "cuda/mix_launch.h"
#include "cuda/rla_launch.h"
#include "cuda/swa_launch.h"
#include "op_common.h"

namespace rattention {
namespace {

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": emulated launch failed (", static_cast<int>(err), ")");
}

std::tuple<at::Tensor, at::Tensor> swa_fwd(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, int64_t w, double scale,
                                           c10::optional<at::Tensor> cos,
                                           c10::optional<at::Tensor> sin) {
  auto r = prepare_swa_fwd(q, k, v, w, scale, cos, sin, /*cuda_backend=*/true);
  check(cuda::swa_fwd(r.params, nullptr), "swa_fwd");
  return {r.out, r.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swa_mix_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t w, double scale,
    c10::optional<at::Tensor> cos, c10::optional<at::Tensor> sin, const at::Tensor& o_rla,
    const at::Tensor& ga, const at::Tensor& gb, double eps, at::ScalarType out_dtype, bool save) {
  auto r = prepare_swa_mix_fwd(q, k, v, w, scale, cos, sin, o_rla, ga, gb, eps, out_dtype, save,
                               /*cuda_backend=*/true);
  check(cuda::swa_fwd(r.swa.params, nullptr), "swa_mix_fwd");
  return {r.out, r.swa.out, r.swa.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swa_bwd(
    const at::Tensor& go, c10::optional<at::Tensor> glse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, int64_t w, double scale,
    c10::optional<at::Tensor> cos, c10::optional<at::Tensor> sin) {
  auto r = prepare_swa_bwd(go, glse, q, k, v, out, lse, w, scale, cos, sin, true,
                           /*cuda_backend=*/true);
  at::Tensor ws = at::empty({cuda::swa_bwd_workspace_floats(r.params)}, q.options().dtype(at::kFloat));
  check(cuda::swa_bwd(r.params, ws.data_ptr<float>(), nullptr), "swa_bwd");
  return {r.grad_q, r.grad_k, r.grad_v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rla_fwd(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v, int64_t w,
                                                       const std::string& fm,
                                                       c10::optional<at::Tensor> h0,
                                                       int64_t every) {
  auto r = prepare_rla_fwd(q, k, v, w, fm, h0, cuda::kRlaChunk, every, /*cuda_backend=*/true);
  check(cuda::rla_fwd(r.params, nullptr), "rla_fwd");
  return {r.out, r.final_state, r.checkpoints};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rla_bwd(
    const at::Tensor& go, c10::optional<at::Tensor> gfs, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, c10::optional<at::Tensor> h0, const at::Tensor& ckpt, int64_t w,
    const std::string& fm, int64_t every) {
  auto r = prepare_rla_bwd(go, gfs, q, k, v, h0, ckpt, w, fm, cuda::kRlaChunk, every,
                           /*cuda_backend=*/true);
  at::Tensor ws = at::empty({cuda::rla_bwd_workspace_floats(r.params)}, q.options().dtype(at::kFloat));
  check(cuda::rla_bwd(r.params, ws.data_ptr<float>(), nullptr), "rla_bwd");
  at::Tensor gh0 = r.grad_h0;
  if (gh0.numel() > 0 && h0->size(0) == 1 && gh0.size(0) > 1) gh0 = gh0.sum(0, true);
  return {r.grad_q, r.grad_k, r.grad_v, gh0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mix_bwd(
    const at::Tensor& go, const at::Tensor& a, const at::Tensor& b, const at::Tensor& ga,
    const at::Tensor& gb, double eps) {
  auto r = prepare_mix_bwd(go, a, b, ga, gb, eps);
  at::Tensor ws = at::empty({cuda::mix_bwd_workspace_floats(r.params)}, a.options().dtype(at::kFloat));
  check(cuda::mix_bwd(r.params, ws.data_ptr<float>(), nullptr), "mix_bwd");
  return {r.grad_o_swa, r.grad_o_rla, r.grad_swa_weight, r.grad_rla_weight};
}

at::Tensor decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       at::Tensor k_cache, at::Tensor v_cache, at::Tensor state, at::Tensor pos,
                       const std::string& fm, double scale, c10::optional<at::Tensor> h0,
                       c10::optional<at::Tensor> cos, c10::optional<at::Tensor> sin,
                       const at::Tensor& ga, const at::Tensor& gb, double eps) {
  auto r = prepare_decode_step(q, k, v, k_cache, v_cache, state, pos, fm, scale, h0, cos, sin, ga,
                               gb, eps, /*cuda_backend=*/true);
  check(cuda::decode_step(r.params, nullptr), "decode_step");
  return r.out;
}

}  // namespace
}  // namespace rattention

void add_launch_plan_bindings(pybind11::module& m);  // emu_plan_ops.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rattention_ext CUDA kernels run by the host emulator (tools/emu), CPU tensors";
  m.def("swa_fwd", &rattention::swa_fwd);
  m.def("swa_mix_fwd", &rattention::swa_mix_fwd);
  m.def("swa_bwd", &rattention::swa_bwd);
  m.def("rla_fwd", &rattention::rla_fwd);
  m.def("rla_bwd", &rattention::rla_bwd);
  m.def("mix_bwd", &rattention::mix_bwd);
  m.def("decode_step", &rattention::decode_step);
  add_launch_plan_bindings(m);
}
