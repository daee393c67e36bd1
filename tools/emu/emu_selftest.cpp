// tools/emu self-test: small kernels with one deliberate bug each (selected at run time), so
// that tests/test_cuda_emulated.py can show that every check of the emulator fires on the bug
// it is for, names it, and stays silent on the correct variant. Compiled like the kernels of
// csrc/cuda (instrumented, emu.h force-included); the CuTe cp.async atom and fence / wait are
// the patched ones the kernels use.
#include <cute/arch/copy_sm80.hpp>

#include <string>
#include <vector>

#include "cuda/launch.cuh"
#include "emu_internal.h"

namespace emu_selftest {

enum Bug {
  kClean,
  kNoSync,          // a warp reads what another wrote, no barrier between: racecheck
  kWriteAfterRead,  // a warp overwrites what another still reads: racecheck
  kUninit,          // reads shared memory nobody wrote: initcheck
  kSmemOob,         // writes past the dynamic shared memory the launch asked for: memcheck
  kGlobalOob,       // writes past the end of its output: memcheck
  kWriteInput,      // writes into an input: memcheck
  kNoWait,          // reads cp.async destinations without any wait: initcheck
  kShortWait,       // cp_async_wait<1> with one group in flight: initcheck
  kOwnRead,         // a thread reads its own pending destination: initcheck
  kWaitNoSync,      // waits, but another warp reads without a barrier: racecheck
  kPartialBarrier,  // half the block exits before __syncthreads: synccheck
  kSplitBarrier,    // warps wait at different __syncthreads: synccheck
  kShuffleExited,   // shuffle with exited lanes: synccheck
  kStaticPersist,   // static __shared__ read in a CTA that did not write it: initcheck
  kLaunchBounds,    // more threads than __launch_bounds__: launch
  kNoOptin,         // > 48 KiB dynamic smem without cudaFuncSetAttribute: launch
  kArchLimit,       // opt-in above the modelled GPU's limit: launch
  kMisaligned,      // a 16-byte load 2 bytes past a 16-byte boundary: memcheck
};

struct Params {
  const float* in;  // 256 floats
  float* out;       // 64 floats
  int bug;
};

constexpr int kThreads = 64;  // two warps

__global__ void __launch_bounds__(kThreads) smem_kernel(const Params p) {
  RATT_DYNAMIC_SMEM(float, s);  // 256 floats (1 KiB) requested
  const int t = threadIdx.x;
  if (p.bug == kSmemOob) s[256 + t] = 0.f;
  if (p.bug == kWriteInput) const_cast<float*>(p.in)[t] = 0.f;
  s[t] = p.in[t];
  if (p.bug == kMisaligned) {  // 2 bytes past a 16-byte boundary, as a bf16 view can be
    const char* odd = reinterpret_cast<const char*>(p.in) + 2;
    const uint4 x = *reinterpret_cast<const uint4*>(RATT_VECTOR_ACCESS(odd, 16));
    if ((x.x & x.y & x.z & x.w) == 0xFFFFFFFFu) s[t] = 0.f;  // never true for these inputs
  }
  if (p.bug != kNoSync) __syncthreads();
  float v = p.bug == kUninit ? s[128 + t] : s[63 - t];  // the other warp's element
  if (p.bug == kWriteAfterRead) s[t] = 2.f * v;
  if (p.bug == kGlobalOob) p.out[t + kThreads] = v;
  p.out[t] = v;
}

__global__ void __launch_bounds__(kThreads) cp_async_kernel(const Params p) {
  RATT_DYNAMIC_SMEM(float, s);
  const int t = threadIdx.x;
  using Atom = cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>;
  Atom::copy(*reinterpret_cast<const cute::uint128_t*>(p.in + 4 * t),
             *reinterpret_cast<cute::uint128_t*>(s + 4 * t));
  cute::cp_async_fence();
  float own = 0.f;
  if (p.bug == kOwnRead) own = s[4 * t];
  if (p.bug == kShortWait) cute::cp_async_wait<1>();
  if (p.bug != kNoWait && p.bug != kShortWait) cute::cp_async_wait<0>();
  if (p.bug != kWaitNoSync) __syncthreads();
  p.out[t] = s[4 * ((t + 32) % kThreads)] + 0.f * own;  // another warp's copy
}

// Two distinct barrier sites (noipa: never merged into one).
__attribute__((noinline, noipa)) void barrier_a() { __syncthreads(); }
__attribute__((noinline, noipa)) void barrier_b() { __syncthreads(); }

__global__ void __launch_bounds__(kThreads) sync_kernel(const Params p) {
  const int t = threadIdx.x;
  float v = p.in[t];
  if (p.bug == kPartialBarrier && t >= 32) return;
  if (p.bug == kSplitBarrier && t >= 32) {
    barrier_b();
  } else {
    barrier_a();
  }
  if (p.bug == kShuffleExited && t % 32 >= 16) return;
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  if (t < 32 || p.bug != kPartialBarrier) p.out[t] = v;
}

__global__ void __launch_bounds__(kThreads) static_smem_kernel(const Params p) {
  __shared__ float st[kThreads];
  const int t = threadIdx.x;
  if (blockIdx.x == 0 || p.bug != kStaticPersist) st[t] = p.in[t];
  __syncthreads();
  if (blockIdx.x == 1) p.out[t] = st[(t + 32) % kThreads];
}

}  // namespace emu_selftest

namespace emu {

// Runs the self-test kernel for `bug` (the names of the Bug enum, without k, in order) and
// returns the reports; out (64 floats) must equal `want` when there are none.
std::vector<std::string> selftest(int bug, std::vector<float>& out, std::vector<float>& want) {
  using namespace emu_selftest;
  // in and out inside one allocation with room around them: stray stores land in it
  std::vector<float> arena(3 * 4096);
  float* in = arena.data() + 1024;
  float* res = arena.data() + 8192;
  for (int i = 0; i < 256; ++i) in[i] = 0.5f + i;
  for (int i = 0; i < kThreads; ++i) res[i] = -1.f;
  want.assign(kThreads, 0.f);
  clear_buffers();
  take_reports();
  register_buffer(in, 256 * 4, "in", false);
  register_buffer(res, kThreads * 4, "out", true);
  const Params p{in, res, bug};
  cudaError_t err = cudaSuccess;
  const int arch0 = arch();
  switch (bug) {
    case kClean:
    case kNoSync:
    case kWriteAfterRead:
    case kUninit:
    case kSmemOob:
    case kGlobalOob:
    case kWriteInput:
    case kMisaligned:
      RATT_LAUNCH(1, kThreads, 1024, nullptr, smem_kernel)(p);
      for (int t = 0; t < kThreads; ++t) want[t] = in[63 - t];
      break;
    case kNoWait:
    case kShortWait:
    case kOwnRead:
    case kWaitNoSync:
      RATT_LAUNCH(1, kThreads, 1024, nullptr, cp_async_kernel)(p);
      for (int t = 0; t < kThreads; ++t) want[t] = in[4 * ((t + 32) % kThreads)];
      break;
    case kPartialBarrier:
    case kSplitBarrier:
    case kShuffleExited:
      RATT_LAUNCH(1, kThreads, 0, nullptr, sync_kernel)(p);
      for (int t = 0; t < kThreads; ++t) want[t] = in[t] + in[t ^ 1];
      break;
    case kStaticPersist:
      RATT_LAUNCH(2, kThreads, 0, nullptr, static_smem_kernel)(p);
      for (int t = 0; t < kThreads; ++t) want[t] = in[(t + 32) % kThreads];
      break;
    case kLaunchBounds:
      RATT_LAUNCH(1, 2 * kThreads, 1024, nullptr, smem_kernel)(p);
      break;
    case kNoOptin:
      RATT_LAUNCH(1, kThreads, 64 * 1024, nullptr, smem_kernel)(p);
      break;
    case kArchLimit:
      set_arch(86);
      err = cudaFuncSetAttribute(smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 160 * 1024);
      set_arch(arch0);
      if (err != cudaSuccess) report("launch", "cudaFuncSetAttribute returned an error");
      break;
  }
  (void)cudaGetLastError();
  clear_buffers();
  out.assign(res, res + kThreads);
  return take_reports();
}

}  // namespace emu
