// tools/emu: run the CUDA kernels of csrc/cuda on the CPU, for tests on machines without a GPU.
//
// Force-included (g++ -include emu.h -DRATTENTION_EMU) before every translation unit of the
// emulated build. It supplies what nvcc would: the thread / block indices, __syncthreads,
// warp shuffles, atomics, a few device math functions, kernel launches (RATT_LAUNCH in
// csrc/cuda/launch.cuh) and dynamic shared memory. CuTe's SM80 MMA, ldmatrix and cp.async
// atoms are redirected to the warp-collective emulations declared here by the patched CuTe
// headers that tools/emu/patch_cute.py writes (the PTX semantics of mma.sync m16n8k16,
// ldmatrix.x4[.trans] and cp.async).
//
// Execution model (emu_runtime.cpp): the CTAs of a grid run one after another; inside a CTA
// every CUDA thread is a user-level context (ucontext) on one OS thread, switched at
// __syncthreads (all threads of the CTA) and at warp-collective operations (the 32 lanes of
// a warp). A barrier that can never complete (divergent __syncthreads, a shuffle with exited
// lanes) is reported as a launch failure instead of hanging. Shared memory is filled with
// 0xFF bytes (NaN) at every CTA start, so reading shared memory before writing it shows.
// What this cannot show: data races between threads (the schedule is one fixed
// interleaving), cp.async ordering (copies complete at once), timing and the real hardware.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // before the index macros below (it names parameters gridDim, ...)

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#define __launch_bounds__(...)
#define __shared__ static  // only static shared arrays remain (dynamic: RATT_DYNAMIC_SMEM)

namespace emu {

struct Index3 {
  unsigned x, y, z;
};
const Index3& thread_idx();
const Index3& block_idx();
const Index3& block_dim();
const Index3& grid_dim();

void syncthreads();
// Every lane of the calling warp deposits 8 bytes and reads another lane's 8 bytes.
uint64_t warp_exchange(uint64_t mine, int src_lane);
int lane_id();
char* dynamic_smem();

// Warp-collective PTX emulations used by the patched CuTe atoms.
void mma_m16n8k16_bf16(float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1,
                       uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1, float c0, float c1,
                       float c2, float c3);
void mma_m16n8k16_f16(float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1,
                      uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1, float c0, float c1,
                      float c2, float c3);
void ldmatrix_x4(const void* row_address, bool trans, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                 uint32_t& r3);
// cp.async of `bytes` (4, 8 or 16): both addresses must be aligned to it; completes at once.
void cp_async(void* smem_dst, const void* gmem_src, int bytes);

// Runs `body` once per CUDA thread of every CTA of the grid; returns the launch status.
cudaError_t launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes,
                   const std::function<void()>& body);

template <class Kernel>
struct Launcher {
  Kernel kernel;
  dim3 grid, block;
  size_t smem;
  template <class... Args>
  void operator()(Args... args) const {
    Kernel k = kernel;
    launch(grid, block, smem, [=]() { k(args...); });
  }
};
template <class Kernel>
Launcher<Kernel> launcher(Kernel kernel, dim3 grid, dim3 block, size_t smem) {
  return Launcher<Kernel>{kernel, grid, block, smem};
}

template <class T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_exchange(bits, lane_id() ^ lane_mask);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define __syncthreads() ::emu::syncthreads()
#define __shfl_xor_sync(mask, v, lane_mask) ::emu::shfl_xor(v, lane_mask)

// One OS thread runs a whole grid, so an atomic add is a plain add.
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }

// cudaFuncSetAttribute on a kernel (the template overload nvcc's cuda_runtime.h provides).
template <class F>
cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int) {
  return cudaSuccess;
}
