// Two CUDA constructs spelled through macros, so that the kernels and their launchers also
// compile for tools/emu (a host emulator that runs them on the CPU in tests):
//   RATT_DYNAMIC_SMEM(T, name)                 extern __shared__ T name[] (dynamic smem)
//   RATT_LAUNCH(grid, block, smem, stream, k)  k<<<grid, block, smem, stream>>>
// Under nvcc they are exactly the CUDA syntax.
//
// RATT_COVER("path") marks a code path of a kernel (a branch the emulated tests must
// reach in every instantiation: a masked tile, rotary on, ...); RATT_COVER_ANY("path") one
// that some instantiation of the function must reach. Every kernel has at least one, so
// the emulator's coverage recorder (tools/emu/coverage.h) lists every compiled
// instantiation and which of its marked paths ran; under nvcc both are nothing.
#pragma once

#if defined(RATTENTION_EMU)
#include "../../tools/emu/coverage.h"
#define RATT_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::emu::dynamic_smem())
#define RATT_LAUNCH(grid, block, smem, stream, ...) ::emu::launcher(__VA_ARGS__, grid, block, smem)
#define RATT_COVER(path) RATT_EMU_COVER(path, false)
#define RATT_COVER_ANY(path) RATT_EMU_COVER(path, true)
#else
#define RATT_DYNAMIC_SMEM(T, name) extern __shared__ __align__(128) T name[]
#define RATT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define RATT_COVER(path) ((void)0)
#define RATT_COVER_ANY(path) ((void)0)
#endif
