// Prints the launch plans (csrc/cuda/*_plan.h) of op calls at given shapes as JSON, from the
// very functions the CUDA launchers call. Host-only; tools/cuda_check.py builds and runs it
// and adds occupancy (registers from the ptxas report) to write build/cuda-check/launch.json.
//
//   launch_plan_dump NAME:OP:B:T:HQ:HKV:D:W[:DTYPE[:CHECKPOINT_EVERY]] ...
//
// OP: forward, backward, decode_step, or a single op (swa_fwd, swa_mix_fwd, swa_bwd,
// rla_fwd, rla_bwd, mix_fwd, mix_bwd); DTYPE bf16 (default) or fp16. Output: a JSON list of
// {shape, op, call, kernel, dtype, head_dim, grid, threads, smem_bytes, serial_steps,
// workspace_bytes, sub_batch, sub_batches, saved_state_bytes}, one per kernel launch, in
// launch order (see PlanRow). Exit 2 on a bad argument.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "launch_plan_rows.h"

namespace {

using rattention::DType;
using rattention::cuda::PlanRow;
using rattention::cuda::PlanShape;

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t i = 0; i <= s.size(); ++i) {
    if (i == s.size() || s[i] == sep) {
      out.push_back(s.substr(start, i - start));
      start = i + 1;
    }
  }
  return out;
}

bool parse_int(const std::string& s, int64_t& v) {
  char* end = nullptr;
  v = std::strtoll(s.c_str(), &end, 10);
  return !s.empty() && end && *end == '\0' && v >= 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s NAME:OP:B:T:HQ:HKV:D:W[:DTYPE[:CHECKPOINT_EVERY]] ...\n", argv[0]);
    return 2;
  }
  std::printf("[");
  bool first = true;
  for (int a = 1; a < argc; ++a) {
    const std::vector<std::string> f = split(argv[a], ':');
    PlanShape s;
    int64_t* ints[] = {&s.batch, &s.seqlen, &s.heads_q, &s.heads_kv, &s.head_dim, &s.window};
    bool ok = f.size() >= 8 && f.size() <= 10;
    for (int i = 0; ok && i < 6; ++i) ok = parse_int(f[2 + i], *ints[i]);
    std::string dtype = f.size() > 8 ? f[8] : "bf16";
    if (ok && dtype != "bf16" && dtype != "fp16") ok = false;
    s.dtype = dtype == "fp16" ? DType::kFloat16 : DType::kBFloat16;
    if (ok && f.size() > 9) ok = parse_int(f[9], s.checkpoint_every) && s.checkpoint_every > 0;
    ok = ok && s.heads_kv > 0 && s.heads_q % s.heads_kv == 0;
    const std::vector<PlanRow> rows = ok ? rattention::cuda::plan_rows(f[1], s) : std::vector<PlanRow>{};
    if (rows.empty()) {
      std::fprintf(stderr, "launch_plan_dump: bad spec '%s' (expected NAME:OP:B:T:HQ:HKV:D:W"
                   "[:bf16|fp16[:CHECKPOINT_EVERY]], D 64 or 128, HQ a multiple of HKV)\n", argv[a]);
      return 2;
    }
    for (const PlanRow& r : rows) {
      const auto& l = r.launch;
      std::printf("%s\n {\"shape\": \"%s\", \"op\": \"%s\", \"call\": \"%s\", \"kernel\": \"%s\", "
                  "\"dtype\": \"%s\", \"head_dim\": %lld, \"grid\": [%lld, %lld, %lld], "
                  "\"threads\": %d, \"smem_bytes\": %lld, \"serial_steps\": %lld, "
                  "\"workspace_bytes\": %lld, \"sub_batch\": %lld, \"sub_batches\": %lld, "
                  "\"saved_state_bytes\": %lld}",
                  first ? "" : ",", f[0].c_str(), f[1].c_str(), r.call.c_str(), l.kernel,
                  dtype.c_str(), static_cast<long long>(s.head_dim), static_cast<long long>(l.grid.x),
                  static_cast<long long>(l.grid.y), static_cast<long long>(l.grid.z), l.threads,
                  static_cast<long long>(l.smem_bytes), static_cast<long long>(l.serial_steps),
                  static_cast<long long>(r.workspace_bytes), static_cast<long long>(r.sub_batch),
                  static_cast<long long>(r.sub_batches), static_cast<long long>(r.saved_state_bytes));
      first = false;
    }
  }
  std::printf("\n]\n");
  return 0;
}
