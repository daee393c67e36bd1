// tools/emu: run the CUDA kernels of csrc/cuda on the CPU, as a sanitizer, for tests on
// machines without a GPU.
//
// Force-included (g++ -include emu.h -DRATTENTION_EMU) before every translation unit of the
// emulated build. It supplies what nvcc would: the thread / block indices, __syncthreads,
// warp shuffles, atomics, a few device math functions, kernel launches (RATT_LAUNCH in
// csrc/cuda/launch.cuh), dynamic shared memory and __launch_bounds__. CuTe's SM80 MMA,
// ldmatrix and cp.async atoms (and cp_async_fence / cp_async_wait) are redirected to the
// emulations declared here by the patched CuTe headers that tools/emu/patch_cute.py writes.
//
// Execution model (emu_runtime.cpp; README.md has the whole story): the CTAs of a grid run one
// after another; inside a CTA every CUDA thread is a user-level context (ucontext). Under the
// selected schedule one warp at a time runs until all its lanes wait at __syncthreads; a
// warp-collective instruction (shuffle, ldmatrix, mma) executes when the warp's 32 lanes
// have reached it, reading its operands (shared memory for ldmatrix) at that moment.
// cp.async copies land only when the issuing thread retires their group (emu_memory.cpp).
// The kernel translation units are compiled with -fsanitize=thread instrumentation whose
// hooks (__tsan_read4, ...) are the emulator's own: every load and store of kernel code is
// checked (racecheck, initcheck, memcheck; see emu_memory.cpp).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // before the index macros below (it names parameters gridDim, ...)

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>
#include <type_traits>

namespace emu {

struct Index3 {
  unsigned x, y, z;
};
// By value: kernel code must not read the runtime's memory (every such load is checked).
Index3 thread_idx();
Index3 block_idx();
Index3 block_dim();
Index3 grid_dim();

void syncthreads();
// __syncthreads_or: the barrier, returning whether any thread of the CTA passed a non-zero
// predicate. no_barrier_or is what tools/emu/mutants.py puts in its place (the barrier
// deleted: each thread sees its own predicate).
int syncthreads_or(int predicate);
inline int no_barrier_or(int predicate) { return predicate; }
// Shuffle: every lane of the calling warp gives 8 bytes and gets lane src_lane's.
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
// cp.async of `bytes` (4, 8 or 16; both addresses aligned to it): the source is read now, the
// destination is poisoned and pending until the issuing thread retires the copy's group.
void cp_async(void* smem_dst, const void* gmem_src, int bytes);
void cp_async_commit();          // cp.async.commit_group
void cp_async_wait(int pending);  // cp.async.wait_group N (N == 0: wait_all, commits first)

float atomic_add(float* p, float v);

// A vector access (16 bytes) the kernel code makes as one (RATT_VECTOR_ACCESS, launch.cuh):
// the GPU faults when `p` is not a multiple of `bytes`, so this reports it (memcheck) and
// returns false. The host compiler may split such an access into smaller ones, which the
// instrumentation's hooks then see as aligned; hence the explicit check.
bool check_aligned(const void* p, int bytes);
// p, or after a report the aligned address below it: the host's aligned vector instructions
// would fault at p, and the failed CTA's results are discarded anyway.
template <class T>
inline T* vector_access(T* p, int bytes) {
  if (check_aligned(p, bytes)) return p;
  return reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t(bytes - 1));
}

// A counter increment for kernel code (the coverage recorder): not a checked memory access.
// Kernel code's own loads and stores of module statics count as static __shared__ memory.
void cover_hit(int64_t* counter);

// Kernel launches. `kernel` identifies the kernel (its __launch_bounds__, the opt-in set by
// cudaFuncSetAttribute, its name in reports).
// `entry(call)` runs the kernel body of one CUDA thread.
cudaError_t launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem_bytes,
                   void (*entry)(const void*), const void* call);
cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);

// Not instrumented (the attribute): copying the launch arguments into each thread's parameters
// is the runtime's business; the kernel it calls is instrumented.
template <class Kernel, class... Args>
struct KernelCall {
  Kernel kernel;
  std::tuple<Args...> args;
  __attribute__((no_sanitize("thread"))) void operator()() const {
    call(std::index_sequence_for<Args...>{});
  }
  template <size_t... I>
  __attribute__((no_sanitize("thread"))) void call(std::index_sequence<I...>) const {
    kernel(std::get<I>(args)...);  // the by-value parameters are copied here
  }
};

template <class Call>
__attribute__((no_sanitize("thread"))) void run_call(const void* call) {
  (*static_cast<const Call*>(call))();
}

template <class Kernel>
struct Launcher {
  Kernel kernel;
  dim3 grid, block;
  size_t smem;
  template <class... Args>
  void operator()(Args... args) const {
    const KernelCall<Kernel, Args...> call{kernel, {args...}};
    launch(reinterpret_cast<const void*>(kernel), grid, block, smem,
           &run_call<KernelCall<Kernel, Args...>>, &call);
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

// __shfl_sync with a width of 32: lane src_lane's value (CUDA takes it modulo the width).
template <class T>
T shfl(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_exchange(bits, src_lane & 31);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <class... Rest>
constexpr int first_of(int n, Rest...) {
  return n;
}

}  // namespace emu

// __launch_bounds__(N, ...) as N + 1 single-byte NOPs at the kernel's entry, which the launch
// counts (the one attribute that takes a template-dependent integer and leaves a trace).
#define __launch_bounds__(...) \
  __attribute__((patchable_function_entry(::emu::first_of(__VA_ARGS__) + 1, 0)))
// Static shared arrays are the kernel TU's statics: the memory checks treat loads and stores
// of kernel code to the module's writable data as shared memory (fresh in every CTA).
#define __shared__ static

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define __syncthreads() ::emu::syncthreads()
// A function, not a macro, so that the mutation check can switch it for emu::no_barrier_or;
// always inlined so that each call site is its own barrier site for synccheck.
__attribute__((always_inline)) inline int __syncthreads_or(int predicate) {
  return ::emu::syncthreads_or(predicate);
}
#define __shfl_xor_sync(mask, v, lane_mask) ::emu::shfl_xor(v, lane_mask)
#define __shfl_sync(mask, v, src_lane) ::emu::shfl(v, src_lane)

inline float atomicAdd(float* p, float v) { return ::emu::atomic_add(p, v); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }

// cudaFuncSetAttribute on a kernel (the template overload nvcc's cuda_runtime.h provides).
template <class F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  return ::emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
}
