// CPU kernels: each takes a params struct (csrc/core/params.h), never an at::Tensor.
// The files implementing them include no torch header; parallelism goes through
// cpu/parallel.h, whose one implementation forwards to at::parallel_for.
#pragma once
#include "../core/params.h"

namespace rattention::cpu {

void swa_fwd(const SwaFwdParams& p);
void swa_bwd(const SwaBwdParams& p);
void rla_fwd(const RlaFwdParams& p);
void rla_bwd(const RlaBwdParams& p);
void mix_fwd(const MixParams& p);
void mix_bwd(const MixBwdParams& p);
void decode_step(const DecodeParams& p);

}  // namespace rattention::cpu
