// tools/emu memory checks: every load and store of kernel code arrives here through the
// -fsanitize=thread instrumentation of the kernel translation units (the __tsan_* hooks at the
// end; no ThreadSanitizer runtime is linked), plus the explicit accesses of ldmatrix,
// cp.async, atomics and cudaMemsetAsync.
//
//   shared memory (dynamic, sized exactly as the launch asks, a checked guard after it; and
//   static __shared__ arrays, which are the module's writable data): per byte the last write
//   (warp, barrier interval, site), the warps that read it in the current interval, and a
//   pending cp.async. Reported: racecheck (a write by one warp and an access by another in the
//   same interval), initcheck (a read of bytes not written in this CTA, or of a cp.async
//   destination whose group the issuing thread has not retired), memcheck (out of bounds).
//   global memory: every access must lie in a buffer the op registered (emu_ops.cpp), writes
//   in a writable one; reads of the module's read-only data are allowed.
#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <cstdio>
#include <deque>
#include <set>
#include <tuple>
#include <string>
#include <unordered_map>
#include <vector>

#include "emu.h"
#include "emu_internal.h"

namespace emu {
namespace detail {

Current cur;

namespace {

constexpr size_t kSmemArena = 227 * 1024 + 4096;  // largest request + room for the guard
constexpr unsigned char kPoison = 0xFF;            // NaN in fp32 / bf16 / fp16

struct Shadow {
  uint32_t w_epoch = 0;  // interval of the last write (0: never)
  uint16_t w_warp = 0;
  uint16_t pending = 0;  // issuing thread + 1 of an un-retired cp.async to this byte
  uint32_t r_epoch = 0;  // interval of the reads in r_mask
  uint32_t r_mask = 0;   // warps that read the byte in r_epoch
  const void* w_pc = nullptr;
  const void* r_pc = nullptr;
};

alignas(128) char g_arena[kSmemArena];
std::vector<Shadow> g_shadow(kSmemArena);
std::unordered_map<uintptr_t, Shadow> g_static_shadow;  // static __shared__ bytes

struct Buffer {
  uintptr_t lo, hi;
  std::string name;
  bool writable;
};
std::vector<Buffer> g_buffers;

struct Segment {
  uintptr_t lo, hi;
};
std::vector<Segment> g_ro, g_rw;  // this module's read-only / writable loaded segments

int collect_segments(dl_phdr_info* info, size_t, void* self) {
  bool mine = false;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
    if (reinterpret_cast<uintptr_t>(self) >= lo && reinterpret_cast<uintptr_t>(self) < hi) mine = true;
  }
  if (!mine) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
    ((ph.p_flags & PF_W) ? g_rw : g_ro).push_back({lo, hi});
  }
  return 1;
}
void find_segments() {
  if (!g_ro.empty() || !g_rw.empty()) return;
  dl_iterate_phdr(collect_segments, reinterpret_cast<void*>(&find_segments));
}
bool in(const std::vector<Segment>& s, uintptr_t a) {
  for (const auto& x : s)
    if (a >= x.lo && a < x.hi) return true;
  return false;
}

// One address per report head, so a loop does not flood the output.
std::string where() {
  char buf[96];
  std::snprintf(buf, sizeof buf, " (CTA (%u, %u, %u), thread %d)", block_idx().x, block_idx().y,
                block_idx().z, cur.thread);
  return buf;
}

std::string smem_name(uintptr_t a, bool is_static) {
  char buf[96];
  if (!is_static) {
    std::snprintf(buf, sizeof buf, "shared byte %zu", size_t(a - uintptr_t(cur.smem)));
    return buf;
  }
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(a), &info) && info.dli_sname) {
    std::snprintf(buf, sizeof buf, "static shared %s + %zu", info.dli_sname,
                  size_t(a - uintptr_t(info.dli_saddr)));
    return buf;
  }
  std::snprintf(buf, sizeof buf, "static shared %p", reinterpret_cast<void*>(a));
  return buf;
}

// Reports of this launch, one per (check, site, other site): a loop does not flood the output
// and addr2line runs once per distinct pair.
std::set<std::tuple<int, const void*, const void*>> g_seen;
size_t g_suppressed = 0;
bool first_time(int check, const void* pc, const void* other) {
  if (g_seen.size() >= 64) {
    ++g_suppressed;
    return false;
  }
  return g_seen.insert({check, pc, other}).second;
}

// Checks and records one byte of shared memory at `a` (shadow `s`) accessed by the current warp.
// (Reports are deduplicated by site, so the other bytes of the access add none.)
bool check_byte(Shadow& s, uintptr_t a, bool write, const void* pc, bool is_static) {
  const uint32_t e = cur.epoch;
  const uint16_t w = static_cast<uint16_t>(cur.warp);
  const uint32_t bit = 1u << (w & 31);
  bool reported = false;
  if (s.pending) {
    if (first_time(0, pc, s.w_pc))
      report(write ? "racecheck" : "initcheck",
             std::string(cur.kernel) + ": " + (write ? "write to " : "read of ") +
                 smem_name(a, is_static) + " at " + site(pc) + " while its cp.async (issued at " +
                 site(s.w_pc) + " by thread " + std::to_string(s.pending - 1) +
                 ") is pending: no cp_async_wait has retired it" + where());
    reported = true;
  } else if (!write && s.w_epoch < cur.cta_epoch0) {
    if (first_time(1, pc, nullptr))
      report("initcheck", std::string(cur.kernel) + ": read of " + smem_name(a, is_static) +
                              " at " + site(pc) + ", never written in this CTA" + where());
    reported = true;
  } else if (s.w_epoch == e && s.w_warp != w) {
    if (first_time(2, pc, s.w_pc))
      report("racecheck", std::string(cur.kernel) + ": " +
                              (write ? "write-after-write" : "read-after-write") + " hazard on " +
                              smem_name(a, is_static) + ": warp " + std::to_string(w) + " " +
                              (write ? "writes" : "reads") + " at " + site(pc) + ", warp " +
                              std::to_string(s.w_warp) + " wrote at " + site(s.w_pc) +
                              " in the same barrier interval" + where());
    reported = true;
  } else if (write && s.r_epoch == e && (s.r_mask & ~bit)) {
    if (first_time(3, pc, s.r_pc))
      report("racecheck", std::string(cur.kernel) + ": write-after-read hazard on " +
                              smem_name(a, is_static) + ": warp " + std::to_string(w) +
                              " writes at " + site(pc) + ", warp " +
                              std::to_string(__builtin_ctz(s.r_mask & ~bit)) + " read at " +
                              site(s.r_pc) + " in the same barrier interval" + where());
    reported = true;
  }
  if (write) {
    s.w_epoch = e;
    s.w_warp = w;
    s.w_pc = pc;
  } else {
    if (s.r_epoch != e) {
      s.r_epoch = e;
      s.r_mask = 0;
    }
    s.r_mask |= bit;
    s.r_pc = pc;
  }
  return reported;
}

void static_access(uintptr_t a, size_t n, bool write, const void* pc) {
  for (size_t i = 0; i < n; ++i) check_byte(g_static_shadow[a + i], a + i, write, pc, true);
}

void dynamic_access(uintptr_t a, size_t n, bool write, const void* pc) {
  const size_t off = a - uintptr_t(cur.smem);
  if (off + n > cur.smem_bytes) {
    if (!first_time(4, pc, nullptr)) return;
    char buf[200];
    std::snprintf(buf, sizeof buf,
                  "%s of %zu bytes at shared offset %zu, past the %zu bytes of dynamic shared "
                  "memory the launch requested, at ",
                  write ? "write" : "read", n, off, cur.smem_bytes);
    report("memcheck", std::string(cur.kernel) + ": " + buf + site(pc) + where());
    return;
  }
  for (size_t i = 0; i < n; ++i) check_byte(g_shadow[off + i], a + i, write, pc, false);
}

// `aligned`: the compiler took the access as naturally aligned (the __tsan_readN / writeN
// hooks, e.g. a float4 or uint4 through a cast pointer); a GPU faults on such an access at a
// misaligned address ("misaligned address"), so the emulator reports it instead of letting
// the host do it.
inline void on_access(const void* p, size_t n, bool write, const void* pc, bool aligned = false) {
  if (!cur.in_kernel) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a - cur.stack_lo < cur.stack_bytes) return;  // the threads' own stacks
  if (aligned && a % n != 0) {
    fail_cta("memcheck", std::string(write ? "store" : "load") + " of " + std::to_string(n) +
                             " bytes at " + std::to_string(a) + " is misaligned, at " + site(pc));
    return;
  }
  if (a - uintptr_t(g_arena) < kSmemArena) return dynamic_access(a, n, write, pc);
  if (in(g_rw, a)) return static_access(a, n, write, pc);
  check_global(p, n, write, pc, write ? "store" : "load");
}

struct AsyncCopy {
  char* dst;
  int bytes;
  unsigned char data[16];
};
struct AsyncQueue {
  std::vector<AsyncCopy> open;               // issued, not yet committed
  std::deque<std::vector<AsyncCopy>> groups;  // committed, in order
};
std::vector<AsyncQueue> g_async;

Shadow* shadow_of(uintptr_t a) {
  if (a - uintptr_t(g_arena) < kSmemArena) return &g_shadow[a - uintptr_t(cur.smem)];
  return &g_static_shadow[a];
}

void land(const AsyncCopy& c) {
  std::memcpy(c.dst, c.data, c.bytes);
  for (int i = 0; i < c.bytes; ++i) {
    Shadow* s = shadow_of(uintptr_t(c.dst) + i);
    s->pending = 0;
    s->w_epoch = cur.epoch;  // the bytes arrive now, written by the issuing warp
    s->w_warp = static_cast<uint16_t>(cur.warp);
  }
}

}  // namespace

void new_launch() {
  g_seen.clear();
  g_suppressed = 0;
}

void smem_begin_cta(int n_threads) {
  find_segments();
  cur.smem = g_arena;
  cur.cta_epoch0 = ++cur.epoch;
  std::memset(g_arena, kPoison, kSmemArena);
  // static __shared__ bytes an earlier CTA touched start poisoned, like fresh shared memory
  for (const auto& kv : g_static_shadow) *reinterpret_cast<unsigned char*>(kv.first) = kPoison;
  g_static_shadow.clear();
  g_async.assign(n_threads, AsyncQueue{});
}

void smem_end_cta() {
  for (auto& q : g_async) {
    auto clear = [](const std::vector<AsyncCopy>& v) {
      for (const auto& c : v)
        for (int i = 0; i < c.bytes; ++i) shadow_of(uintptr_t(c.dst) + i)->pending = 0;
    };
    clear(q.open);
    for (const auto& g : q.groups) clear(g);
  }
  g_async.clear();
  // The guard after the requested bytes: only uninstrumented code could have written it.
  for (size_t i = cur.smem_bytes; i < kSmemArena; ++i) {
    if (static_cast<unsigned char>(g_arena[i]) != kPoison) {
      report("memcheck", std::string(cur.kernel) + ": the guard after the " +
                             std::to_string(cur.smem_bytes) +
                             " requested bytes of shared memory was overwritten at offset " +
                             std::to_string(i));
      break;
    }
  }
}

void smem_read(const void* p, size_t bytes, const void* pc) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a - uintptr_t(g_arena) < kSmemArena) return dynamic_access(a, bytes, false, pc);
  if (in(g_rw, a)) return static_access(a, bytes, false, pc);
  fail_cta("memcheck", "ldmatrix row address " + std::to_string(a) + " at " + site(pc) +
                           " is not shared memory" + where());
}

}  // namespace detail

using detail::cur;

void register_buffer(const void* lo, size_t bytes, const std::string& name, bool writable) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(lo);
  detail::g_buffers.push_back({a, a + bytes, name, writable});
}
void clear_buffers() { detail::g_buffers.clear(); }

bool check_global(const void* p, size_t n, bool write, const void* pc, const char* what) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const detail::Buffer* near = nullptr;
  intptr_t best = INTPTR_MAX;
  const detail::Buffer* read_only = nullptr;
  for (const auto& b : detail::g_buffers) {
    if (a >= b.lo && a + n <= b.hi) {
      if (write && !b.writable) {  // unless it is also registered as an output
        read_only = &b;
        continue;
      }
      return true;
    }
    const intptr_t d = a < b.lo ? intptr_t(b.lo - a) : intptr_t(a + n - b.hi);
    if (d < best) {
      best = d;
      near = &b;
    }
  }
  if (read_only) {
    if (detail::first_time(5, pc, nullptr))
      report("memcheck", std::string(cur.kernel) + ": " + what + " of " + std::to_string(n) +
                             " bytes into the read-only input '" + read_only->name + "' (byte " +
                             std::to_string(a - read_only->lo) + ") at " + site(pc));
    return false;
  }
  if (!write) {
    detail::find_segments();
    if (detail::in(detail::g_ro, a)) return true;  // constants of the module
  }
  if (!detail::first_time(6, pc, nullptr)) return false;
  std::string rel = "outside every buffer of the launch";
  if (near) {
    char buf[160];
    if (a >= near->hi || a + n > near->hi)
      std::snprintf(buf, sizeof buf, "%zd bytes past the end of '%s' (%zu bytes)",
                    intptr_t(a + n - near->hi), near->name.c_str(), size_t(near->hi - near->lo));
    else
      std::snprintf(buf, sizeof buf, "%zd bytes before the start of '%s' (%zu bytes)",
                    intptr_t(near->lo - a), near->name.c_str(), size_t(near->hi - near->lo));
    rel = buf;
  }
  report("memcheck", std::string(cur.in_kernel ? cur.kernel : "host") + ": " + what + " of " +
                         std::to_string(n) + " bytes at " + std::to_string(a) + ", " + rel +
                         ", at " + site(pc) + (cur.in_kernel ? detail::where() : ""));
  return false;
}

__attribute__((noinline)) void cp_async(void* smem_dst, const void* gmem_src, int bytes) {
  const void* pc = __builtin_return_address(0);
  const uintptr_t d = reinterpret_cast<uintptr_t>(smem_dst), s = reinterpret_cast<uintptr_t>(gmem_src);
  if (d % bytes != 0 || s % bytes != 0) {
    detail::fail_cta("memcheck", "cp.async of " + std::to_string(bytes) + " bytes from " +
                                     std::to_string(s) + " to " + std::to_string(d) +
                                     " is misaligned, at " + site(pc));
    return;
  }
  const bool dyn = d - uintptr_t(detail::g_arena) < detail::kSmemArena;
  if (!dyn && !detail::in(detail::g_rw, d)) {
    detail::fail_cta("memcheck", "cp.async destination is not shared memory, at " + site(pc));
    return;
  }
  if (dyn && d - uintptr_t(cur.smem) + bytes > cur.smem_bytes) {
    detail::dynamic_access(d, bytes, true, pc);  // reports out of bounds
    return;
  }
  detail::AsyncCopy c{static_cast<char*>(smem_dst), bytes, {}};
  if (check_global(gmem_src, bytes, false, pc, "cp.async source"))
    std::memcpy(c.data, gmem_src, bytes);
  else
    std::memset(c.data, detail::kPoison, bytes);
  // the destination counts as written (by this warp, now) and stays poisoned until retired
  if (dyn)
    detail::dynamic_access(d, bytes, true, pc);
  else
    detail::static_access(d, bytes, true, pc);
  for (int i = 0; i < bytes; ++i) {
    detail::Shadow* sh = detail::shadow_of(d + i);
    sh->pending = static_cast<uint16_t>(cur.thread + 1);
    sh->w_pc = pc;
  }
  std::memset(smem_dst, detail::kPoison, bytes);
  detail::g_async[cur.thread].open.push_back(c);
}

void cp_async_commit() {
  auto& q = detail::g_async[cur.thread];
  q.groups.push_back(std::move(q.open));
  q.open.clear();
}

void cp_async_wait(int pending) {
  if (pending == 0) cp_async_commit();  // cp.async.wait_all
  auto& q = detail::g_async[cur.thread];
  while (static_cast<int>(q.groups.size()) > pending) {
    for (const auto& c : q.groups.front()) detail::land(c);
    q.groups.pop_front();
  }
}

__attribute__((noinline)) bool check_aligned(const void* p, int bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % bytes == 0) return true;
  detail::fail_cta("memcheck", std::to_string(bytes) + "-byte vector access at " +
                                   std::to_string(a) + " is misaligned, at " +
                                   site(__builtin_return_address(0)));
  return false;
}

__attribute__((noinline)) float atomic_add(float* p, float v) {
  const void* pc = __builtin_return_address(0);
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a - uintptr_t(detail::g_arena) < detail::kSmemArena || detail::in(detail::g_rw, a)) {
    detail::on_access(p, 4, false, pc);
    detail::on_access(p, 4, true, pc);
  } else if (!check_global(p, 4, true, pc, "atomicAdd")) {
    return 0.f;
  }
  const float old = *p;
  *p = old + v;
  return old;
}

}  // namespace emu

// ---- the hooks the -fsanitize=thread instrumentation of the kernel TUs calls -------------------
#define EMU_HOOK(n)                                                                           \
  extern "C" void __tsan_read##n(void* p) {                                                  \
    emu::detail::on_access(p, n, false, __builtin_return_address(0), true);                  \
  }                                                                                           \
  extern "C" void __tsan_write##n(void* p) {                                                 \
    emu::detail::on_access(p, n, true, __builtin_return_address(0), true);                   \
  }                                                                                           \
  extern "C" void __tsan_unaligned_read##n(void* p) {                                        \
    emu::detail::on_access(p, n, false, __builtin_return_address(0), false);                 \
  }                                                                                           \
  extern "C" void __tsan_unaligned_write##n(void* p) {                                       \
    emu::detail::on_access(p, n, true, __builtin_return_address(0), false);                  \
  }                                                                                           \
  extern "C" void __tsan_volatile_read##n(void* p) {                                         \
    emu::detail::on_access(p, n, false, __builtin_return_address(0), false);                 \
  }                                                                                           \
  extern "C" void __tsan_volatile_write##n(void* p) {                                        \
    emu::detail::on_access(p, n, true, __builtin_return_address(0), false);                  \
  }
EMU_HOOK(1)
EMU_HOOK(2)
EMU_HOOK(4)
EMU_HOOK(8)
EMU_HOOK(16)
extern "C" void __tsan_read_range(void* p, unsigned long n) {
  emu::detail::on_access(p, n, false, __builtin_return_address(0));
}
extern "C" void __tsan_write_range(void* p, unsigned long n) {
  emu::detail::on_access(p, n, true, __builtin_return_address(0));
}
extern "C" void __tsan_init() {}
// Function-local statics (the coverage sites' registration) load their guard byte atomically;
// the emulator runs one OS thread, so a plain load is that atomic load.
extern "C" unsigned char __tsan_atomic8_load(const volatile unsigned char* p, int) { return *p; }
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}
