// Two CUDA constructs spelled through macros, so that the kernels and their launchers also
// compile for tools/emu (a host emulator that runs them on the CPU in tests):
//   RATT_DYNAMIC_SMEM(T, name)                 extern __shared__ T name[] (dynamic smem)
//   RATT_LAUNCH(grid, block, smem, stream, k)  k<<<grid, block, smem, stream>>>
// Under nvcc they are exactly the CUDA syntax. The emulator's RATT_LAUNCH also records each
// launch (emu::launch_records). RATT_LAUNCH_PLANNED(l, stream, k) launches with the grid,
// block and dynamic smem of a launch plan's KernelLaunch l (launch_plan.h).
//
// RATT_COVER("path") marks a code path of a kernel (a branch the emulated tests must
// reach in every instantiation: a masked tile, rotary on, ...); RATT_COVER_ANY("path") one
// that some instantiation of the function must reach. Every kernel has at least one, so
// the emulator's coverage recorder (tools/emu/coverage.h) lists every compiled
// instantiation and which of its marked paths ran; under nvcc both are nothing.
//
// RATT_VECTOR_ACCESS(p, bytes) is p, at a vector access of `bytes` (16: uint4 / float4)
// through it; the emulator first checks the alignment the GPU requires (emu::check_aligned).
#pragma once

#if defined(RATTENTION_EMU)
#include <cstddef>
#include <vector>

#include "../../tools/emu/coverage.h"
namespace emu {
// Every launch as a launcher passes it (grid, block, dynamic smem), for the emulator's tests
// that compare the launches with the launch plans (tests/test_launch_plan.py).
struct LaunchRecord {
  dim3 grid, block;
  size_t smem;
};
// Defined in tools/emu/emu_plan_ops.cpp, outside the kernel translation units: those are
// compiled with ThreadSanitizer instrumentation whose hooks are the emulator's, which has none
// for the atomic guard of a function-local static.
std::vector<LaunchRecord>& launch_records();
}  // namespace emu
#define RATT_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::emu::dynamic_smem())
#define RATT_LAUNCH(grid, block, smem, stream, ...)                                          \
  (::emu::launch_records().push_back(::emu::LaunchRecord{dim3(grid), dim3(block), size_t(smem)}), \
   ::emu::launcher(__VA_ARGS__, grid, block, smem))
#define RATT_COVER(path) RATT_EMU_COVER(path, false)
#define RATT_COVER_ANY(path) RATT_EMU_COVER(path, true)
#define RATT_VECTOR_ACCESS(p, bytes) (::emu::vector_access((p), (bytes)))
#else
#define RATT_DYNAMIC_SMEM(T, name) extern __shared__ __align__(128) T name[]
#define RATT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define RATT_COVER(path) ((void)0)
#define RATT_COVER_ANY(path) ((void)0)
#define RATT_VECTOR_ACCESS(p, bytes) (p)
#endif

#include "cuda/launch_plan.h"

namespace rattention::cuda {

// The grid of a planned launch as a dim3.
inline dim3 launch_grid(const KernelLaunch& l) {
  return dim3(static_cast<unsigned>(l.grid.x), static_cast<unsigned>(l.grid.y),
              static_cast<unsigned>(l.grid.z));
}

}  // namespace rattention::cuda

// Launches `kernel` with the grid, block and dynamic shared memory of the planned launch
// `l` (a KernelLaunch): RATT_LAUNCH_PLANNED(plan.fwd, stream, kernel)(args...).
#define RATT_LAUNCH_PLANNED(l, stream, ...) \
  RATT_LAUNCH(::rattention::cuda::launch_grid(l), (l).threads, (l).smem_bytes, stream, __VA_ARGS__)
