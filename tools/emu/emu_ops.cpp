// Python bindings of the emulated CUDA ops (tools/emu): the same validation and params as the
// CUDA op layer (op_common.cpp with cuda_backend = true), then the real launchers of
// csrc/cuda, compiled for the host emulator, on CPU tensors (bfloat16 / float16). Mirrors
// csrc/cuda/ops_cuda_swa.cpp and ops_cuda_rla.cpp minus the device guards and stream lookup.
//
// Every tensor a launch may touch runs in a Sandbox: a copy in its own allocation with red
// zones around it, registered with the memory checks under its name (inputs read-only, outputs
// NaN-filled first: the kernel must write all of them), and every pointer into it inside the
// params redirected to the copy. Any report of the checks turns into a Python exception.
#include <torch/extension.h>

#include <memory>

#include "cuda/decode_launch.h"
#include "cuda/mix_launch.h"
#include "cuda/rla_launch.h"
#include "cuda/swa_launch.h"
#include "emu_internal.h"
#include "op_common.h"
#include "coverage.h"

namespace rattention {
namespace {

enum class Role { kIn, kInOut, kOut };

// The modelled GPU's opt-in dynamic shared memory per block (set_arch), which the RLA ops pass
// to the launchers as the op layer passes the device's.
int64_t emu_smem_per_block() { return static_cast<int64_t>(emu::arch_max_dynamic_smem(emu::arch())); }

class Sandbox {
 public:
  explicit Sandbox(const char* op) : op_(op) {
    emu::clear_buffers();
    emu::take_reports();
  }
  ~Sandbox() { emu::clear_buffers(); }

  // Registers `t` (skipped when undefined or empty) under `name`.
  void add(const std::string& name, const at::Tensor& t, Role role) {
    if (!t.defined() || t.numel() == 0) return;
    char* storage = static_cast<char*>(t.storage().mutable_data());
    const size_t nbytes = t.storage().nbytes();
    Copy* c = nullptr;
    for (auto& x : copies_)
      if (x.orig == storage) c = &x;
    if (c == nullptr) {
      copies_.push_back(Copy{storage, nbytes, std::unique_ptr<char[]>(new char[nbytes + 2 * kRedZone + 256]),
                             nullptr, false});
      c = &copies_.back();
      c->copy = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(c->mem.get()) + kRedZone + 255) &
                                        ~uintptr_t(255));
      std::memcpy(c->copy, storage, nbytes);
    }
    // the bytes the view covers: [lo, hi) relative to its data pointer
    int64_t lo = 0, hi = 0;
    for (int64_t d = 0; d < t.dim(); ++d) {
      const int64_t ext = (t.size(d) - 1) * t.stride(d);
      (ext < 0 ? lo : hi) += ext;
    }
    const int64_t es = t.element_size();
    char* first = c->copy + (static_cast<char*>(t.data_ptr()) - storage) + lo * es;
    const size_t bytes = static_cast<size_t>((hi - lo + 1) * es);
    if (role == Role::kOut) std::memset(first, 0xFF, bytes);  // NaN: the kernel must write it
    if (role != Role::kIn) c->back = true;
    emu::register_buffer(first, bytes, name, role != Role::kIn);
  }

  // A float workspace the launcher gets directly (NaN-filled; launchers memset what they need).
  float* workspace(int64_t floats) {
    at::Tensor ws = at::empty({floats}, at::kFloat);
    add("workspace", ws, Role::kOut);
    keep_.push_back(ws);
    return floats == 0 ? nullptr : reinterpret_cast<float*>(copies_.back().copy);
  }

  // Redirects every pointer into a registered storage inside `params` to the copy.
  template <class P>
  void redirect(P& params) {
    static_assert(std::is_trivially_copyable_v<P>);
    auto* words = reinterpret_cast<uintptr_t*>(&params);
    for (size_t i = 0; i < sizeof(P) / sizeof(uintptr_t); ++i) {
      for (const auto& c : copies_) {
        const uintptr_t o = reinterpret_cast<uintptr_t>(c.orig);
        if (words[i] >= o && words[i] <= o + c.bytes) {
          words[i] = words[i] - o + reinterpret_cast<uintptr_t>(c.copy);
          break;
        }
      }
    }
  }

  // Copies outputs back; throws with the reports of the checks, or on a failed launch.
  void finish(cudaError_t err) {
    for (const auto& c : copies_)
      if (c.back) std::memcpy(c.orig, c.copy, c.bytes);
    emu::clear_buffers();
    const std::vector<std::string> reports = emu::take_reports();
    std::string msg;
    for (size_t i = 0; i < reports.size() && i < 8; ++i) msg += "\n  " + reports[i];
    if (reports.size() > 8) msg += "\n  ... " + std::to_string(reports.size() - 8) + " more";
    TORCH_CHECK(err == cudaSuccess && reports.empty(), op_, ": emulated launch failed (",
                cudaGetErrorString(err), ")", msg);
  }

 private:
  static constexpr size_t kRedZone = 64 * 1024;
  struct Copy {
    char* orig;
    size_t bytes;
    std::unique_ptr<char[]> mem;
    char* copy;
    bool back;
  };
  const char* op_;
  std::vector<Copy> copies_;  // reserve: pointers into it are kept by the checks
  std::vector<at::Tensor> keep_;

 public:
  void reserve(size_t n) { copies_.reserve(n); }
};

// The inputs an op layer keeps for its params, by their position in `keep` (op_common.cpp).
void add_keep(Sandbox& box, const std::vector<at::Tensor>& keep,
              std::initializer_list<const char*> names) {
  size_t i = 0;
  for (const char* n : names) {
    if (i < keep.size()) box.add(n, keep[i], Role::kIn);
    ++i;
  }
  for (; i < keep.size(); ++i) box.add("input " + std::to_string(i), keep[i], Role::kIn);
}

std::tuple<at::Tensor, at::Tensor> swa_fwd(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, int64_t w, double scale,
                                           c10::optional<at::Tensor> cos,
                                           c10::optional<at::Tensor> sin,
                                           c10::optional<at::Tensor> cu_seqlens) {
  auto r = prepare_swa_fwd(q, k, v, w, scale, cos, sin, /*cuda_backend=*/true, cu_seqlens);
  Sandbox box("swa_fwd");
  box.reserve(16);
  add_keep(box, r.keep, {"q", "k", "v", "cu_seqlens"});
  box.add("rotary_cos", r.cos, Role::kIn);
  box.add("rotary_sin", r.sin, Role::kIn);
  box.add("out", r.out, Role::kOut);
  box.add("lse", r.lse, Role::kOut);
  box.redirect(r.params);
  box.finish(cuda::swa_fwd(r.params, nullptr));
  return {r.out, r.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swa_mix_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t w, double scale,
    c10::optional<at::Tensor> cos, c10::optional<at::Tensor> sin, const at::Tensor& o_rla,
    const at::Tensor& ga, const at::Tensor& gb, double eps, at::ScalarType out_dtype, bool save,
    c10::optional<at::Tensor> cu_seqlens) {
  auto r = prepare_swa_mix_fwd(q, k, v, w, scale, cos, sin, o_rla, ga, gb, eps, out_dtype, save,
                               /*cuda_backend=*/true, cu_seqlens);
  Sandbox box("swa_mix_fwd");
  box.reserve(16);
  add_keep(box, r.swa.keep, {"q", "k", "v", "cu_seqlens"});
  box.add("rotary_cos", r.swa.cos, Role::kIn);
  box.add("rotary_sin", r.swa.sin, Role::kIn);
  box.add("o_rla", o_rla, Role::kIn);
  add_keep(box, r.keep, {"o_swa", "o_rla", "swa_weight", "rla_weight"});
  box.add("out", r.out, Role::kOut);
  box.add("o_swa", r.swa.out, Role::kOut);
  box.add("lse", r.swa.lse, Role::kOut);
  box.redirect(r.swa.params);
  box.finish(cuda::swa_fwd(r.swa.params, nullptr));
  return {r.out, r.swa.out, r.swa.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swa_bwd(
    const at::Tensor& go, c10::optional<at::Tensor> glse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, int64_t w, double scale,
    c10::optional<at::Tensor> cos, c10::optional<at::Tensor> sin,
    c10::optional<at::Tensor> cu_seqlens) {
  auto r = prepare_swa_bwd(go, glse, q, k, v, out, lse, w, scale, cos, sin, true,
                           /*cuda_backend=*/true, cu_seqlens);
  Sandbox box("swa_bwd");
  box.reserve(16);
  add_keep(box, r.keep, {"q", "k", "v", "cu_seqlens", "grad_out", "out", "lse", "grad_lse",
                         "rotary_cos", "rotary_sin"});
  box.add("grad_q", r.grad_q, Role::kOut);
  box.add("grad_k", r.grad_k, Role::kOut);
  box.add("grad_v", r.grad_v, Role::kOut);
  float* ws = box.workspace(cuda::swa_bwd_workspace_floats(r.params));
  box.redirect(r.params);
  box.finish(cuda::swa_bwd(r.params, ws, nullptr));
  return {r.grad_q, r.grad_k, r.grad_v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rla_fwd(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v, int64_t w,
                                                       const std::string& fm,
                                                       c10::optional<at::Tensor> h0,
                                                       int64_t every,
                                                       c10::optional<at::Tensor> cu_seqlens,
                                                       int64_t num_sms, bool ignore_smem_limit) {
  TORCH_CHECK_VALUE(num_sms > 0, "num_sms must be positive, got ", num_sms);
  auto r = prepare_rla_fwd(q, k, v, w, fm, h0, cuda::kRlaChunk, every, /*cuda_backend=*/true,
                           cu_seqlens);
  // as the op: the modelled GPU's (ignore_smem_limit: no limit, so the largest configuration,
  // to test the emulator's launch check)
  r.params.max_smem_per_block = ignore_smem_limit ? 0 : emu_smem_per_block();
  Sandbox box("rla_fwd");
  box.reserve(16);
  add_keep(box, r.keep, {"q", "k", "v", "cu_seqlens"});
  box.add("initial_state", r.h0, Role::kIn);
  box.add("out", r.out, Role::kOut);
  box.add("final_state", r.final_state, Role::kOut);
  box.add("checkpoints", r.checkpoints, Role::kOut);
  const int sms = static_cast<int>(num_sms);
  float* ws = box.workspace(cuda::rla_fwd_workspace_floats(r.params, sms));
  box.redirect(r.params);
  box.finish(cuda::rla_fwd(r.params, sms, ws, nullptr));
  return {r.out, r.final_state, r.checkpoints};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rla_bwd(
    const at::Tensor& go, c10::optional<at::Tensor> gfs, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, c10::optional<at::Tensor> h0, const at::Tensor& ckpt, int64_t w,
    const std::string& fm, int64_t every, c10::optional<at::Tensor> cu_seqlens, int64_t num_sms,
    int64_t temporaries_cap_bytes) {
  TORCH_CHECK_VALUE(num_sms > 0, "num_sms must be positive, got ", num_sms);
  auto r = prepare_rla_bwd(go, gfs, q, k, v, h0, ckpt, w, fm, cuda::kRlaChunk, every,
                           /*cuda_backend=*/true, cu_seqlens);
  r.params.max_smem_per_block = emu_smem_per_block();
  Sandbox box("rla_bwd");
  box.reserve(16);
  add_keep(box, r.keep, {"q", "k", "v", "cu_seqlens", "grad_out", "checkpoints", "initial_state",
                         "grad_final_state"});
  box.add("grad_q", r.grad_q, Role::kOut);
  box.add("grad_k", r.grad_k, Role::kOut);
  box.add("grad_v", r.grad_v, Role::kOut);
  box.add("grad_initial_state", r.grad_h0, Role::kOut);
  const int sms = static_cast<int>(num_sms);
  const int64_t cap = temporaries_cap_bytes;
  float* ws = box.workspace(cuda::rla_bwd_workspace_floats(r.params, sms, cap));
  box.redirect(r.params);
  box.finish(cuda::rla_bwd(r.params, sms, ws, nullptr, cap));
  at::Tensor gh0 = r.grad_h0;
  if (gh0.numel() > 0 && h0->size(0) == 1 && gh0.size(0) > 1) gh0 = gh0.sum(0, true);
  return {r.grad_q, r.grad_k, r.grad_v, gh0};
}

at::Tensor mix_fwd(const at::Tensor& o_swa, const at::Tensor& o_rla, const at::Tensor& ga,
                   const at::Tensor& gb, double eps, at::ScalarType out_dtype) {
  auto r = prepare_mix_fwd(o_swa, o_rla, ga, gb, eps, out_dtype);
  Sandbox box("mix_fwd");
  box.reserve(8);
  add_keep(box, r.keep, {"o_swa", "o_rla", "swa_weight", "rla_weight"});
  box.add("out", r.out, Role::kOut);
  box.redirect(r.params);
  box.finish(cuda::mix_fwd(r.params, nullptr));
  return r.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mix_bwd(
    const at::Tensor& go, const at::Tensor& a, const at::Tensor& b, const at::Tensor& ga,
    const at::Tensor& gb, double eps) {
  auto r = prepare_mix_bwd(go, a, b, ga, gb, eps);
  Sandbox box("mix_bwd");
  box.reserve(16);
  add_keep(box, r.keep, {"grad_out", "o_swa", "o_rla", "swa_weight", "rla_weight"});
  box.add("grad_o_swa", r.grad_o_swa, Role::kOut);
  box.add("grad_o_rla", r.grad_o_rla, Role::kOut);
  box.add("grad_swa_weight", r.grad_swa_weight, Role::kOut);
  box.add("grad_rla_weight", r.grad_rla_weight, Role::kOut);
  float* ws = box.workspace(cuda::mix_bwd_workspace_floats(r.params));
  box.redirect(r.params);
  box.finish(cuda::mix_bwd(r.params, ws, nullptr));
  return {r.grad_o_swa, r.grad_o_rla, r.grad_swa_weight, r.grad_rla_weight};
}

at::Tensor decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       at::Tensor k_cache, at::Tensor v_cache, at::Tensor state, at::Tensor pos,
                       const std::string& fm, double scale, c10::optional<at::Tensor> h0,
                       c10::optional<at::Tensor> cos, c10::optional<at::Tensor> sin,
                       const at::Tensor& ga, const at::Tensor& gb, double eps,
                       int64_t target_ctas) {
  auto r = prepare_decode_step(q, k, v, k_cache, v_cache, state, pos, fm, scale, h0, cos, sin, ga,
                               gb, eps, /*cuda_backend=*/true);
  r.params.target_ctas = target_ctas;  // 0: the plan's default; tests force other splits
  Sandbox box("decode_step");
  box.reserve(24);
  add_keep(box, r.keep, {"q", "k", "v", "initial_state", "rotary_cos", "rotary_sin", "swa_weight",
                         "rla_weight"});
  box.add("k_cache", k_cache, Role::kInOut);
  box.add("v_cache", v_cache, Role::kInOut);
  box.add("state", state, Role::kInOut);
  box.add("positions", pos, Role::kInOut);
  box.add("out", r.out, Role::kOut);
  float* ws = box.workspace(cuda::decode_workspace_bytes(r.params) / int64_t(sizeof(float)));
  box.redirect(r.params);
  box.finish(cuda::decode_step(r.params, ws, nullptr));
  return r.out;
}

}  // namespace
}  // namespace rattention

void add_launch_plan_bindings(pybind11::module& m);  // emu_plan_ops.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rattention_ext CUDA kernels run by the host emulator (tools/emu), CPU tensors";
  // The attention ops take the op layer's arguments in order; cu_seqlens (int32 [N+1],
  // packed q/k/v [total, H, D]) is an optional last keyword.
  const auto cu = py::arg("cu_seqlens") = py::none();
  m.def("swa_fwd", &rattention::swa_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("w"),
        py::arg("scale"), py::arg("cos"), py::arg("sin"), cu);
  m.def("swa_mix_fwd", &rattention::swa_mix_fwd, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("w"), py::arg("scale"), py::arg("cos"), py::arg("sin"), py::arg("o_rla"),
        py::arg("swa_weight"), py::arg("rla_weight"), py::arg("eps"), py::arg("out_dtype"),
        py::arg("save"), cu);
  m.def("swa_bwd", &rattention::swa_bwd, py::arg("grad_out"), py::arg("grad_lse"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("w"),
        py::arg("scale"), py::arg("cos"), py::arg("sin"), cu);
  m.def("rla_fwd", &rattention::rla_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("w"),
        py::arg("feature_map"), py::arg("initial_state"), py::arg("every"), cu,
        // the SM count the segment parts are planned for (a large one: more parts)
        py::arg("num_sms") = rattention::cuda::kRlaReferenceSms,
        py::arg("ignore_smem_limit") = false);
  m.def("rla_bwd", &rattention::rla_bwd, py::arg("grad_out"), py::arg("grad_final_state"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("initial_state"),
        py::arg("checkpoints"), py::arg("w"), py::arg("feature_map"), py::arg("every"), cu,
        // the SM count the dk/dv segments are planned for (a small one: more segments)
        py::arg("num_sms") = rattention::cuda::kRlaReferenceSms,
        // what the sub-batches are sized to (a small one: a sequence per sub-batch)
        py::arg("temporaries_cap_bytes") = rattention::cuda::kRlaTemporariesCapBytes);
  m.def("mix_fwd", &rattention::mix_fwd);
  m.def("mix_bwd", &rattention::mix_bwd);
  m.def("decode_step", &rattention::decode_step, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("state"), py::arg("pos"), py::arg("fm"),
        py::arg("scale"), py::arg("h0"), py::arg("cos"), py::arg("sin"), py::arg("ga"),
        py::arg("gb"), py::arg("eps"), py::arg("target_ctas") = 0);
  add_launch_plan_bindings(m);

  m.def("set_schedule", [](const std::string& order, uint64_t seed) {
    if (order == "asc") emu::set_schedule(emu::Order::kAscending, seed);
    else if (order == "desc") emu::set_schedule(emu::Order::kDescending, seed);
    else if (order == "random") emu::set_schedule(emu::Order::kRandom, seed);
    else TORCH_CHECK(false, "set_schedule: order must be 'asc', 'desc' or 'random', got '", order, "'");
  }, "Warp (and CTA) order of the following launches: 'asc', 'desc' or 'random' (seeded).",
        py::arg("order"), py::arg("seed") = 0);
  m.def("set_arch", [](int sm) {
    TORCH_CHECK(emu::arch_max_dynamic_smem(sm) > 0, "set_arch: sm must be 80, 86, 89 or 90, got ", sm);
    emu::set_arch(sm);
  }, "The modelled GPU (compute capability 80, 86, 89, 90): its shared-memory opt-in limit.",
        py::arg("sm"));
  m.def("arch", &emu::arch, "The modelled compute capability.");
  m.def("max_smem_per_block", &rattention::emu_smem_per_block,
        "The modelled GPU's opt-in shared memory per block: what the ops pass the launchers.");
  m.def("_selftest", [](int bug) {
    std::vector<float> out, want;
    auto reports = emu::selftest(bug, out, want);
    return std::make_tuple(reports, out, want);
  }, "Runs self-test kernel `bug` (tools/emu/emu_selftest.cpp): (reports, out, expected out).");
  m.def("take_reports", &emu::take_reports,
        "The reports of the checks since the last call (an op that reports raises as well).");
  // Coverage recorder (coverage.h): (function signature, path, any instantiation, hits) of
  // every RATT_COVER marker of every compiled instantiation; reset zeroes the hits.
  m.def("coverage", &emu::cover_snapshot);
  m.def("coverage_reset", &emu::cover_reset);
}
