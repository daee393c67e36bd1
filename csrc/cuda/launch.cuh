// Two CUDA constructs spelled through macros, so that the kernels and their launchers also
// compile for tools/emu (a host emulator that runs them on the CPU in tests):
//   RATT_DYNAMIC_SMEM(T, name)                 extern __shared__ T name[] (dynamic smem)
//   RATT_LAUNCH(grid, block, smem, stream, k)  k<<<grid, block, smem, stream>>>
// Under nvcc they are exactly the CUDA syntax.
#pragma once

#if defined(RATTENTION_EMU)
#define RATT_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::emu::dynamic_smem())
#define RATT_LAUNCH(grid, block, smem, stream, ...) ::emu::launcher(__VA_ARGS__, grid, block, smem)
#else
#define RATT_DYNAMIC_SMEM(T, name) extern __shared__ __align__(128) T name[]
#define RATT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif
