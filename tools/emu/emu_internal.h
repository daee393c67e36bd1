// tools/emu: state shared by the scheduler (emu_runtime.cpp), the memory checks
// (emu_memory.cpp) and the Python bindings (emu_ops.cpp). Not included by kernel code.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "emu.h"

namespace emu {

// ---- settings the tests choose (Python: set_schedule / set_arch) ------------------------------
enum class Order { kAscending, kDescending, kRandom };
void set_schedule(Order order, uint64_t seed);
Order schedule_order();
// Modelled GPU: compute capability 80, 86, 89 or 90 (its opt-in shared-memory limit).
void set_arch(int sm);
int arch();
size_t arch_max_dynamic_smem(int sm);

// ---- reports -----------------------------------------------------------------------------------
// kind: "racecheck", "initcheck", "memcheck", "synccheck", "launch". Reports fail the launch
// (cudaErrorLaunchFailure) and are kept until take_reports().
void report(const char* kind, const std::string& what);
std::vector<std::string> take_reports();
size_t report_count();
// file:line of a code address inside the emulator module (addr2line), or the raw address.
std::string site(const void* pc);

// ---- global memory the current op may touch (emu_ops registers it) ---------------------------
void register_buffer(const void* lo, size_t bytes, const std::string& name, bool writable);
void clear_buffers();
// Whether [p, p + n) lies in one registered buffer (writable, for writes); reports otherwise.
bool check_global(const void* p, size_t n, bool write, const void* pc, const char* what);

// The self-test kernels (emu_selftest.cpp): runs bug number `bug`, returns the reports.
std::vector<std::string> selftest(int bug, std::vector<float>& out, std::vector<float>& want);

namespace detail {

// The running CTA, as far as the memory checks need it.
struct Current {
  bool in_kernel = false;  // a CUDA thread (not the host) is running
  int thread = 0;
  int warp = 0;
  uint32_t epoch = 1;       // barrier interval; increases at every __syncthreads and CTA
  uint32_t cta_epoch0 = 1;  // first interval of the running CTA
  const char* kernel = "";
  uintptr_t stack_lo = 0, stack_bytes = 0;  // all fiber stacks (never checked)
  char* smem = nullptr;                     // dynamic shared memory of the CTA
  size_t smem_bytes = 0;                    // as the launch requested
  size_t smem_span = 0;                     // requested + guard: checked range
};
extern Current cur;

void new_launch();  // forgets which sites were reported
void smem_begin_cta(int n_threads);
void smem_end_cta();
// ldmatrix rows: a read of `bytes` at `p` by the current warp (checked, recorded).
void smem_read(const void* p, size_t bytes, const void* pc);
// True when the CTA has a fatal error and must be abandoned.
bool cta_failed();
void fail_cta(const char* kind, const std::string& what);

}  // namespace detail
}  // namespace emu
