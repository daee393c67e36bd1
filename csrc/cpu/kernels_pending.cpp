// TEMPORARY scaffolding while the CPU kernels are written in parallel branches: weak
// definitions that the real kernels (strong symbols) override. Deleted once all land.
#include <stdexcept>

#include "kernels.h"

namespace rattention::cpu {
#define RATT_PENDING(name, P) \
  __attribute__((weak)) void name(const P&) { throw std::runtime_error(#name " is not built yet"); }
RATT_PENDING(swa_fwd, SwaFwdParams)
RATT_PENDING(swa_bwd, SwaBwdParams)
RATT_PENDING(rla_fwd, RlaFwdParams)
RATT_PENDING(rla_bwd, RlaBwdParams)
RATT_PENDING(decode_step, DecodeParams)
}  // namespace rattention::cpu
