// Launch plans: what every CUDA kernel launch of an op asks of the GPU -- grid, block,
// dynamic shared memory, the op's workspace -- plus the longest serial chain a CTA walks.
//
// Each launcher (swa_fwd.cu, swa_bwd.cu, rla_fwd.cu, rla_bwd.cu, mix.cu, decode.cu) gets
// these numbers from one plan function of its family (swa_plan.h, rla_plan.h, mix_plan.h,
// decode_plan.h) and launches exactly what the plan says. The same functions, compiled into
// a small host program (tools/launch_plan_dump.cu), write build/cuda-check/launch.json
// for `make cuda-check`, so occupancy and parallelism can be reasoned about without a GPU
// and the numbers cannot drift from what is launched.
//
// Torch-free and CUDA-runtime-free: plain structs and integer arithmetic on the params.
#pragma once
#include <cstdint>

#include "core/window.h"

namespace rattention::cuda {

struct GridDims {
  int64_t x = 1, y = 1, z = 1;
  int64_t ctas() const { return x * y * z; }
};

// One kernel launch as the launcher issues it.
struct KernelLaunch {
  const char* kernel = "";  // the kernel's name without template arguments (as in report.json)
  GridDims grid;
  int threads = 0;          // per CTA (1-D blocks)
  int64_t smem_bytes = 0;   // dynamic shared memory requested at launch
  // The longest chain of dependent chunk / tile iterations one CTA walks (loops over the
  // query heads of a GQA group that sit outside the tile loop multiply it; work done per
  // step, such as the heads handled inside one chunk step, does not). 1 for kernels
  // without such a loop.
  int64_t serial_steps = 1;
};

inline KernelLaunch make_launch(const char* kernel, GridDims grid, int threads, int64_t smem_bytes,
                                int64_t serial_steps) {
  KernelLaunch l;
  l.kernel = kernel;
  l.grid = grid;
  l.threads = threads;
  l.smem_bytes = smem_bytes;
  l.serial_steps = serial_steps;
  return l;
}

// The most key tiles any query tile of the SWA forward / dq pass visits.
inline int64_t swa_max_key_tiles(int64_t T, int bm, int bn, int64_t window) {
  int64_t most = 0;
  for (int64_t m = 0; m < ceil_div(T, bm); ++m) {
    const TileRange r = swa_key_tiles_for_query_tile(m, bm, bn, T, window);
    most = imax(most, r.end - r.begin);
  }
  return most;
}

// The most query tiles that see any key tile (the SWA dK/dV pass, per query head).
inline int64_t swa_max_query_tiles(int64_t T, int bm, int bn, int64_t window) {
  int64_t most = 0;
  for (int64_t n = 0; n < ceil_div(T, bn); ++n) {
    const TileRange r = swa_query_tiles_for_key_tile(n, bm, bn, T, window);
    most = imax(most, r.end - r.begin);
  }
  return most;
}

}  // namespace rattention::cuda
