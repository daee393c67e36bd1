// The launch plans of whole op calls, as rows (one per kernel launch), for the reports:
// tools/launch_plan_dump.cu (build/cuda-check/launch.json via tools/cuda_check.py) and the
// emulator (tools/emu, whose tests compare them with the launches the launchers make).
//
// A "call" is one CUDA op as the Python layer issues it (rla_fwd, swa_mix_fwd, ...); the
// composite ops follow python/rattention_ext: forward = rla_fwd then swa_mix_fwd (the SWA
// forward with the mixing in its epilogue); backward (autograd order) = mix_bwd, swa_bwd,
// rla_bwd; decode_step = the decode kernel and the position bump. The params carry only the
// sizes (no tensors): the plans read nothing else.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/decode_plan.h"
#include "cuda/mix_plan.h"
#include "cuda/rla_plan.h"
#include "cuda/swa_plan.h"

namespace rattention::cuda {

struct PlanShape {
  int64_t batch = 1, seqlen = 1, heads_q = 1, heads_kv = 1, head_dim = 64, window = 0;
  // > 0: a packed batch of this many documents in `seqlen` rows in all (batch is ignored)
  int64_t packed_seqs = 0;
  int64_t checkpoint_every = 4;  // python/rattention_ext/api.py DEFAULT_CHECKPOINT_EVERY
  int num_sms = kRlaReferenceSms;  // the GPU the RLA passes' segments (and parts) are planned for
  // what the RLA backward's sub-batches are sized to (rla_bwd_plan); tests lower it
  int64_t rla_temporaries_cap_bytes = kRlaTemporariesCapBytes;
  // the GPU's opt-in shared memory per block the RLA configuration is chosen for (the
  // reference H200's by default); 0: no limit
  int64_t max_smem_per_block = kRlaReferenceSmemPerBlock;
  DType dtype = DType::kBFloat16;
};

struct PlanRow {
  std::string call;  // the op whose launcher issues it
  KernelLaunch launch;
  int64_t workspace_bytes;  // the scratch that call allocates (the same on each of its rows)
  // The RLA backward runs its launches once per sub-batch (rla_bwd_plan): row sub_batch of
  // sub_batches, the runs' rows identical otherwise. 0 of 1 for every other call.
  int64_t sub_batch = 0, sub_batches = 1;
  // RLA calls: the forward's checkpoints + final state of the whole batch, live during the
  // launch next to the workspace (the RLA temporaries). 0 for other calls.
  int64_t saved_state_bytes = 0;
};

// Batches without a halo (what the CUDA kernels take): seqlen_k = seqlen.
inline AttnDims plan_dims(const PlanShape& s) {
  const int64_t batch = s.packed_seqs > 0 ? s.packed_seqs : s.batch;
  return AttnDims{batch, s.seqlen, s.heads_q, s.heads_kv, s.head_dim, s.seqlen};
}

// The q/k/v description of a plan-only call: the plans read whether the batch is packed,
// never the offsets themselves (on a GPU they are device memory), so any non-null pointer
// marks it packed.
inline QkvParams plan_qkv(const PlanShape& s) {
  static const int32_t kPlanOnlyOffsets[1] = {0};
  QkvParams p{};
  p.dims = plan_dims(s);
  p.dtype = s.dtype;
  p.cu_seqlens = s.packed_seqs > 0 ? kPlanOnlyOffsets : nullptr;
  return p;
}
inline int64_t plan_tokens(const PlanShape& s) {
  return s.packed_seqs > 0 ? s.seqlen : s.batch * s.seqlen;
}

// Sub-batches and saved RLA state of a plan (only RLA plans have them).
template <class Plan>
int64_t plan_sub_batches(const Plan&) { return 1; }
inline int64_t plan_sub_batches(const RlaBwdPlan& p) { return p.sub_batches; }
template <class Plan>
int64_t plan_saved_state_bytes(const Plan&) { return 0; }
inline int64_t plan_saved_state_bytes(const RlaFwdPlan& p) { return p.saved_state_bytes; }
inline int64_t plan_saved_state_bytes(const RlaBwdPlan& p) { return p.saved_state_bytes; }

// The plan's launches in launch order: those of each sub-batch in turn.
template <class Plan>
void append_plan_rows(std::vector<PlanRow>& rows, const char* call, const Plan& plan) {
  const int64_t n = plan_sub_batches(plan);
  for (int64_t i = 0; i < n; ++i)
    plan.for_each([&](const KernelLaunch& l) {
      rows.push_back(PlanRow{call, l, plan.workspace_bytes, i, n, plan_saved_state_bytes(plan)});
    });
}

inline SwaFwdParams plan_swa_fwd_params(const PlanShape& s) {
  SwaFwdParams p{};
  static_cast<QkvParams&>(p) = plan_qkv(s);
  p.window_size = s.window;
  return p;
}
inline SwaBwdParams plan_swa_bwd_params(const PlanShape& s) {
  SwaBwdParams p{};
  static_cast<QkvParams&>(p) = plan_qkv(s);
  p.window_size = s.window;
  return p;
}
inline RlaFwdParams plan_rla_fwd_params(const PlanShape& s) {
  RlaFwdParams p{};
  static_cast<QkvParams&>(p) = plan_qkv(s);
  p.window_size = s.window;
  p.chunk_size = kRlaChunk;
  p.checkpoint_every = s.checkpoint_every;
  p.max_smem_per_block = s.max_smem_per_block;
  return p;
}
inline RlaBwdParams plan_rla_bwd_params(const PlanShape& s) {
  RlaBwdParams p{};
  static_cast<QkvParams&>(p) = plan_qkv(s);
  p.window_size = s.window;
  p.chunk_size = kRlaChunk;
  p.checkpoint_every = s.checkpoint_every;
  p.max_smem_per_block = s.max_smem_per_block;
  return p;
}
inline MixBwdParams plan_mix_bwd_params(const PlanShape& s) {
  MixBwdParams p{};
  p.rows = plan_tokens(s) * s.heads_q;
  p.heads_q = s.heads_q;
  p.head_dim = s.head_dim;
  p.acc_dtype = DType::kFloat32;
  p.grad_dtype = s.dtype;  // the gradient of forward's output, in q's dtype
  return p;
}
inline MixParams plan_mix_fwd_params(const PlanShape& s) {
  MixParams p{};
  p.rows = plan_tokens(s) * s.heads_q;
  p.heads_q = s.heads_q;
  p.head_dim = s.head_dim;
  p.acc_dtype = DType::kFloat32;
  p.out_dtype = s.dtype;
  return p;
}
inline DecodeParams plan_decode_params(const PlanShape& s) {
  DecodeParams p{};
  p.batch = s.batch;
  p.heads_q = s.heads_q;
  p.heads_kv = s.heads_kv;
  p.head_dim = s.head_dim;
  p.dtype = s.dtype;
  p.window_size = s.window;
  return p;
}

// Rows of `op`: one of the single ops (swa_fwd, swa_mix_fwd, swa_bwd, rla_fwd, rla_bwd,
// mix_fwd, mix_bwd, decode_step) or the composites forward / backward. Empty for an
// unknown op.
inline std::vector<PlanRow> plan_rows(const std::string& op, const PlanShape& s) {
  std::vector<PlanRow> rows;
  auto add = [&](const std::string& one) {
    if (one == "swa_fwd" || one == "swa_mix_fwd")
      append_plan_rows(rows, one == "swa_fwd" ? "swa_fwd" : "swa_mix_fwd", swa_fwd_plan(plan_swa_fwd_params(s)));
    else if (one == "swa_bwd")
      append_plan_rows(rows, "swa_bwd", swa_bwd_plan(plan_swa_bwd_params(s)));
    else if (one == "rla_fwd")
      append_plan_rows(rows, "rla_fwd", rla_fwd_plan(plan_rla_fwd_params(s), s.num_sms));
    else if (one == "rla_bwd")
      append_plan_rows(rows, "rla_bwd", rla_bwd_plan(plan_rla_bwd_params(s), s.num_sms,
                                                     s.rla_temporaries_cap_bytes));
    else if (one == "mix_fwd")
      append_plan_rows(rows, "mix_fwd", mix_fwd_plan(plan_mix_fwd_params(s)));
    else if (one == "mix_bwd")
      append_plan_rows(rows, "mix_bwd", mix_bwd_plan(plan_mix_bwd_params(s)));
    else if (one == "decode_step")
      append_plan_rows(rows, "decode_step", decode_plan(plan_decode_params(s)));
  };
  if (op == "forward") {
    add("rla_fwd");
    add("swa_mix_fwd");
  } else if (op == "backward") {
    add("mix_bwd");
    add("swa_bwd");
    add("rla_bwd");
  } else {
    add(op);
  }
  return rows;
}

}  // namespace rattention::cuda
