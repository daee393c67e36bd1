// tools/emu runtime: CTA scheduler (ucontext), barriers, warp collectives, the PTX
// semantics of mma.sync m16n8k16 / ldmatrix.x4, and the few CUDA runtime calls the
// launchers make. See emu.h for the model and its limits.
#include <ucontext.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "emu.h"

namespace emu {
namespace {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kMaxSmem = 232448;  // 227 KiB, the sm_90 opt-in maximum

enum State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Cta {
  ucontext_t scheduler;
  std::vector<ucontext_t> ctx = std::vector<ucontext_t>(kMaxThreads);
  std::vector<std::vector<char>> stacks;
  std::vector<State> state = std::vector<State>(kMaxThreads);
  std::vector<uint64_t> slot = std::vector<uint64_t>(kMaxThreads);  // warp exchange
  std::vector<const void*> addr = std::vector<const void*>(kMaxThreads);
  std::vector<std::array<uint32_t, 10>> frag = std::vector<std::array<uint32_t, 10>>(kMaxThreads);
  std::vector<char> smem = std::vector<char>(kMaxSmem + 128);
  int n = 0;
  int current = 0;
  Index3 tid{}, bid{}, bdim{}, gdim{};
  const std::function<void()>* body = nullptr;
};

Cta& cta() {
  static Cta c;
  return c;
}

cudaError_t g_last_error = cudaSuccess;
std::vector<Index3> g_thread_idx(kMaxThreads);

void thread_entry() {
  (*cta().body)();
  cta().state[cta().current] = kDone;
  // returning resumes uc_link (the scheduler)
}

void yield_as(State s) {
  Cta& c = cta();
  c.state[c.current] = s;
  swapcontext(&c.ctx[c.current], &c.scheduler);
}

void warp_barrier() { yield_as(kAtWarpBarrier); }

// Runs one CTA to completion. Returns false on a barrier that can never complete.
bool run_cta(std::string& why) {
  Cta& c = cta();
  for (int t = 0; t < c.n; ++t) {
    getcontext(&c.ctx[t]);
    c.ctx[t].uc_stack.ss_sp = c.stacks[t].data();
    c.ctx[t].uc_stack.ss_size = c.stacks[t].size();
    c.ctx[t].uc_link = &c.scheduler;
    makecontext(&c.ctx[t], thread_entry, 0);
    c.state[t] = kRunnable;
  }
  const int n_warps = (c.n + 31) / 32;
  while (true) {
    bool ran = false;
    for (int t = 0; t < c.n; ++t) {
      if (c.state[t] != kRunnable) continue;
      c.current = t;
      swapcontext(&c.scheduler, &c.ctx[t]);
      ran = true;
    }
    int done = 0, at_block = 0;
    for (int t = 0; t < c.n; ++t) {
      done += c.state[t] == kDone;
      at_block += c.state[t] == kAtBlockBarrier;
    }
    if (done == c.n) return true;
    bool released = false;
    for (int w = 0; w < n_warps; ++w) {
      const int lo = 32 * w, hi = std::min(c.n, lo + 32);
      int at_warp = 0, done_w = 0;
      for (int t = lo; t < hi; ++t) {
        at_warp += c.state[t] == kAtWarpBarrier;
        done_w += c.state[t] == kDone;
      }
      if (at_warp > 0 && at_warp + done_w == hi - lo) {
        if (done_w > 0) {
          why = "warp-collective operation in warp " + std::to_string(w) +
                " with exited lanes";
          return false;
        }
        for (int t = lo; t < hi; ++t) c.state[t] = kRunnable;
        released = true;
      }
    }
    if (!released && at_block > 0 && at_block + done == c.n) {
      for (int t = 0; t < c.n; ++t)
        if (c.state[t] == kAtBlockBarrier) c.state[t] = kRunnable;
      released = true;
    }
    if (!ran && !released) {
      why = "deadlock: " + std::to_string(at_block) + " threads at __syncthreads, " +
            std::to_string(done) + " exited, the rest at a warp-collective operation";
      return false;
    }
  }
}

uint16_t half_bits(uint32_t reg, int hi) { return static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xFFFF); }

float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float f16_to_float(uint16_t h) {
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: lane l (group g = l / 4, t = l % 4) holds
// A (16 x 16, row-major) a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..);
// B (16 x 8, "col") b0 = (k = 2t..2t+1, n = g), b1 = (k = 2t+8.., n = g);
// C / D (16 x 8) c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1).   (PTX ISA, mma m16n8k16)
template <float (*ToFloat)(uint16_t)>
void mma_m16n8k16(float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1,
                  uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1, float c0, float c1,
                  float c2, float c3) {
  Cta& c = cta();
  const int me = c.current, base = me & ~31, lane = me & 31;
  c.frag[me] = {a0, a1, a2, a3, b0, b1, 0, 0, 0, 0};
  warp_barrier();
  auto A = [&](int r, int k) {
    const int src = base + (r % 8) * 4 + (k % 8) / 2;
    const int reg = (r < 8 ? 0 : 1) + (k < 8 ? 0 : 2);
    return ToFloat(half_bits(c.frag[src][reg], k % 2));
  };
  auto B = [&](int k, int n) {
    const int src = base + n * 4 + (k % 8) / 2;
    return ToFloat(half_bits(c.frag[src][4 + (k < 8 ? 0 : 1)], k % 2));
  };
  const int g = lane / 4, t = lane % 4;
  const int rows[4] = {g, g, g + 8, g + 8};
  const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  const float cin[4] = {c0, c1, c2, c3};
  float out[4];
  for (int i = 0; i < 4; ++i) {
    float acc = cin[i];
    for (int k = 0; k < 16; ++k) acc += A(rows[i], k) * B(k, cols[i]);
    out[i] = acc;
  }
  warp_barrier();  // every lane has read the fragments before they are reused
  d0 = out[0];
  d1 = out[1];
  d2 = out[2];
  d3 = out[3];
}

}  // namespace

const Index3& thread_idx() {
  Cta& c = cta();
  g_thread_idx[c.current] = Index3{static_cast<unsigned>(c.current), 0, 0};
  return g_thread_idx[c.current];
}
const Index3& block_idx() { return cta().bid; }
const Index3& block_dim() { return cta().bdim; }
const Index3& grid_dim() { return cta().gdim; }
int lane_id() { return cta().current & 31; }
char* dynamic_smem() {
  auto addr = reinterpret_cast<uintptr_t>(cta().smem.data());
  return reinterpret_cast<char*>((addr + 127) & ~uintptr_t(127));
}

void syncthreads() { yield_as(kAtBlockBarrier); }

uint64_t warp_exchange(uint64_t mine, int src_lane) {
  Cta& c = cta();
  const int me = c.current;
  c.slot[me] = mine;
  warp_barrier();
  const uint64_t v = c.slot[(me & ~31) | (src_lane & 31)];
  warp_barrier();
  return v;
}

void mma_m16n8k16_bf16(float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1,
                       uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1, float c0, float c1,
                       float c2, float c3) {
  mma_m16n8k16<bf16_to_float>(d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3);
}
void mma_m16n8k16_f16(float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1,
                      uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1, float c0, float c1,
                      float c2, float c3) {
  mma_m16n8k16<f16_to_float>(d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3);
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address of row l % 8 of
// matrix l / 8; register j of lane l gets matrix j's (row l / 4, cols 2 (l % 4) + {0, 1}), or
// with .trans (rows 2 (l % 4) + {0, 1}, col l / 4); low half first.
void ldmatrix_x4(const void* row_address, bool trans, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                 uint32_t& r3) {
  Cta& c = cta();
  const int me = c.current, base = me & ~31, lane = me & 31;
  if (reinterpret_cast<uintptr_t>(row_address) % 16 != 0) {
    std::fprintf(stderr, "emu: ldmatrix row address %p is not 16-byte aligned\n", row_address);
    std::abort();
  }
  c.addr[me] = row_address;
  warp_barrier();
  uint32_t out[4];
  for (int j = 0; j < 4; ++j) {
    uint16_t h[2];
    for (int e = 0; e < 2; ++e) {
      const int row = trans ? 2 * (lane % 4) + e : lane / 4;
      const int col = trans ? lane / 4 : 2 * (lane % 4) + e;
      const auto* p = static_cast<const uint16_t*>(c.addr[base + 8 * j + row]);
      h[e] = p[col];
    }
    out[j] = static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16);
  }
  warp_barrier();
  r0 = out[0];
  r1 = out[1];
  r2 = out[2];
  r3 = out[3];
}

void cp_async(void* smem_dst, const void* gmem_src, int bytes) {
  if (reinterpret_cast<uintptr_t>(smem_dst) % bytes != 0 ||
      reinterpret_cast<uintptr_t>(gmem_src) % bytes != 0) {
    std::fprintf(stderr, "emu: cp.async of %d bytes from %p to %p is misaligned\n", bytes,
                 gmem_src, smem_dst);
    std::abort();
  }
  std::memcpy(smem_dst, gmem_src, bytes);
}

cudaError_t launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes,
                   const std::function<void()>& body) {
  Cta& c = cta();
  const long n = static_cast<long>(block.x) * block.y * block.z;
  if (block.y != 1 || block.z != 1 || n > kMaxThreads || n <= 0) {
    g_last_error = cudaErrorInvalidConfiguration;
    return g_last_error;
  }
  if (dynamic_smem_bytes > kMaxSmem) {
    std::fprintf(stderr, "emu: %zu bytes of dynamic shared memory requested (max %zu)\n",
                 dynamic_smem_bytes, kMaxSmem);
    g_last_error = cudaErrorInvalidValue;
    return g_last_error;
  }
  if (static_cast<long>(c.stacks.size()) < n) c.stacks.resize(n, std::vector<char>(kStackBytes));
  c.n = static_cast<int>(n);
  c.bdim = Index3{block.x, 1, 1};
  c.gdim = Index3{grid.x, grid.y, grid.z};
  c.body = &body;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        c.bid = Index3{x, y, z};
        std::memset(c.smem.data(), 0xFF, c.smem.size());
        std::string why;
        if (!run_cta(why)) {
          std::fprintf(stderr, "emu: CTA (%u, %u, %u): %s\n", x, y, z, why.c_str());
          std::abort();  // the contexts of the failed CTA cannot be unwound safely
        }
      }
    }
  }
  return cudaSuccess;
}

}  // namespace emu

// ---- the CUDA runtime calls the launchers and the op glue make ---------------------------
cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "emulated launch error";
}
