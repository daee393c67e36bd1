// tools/emu runtime: the CTA scheduler (ucontext fibers under a selectable warp order),
// barriers with synccheck, the warp collectives (shuffle, ldmatrix.x4, mma.sync m16n8k16 with
// their PTX semantics), the launch model (launch bounds, shared-memory opt-in and per-arch
// limits) and the few CUDA runtime calls the launchers make. Memory checks: emu_memory.cpp.
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "emu.h"
#include "emu_internal.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace emu {
namespace {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultSmem = 48 * 1024;  // above this a kernel needs the opt-in attribute

enum State { kRunnable, kAtBarrier, kAtCollective, kDone };
enum Collective { kShfl, kLdsm, kLdsmT, kMmaBf16, kMmaF16 };
const char* const kCollectiveName[] = {"shuffle", "ldmatrix", "ldmatrix.trans", "mma.sync (bf16)",
                                       "mma.sync (f16)"};

struct Thread {
  ucontext_t ctx;
  State state = kDone;
  const void* site = nullptr;  // code address of the barrier / collective it waits at
  Collective kind = kShfl;
  std::array<uint32_t, 6> frag{};  // mma A (4) and B (2) registers
  std::array<float, 4> acc{};      // mma C in, D out
  uint64_t value = 0;              // shuffle in / out
  int src_lane = 0;
  int barrier_or = 0;              // __syncthreads_or predicate in, the CTA's OR out
  const void* addr = nullptr;      // ldmatrix row address
  std::array<uint32_t, 4> regs{};  // ldmatrix out
  void* asan_fake = nullptr;
};

struct Cta {
  ucontext_t scheduler;
  std::vector<Thread> t = std::vector<Thread>(kMaxThreads);
  char* stacks = nullptr;  // kMaxThreads * kStackBytes, one mapping
  int n = 0;
  Index3 bid{}, bdim{}, gdim{};
  void (*entry)(const void*) = nullptr;
  const void* call = nullptr;
  bool failed = false;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
};

Cta& cta() {
  static Cta c;
  return c;
}

// ---- settings, reports, coverage ---------------------------------------------------------------
Order g_order = Order::kAscending;
uint64_t g_seed = 0;
std::mt19937_64 g_rng;
int g_arch = 80;
cudaError_t g_last_error = cudaSuccess;
std::vector<std::string> g_reports;
std::set<std::string> g_reported_keys;  // per launch: one report per (kind, what) head
bool g_launch_failed = false;
std::unordered_map<const void*, int> g_optin;  // kernel -> max dynamic smem (attribute)

std::string kernel_name(const void* kernel) {
  Dl_info info{};
  if (dladdr(kernel, &info) && info.dli_sname) {
    int status = 0;
    std::unique_ptr<char, void (*)(void*)> d(
        abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status), std::free);
    std::string s = status == 0 ? d.get() : info.dli_sname;
    // "void rattention::cuda::swa_fwd_kernel<...>(...)": drop the return type and namespace
    const auto paren = s.find('(');
    if (paren != std::string::npos) s = s.substr(0, paren);
    const auto ns = s.find("rattention::cuda::");
    if (ns != std::string::npos) s = s.substr(ns + 18);
    if (s.rfind("void ", 0) == 0) s = s.substr(5);
    return s;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "kernel@%p", kernel);
  return buf;
}
std::string g_kernel;

// __launch_bounds__(N) leaves N + 1 NOPs at the kernel entry (emu.h); 0: none declared.
int launch_bound(const void* kernel) {
  const auto* p = static_cast<const unsigned char*>(kernel);
  int n = 0;
  while (n < 1100 && p[n] == 0x90) ++n;
  return n > 0 ? n - 1 : 0;
}

std::vector<int> order_of(int n, uint64_t salt) {
  std::vector<int> v(n);
  std::iota(v.begin(), v.end(), 0);
  if (g_order == Order::kDescending) std::reverse(v.begin(), v.end());
  if (g_order == Order::kRandom) {
    std::mt19937_64 r(g_rng() ^ salt);
    std::shuffle(v.begin(), v.end(), r);
  }
  return v;
}

// ---- fibers ------------------------------------------------------------------------------------
void thread_entry();

void resume(int t) {
  Cta& c = cta();
  detail::cur.thread = t;
  detail::cur.warp = t / 32;
  detail::cur.in_kernel = true;
#if EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, c.stacks + size_t(t) * kStackBytes, kStackBytes);
  swapcontext(&c.scheduler, &c.t[t].ctx);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  swapcontext(&c.scheduler, &c.t[t].ctx);
#endif
  detail::cur.in_kernel = false;
}

void yield_as(State s) {
  Cta& c = cta();
  Thread& me = c.t[detail::cur.thread];
  me.state = s;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&me.asan_fake, c.sched_stack_bottom, c.sched_stack_size);
  swapcontext(&me.ctx, &c.scheduler);
  __sanitizer_finish_switch_fiber(me.asan_fake, nullptr, nullptr);
#else
  swapcontext(&me.ctx, &c.scheduler);
#endif
}

void thread_entry() {
  Cta& c = cta();
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &c.sched_stack_bottom, &c.sched_stack_size);
#endif
  c.entry(c.call);
  c.t[detail::cur.thread].state = kDone;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, c.sched_stack_bottom, c.sched_stack_size);
#endif
  // returning resumes uc_link (the scheduler)
}

// ---- warp collectives, executed by the scheduler once all 32 lanes have arrived ----------------
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
void exec_mma(Thread* w) {
  auto A = [&](int r, int k) {
    const int src = (r % 8) * 4 + (k % 8) / 2;
    const int reg = (r < 8 ? 0 : 1) + (k < 8 ? 0 : 2);
    return ToFloat(half_bits(w[src].frag[reg], k % 2));
  };
  auto B = [&](int k, int n) {
    const int src = n * 4 + (k % 8) / 2;
    return ToFloat(half_bits(w[src].frag[4 + (k < 8 ? 0 : 1)], k % 2));
  };
  std::array<std::array<float, 4>, 32> out;
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    const int rows[4] = {g, g, g + 8, g + 8};
    const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
      float acc = w[lane].acc[i];
      for (int k = 0; k < 16; ++k) acc += A(rows[i], k) * B(k, cols[i]);
      out[lane][i] = acc;
    }
  }
  for (int lane = 0; lane < 32; ++lane) w[lane].acc = out[lane];
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address of row l % 8 of
// matrix l / 8; register j of lane l gets matrix j's (row l / 4, cols 2 (l % 4) + {0, 1}), or
// with .trans (rows 2 (l % 4) + {0, 1}, col l / 4); low half first. Shared memory is read now.
void exec_ldmatrix(Thread* w, bool trans, int warp) {
  for (int lane = 0; lane < 32; ++lane) {
    if (reinterpret_cast<uintptr_t>(w[lane].addr) % 16 != 0) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "ldmatrix row address %p of warp %d lane %d is not 16-byte aligned",
                    w[lane].addr, warp, lane);
      detail::fail_cta("memcheck", buf);
      return;
    }
    detail::smem_read(w[lane].addr, 16, w[lane].site);
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int j = 0; j < 4; ++j) {
      uint16_t h[2];
      for (int e = 0; e < 2; ++e) {
        const int row = trans ? 2 * (lane % 4) + e : lane / 4;
        const int col = trans ? lane / 4 : 2 * (lane % 4) + e;
        std::memcpy(&h[e], static_cast<const char*>(w[8 * j + row].addr) + 2 * col, 2);
      }
      w[lane].regs[j] = static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16);
    }
  }
}

std::string lanes_text(const std::vector<int>& lanes) {
  std::string s;
  for (size_t i = 0; i < lanes.size() && i < 8; ++i) s += (i ? "," : "") + std::to_string(lanes[i]);
  if (lanes.size() > 8) s += ",...";
  return s;
}

// Runs warp w until each of its lanes waits at __syncthreads or has exited, executing its
// collectives as their lanes arrive. Returns false on a fatal error (the CTA is abandoned).
bool run_warp(int w) {
  Cta& c = cta();
  const int lo = 32 * w, hi = std::min(c.n, lo + 32);
  const std::vector<int> lane_order = order_of(hi - lo, 0x9e3779b97f4a7c15ull * (w + 1));
  while (true) {
    for (int l : lane_order) {
      if (c.t[lo + l].state != kRunnable) continue;
      resume(lo + l);
      if (c.failed) return false;
    }
    std::vector<int> at_coll, not_coll;
    for (int t = lo; t < hi; ++t) (c.t[t].state == kAtCollective ? at_coll : not_coll).push_back(t - lo);
    if (at_coll.empty()) return true;
    const Thread& first = c.t[lo + at_coll[0]];
    if (!not_coll.empty() || hi - lo < 32) {
      std::string why = std::string(kCollectiveName[first.kind]) + " at " + site(first.site) +
                        " in warp " + std::to_string(w) + " with lanes not active (lanes " +
                        lanes_text(not_coll) + " exited or wait at __syncthreads)";
      if (hi - lo < 32) why += "; the block has a partial warp";
      detail::fail_cta("synccheck", why);
      return false;
    }
    for (int l : at_coll) {
      if (c.t[lo + l].kind != first.kind || c.t[lo + l].site != first.site) {
        detail::fail_cta("synccheck", "lanes of warp " + std::to_string(w) +
                                          " at different warp-collective operations: lane " +
                                          std::to_string(at_coll[0]) + " " +
                                          kCollectiveName[first.kind] + " at " + site(first.site) +
                                          ", lane " + std::to_string(l) + " " +
                                          kCollectiveName[c.t[lo + l].kind] + " at " +
                                          site(c.t[lo + l].site));
        return false;
      }
    }
    Thread* lanes = &c.t[lo];
    switch (first.kind) {
      case kShfl: {
        uint64_t v[32];
        for (int l = 0; l < 32; ++l) v[l] = lanes[lanes[l].src_lane & 31].value;
        for (int l = 0; l < 32; ++l) lanes[l].value = v[l];
        break;
      }
      case kLdsm:
      case kLdsmT: exec_ldmatrix(lanes, first.kind == kLdsmT, w); break;
      case kMmaBf16: exec_mma<bf16_to_float>(lanes); break;
      case kMmaF16: exec_mma<f16_to_float>(lanes); break;
    }
    if (c.failed) return false;
    for (int t = lo; t < hi; ++t) c.t[t].state = kRunnable;
  }
}

// Runs one CTA to completion under the schedule: per barrier interval, every warp in the
// interval's order runs alone to its next __syncthreads. False: abandoned (fatal report).
bool run_cta() {
  Cta& c = cta();
  for (int t = 0; t < c.n; ++t) {
    getcontext(&c.t[t].ctx);
    c.t[t].ctx.uc_stack.ss_sp = c.stacks + size_t(t) * kStackBytes;
    c.t[t].ctx.uc_stack.ss_size = kStackBytes;
    c.t[t].ctx.uc_link = &c.scheduler;
    makecontext(&c.t[t].ctx, thread_entry, 0);
    c.t[t].state = kRunnable;
  }
  const int n_warps = (c.n + 31) / 32;
  for (uint64_t interval = 0;; ++interval) {
    for (int w : order_of(n_warps, interval)) {
      if (!run_warp(w)) return false;
    }
    std::vector<int> waiting, exited;
    for (int t = 0; t < c.n; ++t) (c.t[t].state == kAtBarrier ? waiting : exited).push_back(t);
    if (waiting.empty()) return true;
    if (!exited.empty()) {
      report("synccheck", g_kernel + ": __syncthreads at " + site(c.t[waiting[0]].site) +
                              " reached by " + std::to_string(waiting.size()) + " of " +
                              std::to_string(c.n) + " threads (threads " + lanes_text(exited) +
                              " have exited)");
    }
    for (int t : waiting) {
      if (c.t[t].site != c.t[waiting[0]].site) {
        report("synccheck", g_kernel + ": threads wait at different __syncthreads: thread " +
                                std::to_string(waiting[0]) + " at " + site(c.t[waiting[0]].site) +
                                ", thread " + std::to_string(t) + " at " + site(c.t[t].site));
        break;
      }
    }
    ++detail::cur.epoch;
    int any = 0;
    for (int t : waiting) any |= c.t[t].barrier_or;
    for (int t : waiting) {
      c.t[t].barrier_or = any;
      c.t[t].state = kRunnable;
    }
  }
}

Thread& me() { return cta().t[detail::cur.thread]; }

}  // namespace

// ---- settings, reports, coverage (emu_internal.h) ---------------------------------------------
void set_schedule(Order order, uint64_t seed) {
  g_order = order;
  g_seed = seed;
  g_rng.seed(seed);
}
Order schedule_order() { return g_order; }
void set_arch(int sm) { g_arch = sm; }
int arch() { return g_arch; }
size_t arch_max_dynamic_smem(int sm) {
  switch (sm) {
    case 80: return 163 * 1024;
    case 86:
    case 89: return 99 * 1024;
    case 90: return 227 * 1024;
    default: return 0;
  }
}

void report(const char* kind, const std::string& what) {
  g_launch_failed = true;
  const std::string key = std::string(kind) + what.substr(0, 200);
  if (!g_reported_keys.insert(key).second) return;
  const std::string msg = std::string("emu ") + kind + ": " + what;
  if (g_reports.size() < 200) g_reports.push_back(msg);
  if (g_reported_keys.size() <= 20) std::fprintf(stderr, "%s\n", msg.c_str());
}
std::vector<std::string> take_reports() {
  g_reported_keys.clear();
  std::vector<std::string> r;
  r.swap(g_reports);
  return r;
}
size_t report_count() { return g_reports.size(); }

std::string site(const void* pc) {
  Dl_info info{};
  char buf[64];
  std::snprintf(buf, sizeof buf, "%p", pc);
  if (!pc || !dladdr(pc, &info) || !info.dli_fname) return buf;
  const uintptr_t off = reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase) - 1;
  char cmd[1024];
  std::snprintf(cmd, sizeof cmd, "addr2line -i -e '%s' 0x%lx 2>/dev/null", info.dli_fname,
                static_cast<unsigned long>(off));
  std::string out;
  if (FILE* f = popen(cmd, "r")) {
    char line[512];
    // innermost first with -i; keep the outermost frame inside csrc/ (the kernel source line)
    std::string first, kernel_line;
    while (std::fgets(line, sizeof line, f)) {
      std::string s(line);
      while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
      const auto disc = s.find(" (discriminator");
      if (disc != std::string::npos) s = s.substr(0, disc);
      const auto cs = s.find("/csrc/");
      if (first.empty()) first = s;
      if (cs != std::string::npos) kernel_line = s.substr(cs + 1);
    }
    pclose(f);
    out = !kernel_line.empty() ? kernel_line : first;
  }
  return out.empty() || out[0] == '?' ? std::string(buf) : out;
}

void cover_hit(int64_t* counter) { ++*counter; }

namespace detail {
bool cta_failed() { return cta().failed; }
void fail_cta(const char* kind, const std::string& what) {
  report(kind, g_kernel + ": " + what);
  cta().failed = true;
}
}  // namespace detail

// ---- what the kernels call ---------------------------------------------------------------------
Index3 thread_idx() { return Index3{static_cast<unsigned>(detail::cur.thread), 0, 0}; }
Index3 block_idx() { return cta().bid; }
Index3 block_dim() { return cta().bdim; }
Index3 grid_dim() { return cta().gdim; }
int lane_id() { return detail::cur.thread & 31; }
char* dynamic_smem() { return detail::cur.smem; }

__attribute__((noinline)) void syncthreads() {
  me().site = __builtin_return_address(0);
  me().barrier_or = 0;
  yield_as(kAtBarrier);
}

__attribute__((noinline)) int syncthreads_or(int predicate) {
  Thread& t = me();
  t.site = __builtin_return_address(0);
  t.barrier_or = predicate != 0;
  yield_as(kAtBarrier);
  return t.barrier_or;
}

__attribute__((noinline)) uint64_t warp_exchange(uint64_t mine, int src_lane) {
  Thread& t = me();
  t.kind = kShfl;
  t.site = __builtin_return_address(0);
  t.value = mine;
  t.src_lane = src_lane;
  yield_as(kAtCollective);
  return t.value;
}

namespace {
__attribute__((always_inline)) inline void mma(Collective kind, const void* site, float& d0,
                                               float& d1, float& d2, float& d3, uint32_t a0,
                                               uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                               uint32_t b1, float c0, float c1, float c2,
                                               float c3) {
  Thread& t = me();
  t.kind = kind;
  t.site = site;
  t.frag = {a0, a1, a2, a3, b0, b1};
  t.acc = {c0, c1, c2, c3};
  yield_as(kAtCollective);
  d0 = t.acc[0];
  d1 = t.acc[1];
  d2 = t.acc[2];
  d3 = t.acc[3];
}
}  // namespace

__attribute__((noinline)) void mma_m16n8k16_bf16(float& d0, float& d1, float& d2, float& d3,
                                                 uint32_t a0, uint32_t a1, uint32_t a2,
                                                 uint32_t a3, uint32_t b0, uint32_t b1, float c0,
                                                 float c1, float c2, float c3) {
  mma(kMmaBf16, __builtin_return_address(0), d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2,
      c3);
}
__attribute__((noinline)) void mma_m16n8k16_f16(float& d0, float& d1, float& d2, float& d3,
                                                uint32_t a0, uint32_t a1, uint32_t a2,
                                                uint32_t a3, uint32_t b0, uint32_t b1, float c0,
                                                float c1, float c2, float c3) {
  mma(kMmaF16, __builtin_return_address(0), d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2,
      c3);
}

__attribute__((noinline)) void ldmatrix_x4(const void* row_address, bool trans, uint32_t& r0,
                                           uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  Thread& t = me();
  t.kind = trans ? kLdsmT : kLdsm;
  t.site = __builtin_return_address(0);
  t.addr = row_address;
  yield_as(kAtCollective);
  r0 = t.regs[0];
  r1 = t.regs[1];
  r2 = t.regs[2];
  r3 = t.regs[3];
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  const size_t limit = arch_max_dynamic_smem(g_arch);
  if (bytes < 0 || static_cast<size_t>(bytes) > limit) {
    report("launch", "cudaFuncSetAttribute(" + kernel_name(kernel) +
                         ", MaxDynamicSharedMemorySize, " + std::to_string(bytes) +
                         ") exceeds the sm_" + std::to_string(g_arch) + " opt-in limit of " +
                         std::to_string(limit) + " bytes");
    g_launch_failed = false;  // a returned error, not a failed launch
    return cudaErrorInvalidValue;
  }
  g_optin[kernel] = bytes;
  return cudaSuccess;
}

cudaError_t launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem_bytes,
                   void (*entry)(const void*), const void* call) {
  Cta& c = cta();
  g_kernel = kernel_name(kernel);
  detail::cur.kernel = g_kernel.c_str();
  g_reported_keys.clear();
  g_launch_failed = false;
  detail::new_launch();
  auto config_error = [&](cudaError_t e, const std::string& why) {
    report("launch", g_kernel + ": " + why);
    g_last_error = e;
    return e;
  };
  const long n = static_cast<long>(block.x) * block.y * block.z;
  if (block.y != 1 || block.z != 1)
    return config_error(cudaErrorInvalidConfiguration, "the emulator runs 1-D blocks only");
  if (n <= 0 || n > kMaxThreads)
    return config_error(cudaErrorInvalidConfiguration, std::to_string(n) + " threads per block");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    return config_error(cudaErrorInvalidConfiguration,
                        "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                            std::to_string(grid.z) + ") outside the CUDA limits");
  const int bound = launch_bound(kernel);
  if (bound > 0 && n > bound)
    return config_error(cudaErrorLaunchOutOfResources,
                        std::to_string(n) + " threads per block, __launch_bounds__ allows " +
                            std::to_string(bound));
  const size_t limit = arch_max_dynamic_smem(g_arch);
  if (dynamic_smem_bytes > kDefaultSmem) {
    auto it = g_optin.find(kernel);
    const size_t optin = it == g_optin.end() ? kDefaultSmem : it->second;
    if (dynamic_smem_bytes > optin)
      return config_error(cudaErrorInvalidValue,
                          std::to_string(dynamic_smem_bytes) +
                              " bytes of dynamic shared memory without the opt-in "
                              "(cudaFuncSetAttribute MaxDynamicSharedMemorySize is " +
                              std::to_string(optin) + ")");
  }
  if (dynamic_smem_bytes > limit)
    return config_error(cudaErrorInvalidValue,
                        std::to_string(dynamic_smem_bytes) +
                            " bytes of dynamic shared memory, above the sm_" +
                            std::to_string(g_arch) + " limit of " + std::to_string(limit));

  if (!c.stacks) {
    c.stacks = static_cast<char*>(mmap(nullptr, kMaxThreads * kStackBytes, PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (c.stacks == MAP_FAILED) {
      std::fprintf(stderr, "emu: cannot map the fiber stacks\n");
      std::abort();
    }
  }
  detail::cur.stack_lo = reinterpret_cast<uintptr_t>(c.stacks);
  detail::cur.stack_bytes = kMaxThreads * kStackBytes;
  detail::cur.smem_bytes = dynamic_smem_bytes;
  c.n = static_cast<int>(n);
  c.bdim = Index3{block.x, 1, 1};
  c.gdim = Index3{grid.x, grid.y, grid.z};
  c.entry = entry;
  c.call = call;

  const long n_ctas = long(grid.x) * grid.y * grid.z;
  std::vector<int> ctas = order_of(static_cast<int>(n_ctas), 0x5bd1e995);
  for (int id : ctas) {
    c.bid = Index3{unsigned(id % grid.x), unsigned((id / grid.x) % grid.y),
                   unsigned(id / (long(grid.x) * grid.y))};
    c.failed = false;
    detail::smem_begin_cta(c.n);
    const bool ok = run_cta();
    detail::smem_end_cta();
#if EMU_ASAN
    if (!ok) __asan_unpoison_memory_region(c.stacks, size_t(c.n) * kStackBytes);
#endif
    if (!ok) break;  // the remaining CTAs would only repeat the report
  }
  if (g_launch_failed) g_last_error = cudaErrorLaunchFailure;
  return g_launch_failed ? cudaErrorLaunchFailure : cudaSuccess;
}

}  // namespace emu

// ---- the CUDA runtime calls the launchers and the op glue make ---------------------------------
cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  if (bytes == 0) return cudaSuccess;
  if (!emu::check_global(p, bytes, true, __builtin_return_address(0), "cudaMemsetAsync"))
    return cudaErrorInvalidValue;
  std::memset(p, value, bytes);
  return cudaSuccess;
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch (emulated)";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulated: see the emu reports)";
    default: return "emulated launch error";
  }
}
