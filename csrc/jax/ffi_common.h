// Shared by the XLA FFI handlers (ffi_swa.cpp, ffi_rla.cpp, ffi_mix.cpp): buffer checks, dtype
// mapping, strides, and the export macro. The handlers fill the same params structs
// (core/params.h) as the torch op layer and call the same kernels (cpu/kernels.h).
//
// Buffers arrive in XLA's default (row-major, contiguous) layout. An optional input is passed
// as a zero-size buffer. rattention_ext/jax.py validates everything first, with the torch
// API's messages; the checks here guard the C ABI against a direct call with wrong buffers.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "core/params.h"
#include "xla/ffi/api/ffi.h"

namespace rattention::jax_ffi {

namespace ffi = ::xla::ffi;

// Thrown by the checks; the handler boundary turns it into an INVALID_ARGUMENT error.
struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Which kernels a handler runs: the dtype / head-dim rules differ (as in op_common).
enum class Backend { kCpu, kCuda };

std::string dims_str(ffi::AnyBuffer::Dimensions d);
// Kernel dtype of an input buffer: float32, float64, bfloat16 on CPU; bfloat16, float16 on
// CUDA. Throws for anything else.
DType input_dtype(const ffi::AnyBuffer& b, const char* name, Backend backend = Backend::kCpu);
// The accumulation dtype the kernels use for `dt` (float64 for float64, otherwise float32).
ffi::DataType acc_of(DType dt);

// Throws InvalidArgument unless `b` has exactly this dtype and shape.
void check_buffer(const ffi::AnyBuffer& b, const char* name, ffi::DataType dtype,
                  std::initializer_list<int64_t> shape);
// An optional input: zero-size means absent (returns false), otherwise checked as above.
bool check_optional(const ffi::AnyBuffer& b, const char* name, ffi::DataType dtype,
                    std::initializer_list<int64_t> shape);

// Dims and dtype of q [B, T, Hq, D], k, v [B, T, Hkv, D], as op_common's check_qkv requires.
struct QkvInfo {
  AttnDims dims;
  DType dtype;
  ffi::DataType ffi_dtype;
  ffi::DataType acc;
};
QkvInfo check_qkv(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                  Backend backend = Backend::kCpu);
void check_window(int64_t window_size);
void check_finite_positive(double x, const char* name);  // softmax_scale, norm_eps

// Row-major strides of a [B, T, H, D] buffer (elements).
Strides4 contiguous_strides(const AttnDims& d, int64_t heads);

// Rotary tables [P >= T, D/2] in acc type (both or neither); nullptr pointers when absent.
struct Rotary {
  const void* cos = nullptr;
  const void* sin = nullptr;
};
Rotary check_rotary(const ffi::AnyBuffer& cos, const ffi::AnyBuffer& sin, const QkvInfo& info);

// Runs the body of a handler; exceptions (ours and the kernels') become FFI errors, so
// nothing ever unwinds into XLA.
template <typename F>
ffi::Error guarded(const char* op, F&& body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const std::invalid_argument& e) {
    return ffi::Error::InvalidArgument(std::string("rattention_ext.jax ") + op + ": " + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("rattention_ext.jax ") + op + ": " + e.what());
  }
}

}  // namespace rattention::jax_ffi

// Defines the exported C symbol `symbol` (what rattention_ext/jax.py registers with
// jax.ffi.register_ffi_target) for the handler `impl` with the binding `binding`.
#define RATT_FFI_HANDLER(symbol, impl, binding)                              \
  extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* symbol(   \
      XLA_FFI_CallFrame* call_frame) {                                       \
    XLA_FFI_DEFINE_HANDLER(handler, impl, binding);                          \
    return (*handler)(call_frame);                                           \
  }
