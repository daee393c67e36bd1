// Python bindings of the launch plans and of the launches the launchers made, so that
// tests/test_launch_plan.py can check, op by op, that every launch is the planned one
// (csrc/cuda/*_plan.h; tools/launch_plan_rows.h composes them per op call).
#include <torch/extension.h>

#include <string>

#include "../launch_plan_rows.h"
#include "cuda/launch.cuh"

namespace emu {
std::vector<LaunchRecord>& launch_records() {
  static std::vector<LaunchRecord> records;
  return records;
}
}  // namespace emu

namespace {

namespace py = pybind11;

// The launches recorded since the last call (grid, threads, dynamic smem), oldest first.
py::list take_launch_records() {
  py::list out;
  for (const auto& r : ::emu::launch_records()) {
    py::dict d;
    d["grid"] = py::make_tuple(r.grid.x, r.grid.y, r.grid.z);
    d["threads"] = r.block.x * r.block.y * r.block.z;
    d["smem_bytes"] = r.smem;
    out.append(d);
  }
  ::emu::launch_records().clear();
  return out;
}

// The planned launches of `op` (see plan_rows) at the given sizes.
py::list plan_rows(const std::string& op, int64_t batch, int64_t seqlen, int64_t heads_q,
                   int64_t heads_kv, int64_t head_dim, int64_t window, const std::string& dtype,
                   int64_t checkpoint_every, int64_t packed_seqs, int64_t num_sms,
                   int64_t temporaries_cap_bytes, int64_t max_smem_per_block) {
  TORCH_CHECK(dtype == "bf16" || dtype == "fp16", "plan_rows: dtype must be 'bf16' or 'fp16', got ", dtype);
  TORCH_CHECK(heads_kv > 0 && heads_q % heads_kv == 0 && checkpoint_every > 0,
              "plan_rows: heads_q must be a positive multiple of heads_kv, checkpoint_every > 0");
  rattention::cuda::PlanShape s;
  s.batch = batch;
  s.seqlen = seqlen;
  s.heads_q = heads_q;
  s.heads_kv = heads_kv;
  s.head_dim = head_dim;
  s.window = window;
  s.checkpoint_every = checkpoint_every;
  s.packed_seqs = packed_seqs;
  TORCH_CHECK(num_sms > 0, "plan_rows: num_sms must be positive, got ", num_sms);
  s.num_sms = static_cast<int>(num_sms);
  s.rla_temporaries_cap_bytes = temporaries_cap_bytes;
  s.max_smem_per_block = max_smem_per_block;
  s.dtype = dtype == "fp16" ? rattention::DType::kFloat16 : rattention::DType::kBFloat16;
  py::list out;
  for (const auto& r : rattention::cuda::plan_rows(op, s)) {
    py::dict d;
    d["call"] = r.call;
    d["kernel"] = std::string(r.launch.kernel);
    d["grid"] = py::make_tuple(r.launch.grid.x, r.launch.grid.y, r.launch.grid.z);
    d["threads"] = r.launch.threads;
    d["smem_bytes"] = r.launch.smem_bytes;
    d["serial_steps"] = r.launch.serial_steps;
    d["workspace_bytes"] = r.workspace_bytes;
    d["sub_batch"] = r.sub_batch;
    d["sub_batches"] = r.sub_batches;
    d["saved_state_bytes"] = r.saved_state_bytes;
    out.append(d);
  }
  return out;
}

}  // namespace

void add_launch_plan_bindings(py::module& m) {
  m.def("take_launch_records", &take_launch_records,
        "The launches (grid, threads, smem_bytes) the launchers made since the last call.");
  m.def("plan_rows", &plan_rows,
        "The planned launches of an op call: plan_rows(op, B, T, Hq, Hkv, D, w, dtype, every, "
        "packed_seqs=0, num_sms=132, temporaries_cap_bytes=1 GiB); packed_seqs > 0: that many "
        "documents packed into T rows (B ignored); num_sms: the SM count the RLA passes are "
        "planned for; temporaries_cap_bytes: what the RLA backward's sub-batches are sized to; "
        "max_smem_per_block: the GPU's opt-in shared memory per block the RLA kernels' "
        "configuration is chosen for (default the H200's 227 KiB, as launch.json; 0: no limit; "
        "max_smem_per_block() is the emulated GPU's).",
        py::arg("op"), py::arg("batch"), py::arg("seqlen"), py::arg("heads_q"),
        py::arg("heads_kv"), py::arg("head_dim"), py::arg("window"), py::arg("dtype"),
        py::arg("checkpoint_every"), py::arg("packed_seqs") = 0,
        py::arg("num_sms") = rattention::cuda::kRlaReferenceSms,
        py::arg("temporaries_cap_bytes") = rattention::cuda::kRlaTemporariesCapBytes,
        py::arg("max_smem_per_block") = rattention::cuda::kRlaReferenceSmemPerBlock);
}
