// The one operator library: every schema of rattention_ext, and the Python module that
// carries it (rattention_ext._C) with the build information.
//
// Conventions shared by all ops (see csrc/core/params.h for layouts):
// - q [B, T, Hq, D], k/v [B, T + halo, Hkv, D] (or packed [total, H, D] with cu_seqlens),
//   any strides; float32, float64, bfloat16 (CUDA: bfloat16, float16).
// - Branch outputs (swa_fwd.out, rla_fwd.out) and the gradients flowing into them are in
//   the accumulation type (float32; float64 for float64 inputs); mix_fwd turns them into
//   the output dtype. This keeps the mixing in float32 as SPEC.md asks.
#include <torch/extension.h>
#include <torch/library.h>

#include "build_info.h"

TORCH_LIBRARY(rattention_ext, m) {
  // Sequences (csrc/core/params.h has the layouts):
  // - cu_seqlens (optional, int32 [N+1] on q's device): a packed batch; q [total, Hq, D],
  //   k/v [total, Hkv, D], lse [Hq, total], states and H0 per document. Each document is
  //   computed as if alone (window, RLA shift and rotary rows restart at its first row).
  //   Checked on the CPU: 0 first, non-decreasing, last == total; on CUDA only dtype,
  //   device and shape (its values live on the device).
  // - halo (dense only, inferred from the shapes): k/v [B, T + halo, Hkv, D] with
  //   0 <= halo <= window_size + 1: the first halo rows are the keys/values just before q's
  //   first token (q row t is the token at k/v row t + halo); attended to and shifted into
  //   RLA, no output rows. Rotary tables: row i is the position of k/v row i (so q row t
  //   reads row t + halo); at least T + halo rows (packed: the longest document).
  // - carried_state (rla only, optional, [B or N, Hkv, 2D, D], acc type): the RLA state of
  //   the tokens before the halo, per kv head, beside the per-query-head initial_state. It
  //   starts S, so final_state = carried_state + sum over k/v rows s <= T_k - w - 2;
  //   rla_bwd returns its gradient (empty [0] when carried_state is None).
  m.def(
      "swa_fwd(Tensor q, Tensor k, Tensor v, SymInt window_size, float softmax_scale, "
      "Tensor? rotary_cos, Tensor? rotary_sin, Tensor? cu_seqlens=None) "
      "-> (Tensor out, Tensor lse)");
  // swa_fwd + mix_fwd in one op: the CUDA kernel mixes in the SWA epilogue. o_swa and lse
  // are returned for the backward when save_for_backward is true (empty otherwise).
  m.def(
      "swa_mix_fwd(Tensor q, Tensor k, Tensor v, SymInt window_size, float softmax_scale, "
      "Tensor? rotary_cos, Tensor? rotary_sin, Tensor o_rla, Tensor swa_weight, "
      "Tensor rla_weight, float eps, ScalarType out_dtype, bool save_for_backward, "
      "Tensor? cu_seqlens=None) -> (Tensor out, Tensor o_swa, Tensor lse)");
  m.def(
      "swa_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, SymInt window_size, float softmax_scale, Tensor? rotary_cos, "
      "Tensor? rotary_sin, bool deterministic, Tensor? cu_seqlens=None) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def(
      "rla_fwd(Tensor q, Tensor k, Tensor v, SymInt window_size, str feature_map, "
      "Tensor? initial_state, int chunk_size, int checkpoint_every, Tensor? cu_seqlens=None, "
      "Tensor? carried_state=None) -> (Tensor out, Tensor final_state, Tensor checkpoints)");
  m.def(
      "rla_bwd(Tensor grad_out, Tensor? grad_final_state, Tensor q, Tensor k, Tensor v, "
      "Tensor? initial_state, Tensor checkpoints, SymInt window_size, str feature_map, "
      "int chunk_size, int checkpoint_every, Tensor? cu_seqlens=None, "
      "Tensor? carried_state=None) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, "
      "Tensor grad_initial_state, Tensor grad_carried_state)");
  m.def(
      "mix_fwd(Tensor o_swa, Tensor o_rla, Tensor swa_weight, Tensor rla_weight, float eps, "
      "ScalarType out_dtype) -> Tensor");
  m.def(
      "mix_bwd(Tensor grad_out, Tensor o_swa, Tensor o_rla, Tensor swa_weight, "
      "Tensor rla_weight, float eps) "
      "-> (Tensor grad_o_swa, Tensor grad_o_rla, Tensor grad_swa_weight, Tensor grad_rla_weight)");
  m.def(
      "decode_step(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor(c!) state, Tensor(d!) pos, str feature_map, float softmax_scale, "
      "Tensor? initial_state, Tensor? rotary_cos, Tensor? rotary_sin, Tensor swa_weight, "
      "Tensor rla_weight, float eps) -> Tensor");
}

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "rattention_ext compiled operators (registered under torch.ops.rattention_ext)";
  mod.def("build_info", []() {
    pybind11::dict d;
    d["version"] = RATTENTION_VERSION;
    d["cuda"] = static_cast<bool>(RATTENTION_WITH_CUDA);
    d["cuda_archs"] = RATTENTION_CUDA_ARCHS;
    d["cuda_version"] = RATTENTION_CUDA_VERSION;
    d["cutlass_version"] = RATTENTION_CUTLASS_VERSION;
    d["torch_version"] = RATTENTION_TORCH_VERSION;
    d["compiler"] = RATTENTION_COMPILER;
    return d;
  });
}
