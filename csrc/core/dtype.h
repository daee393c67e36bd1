// Element types as the kernels see them: plain storage structs, no torch headers.
// The op layer maps at::ScalarType onto DType and hands kernels `void*` data.
#pragma once
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace rattention {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// bfloat16 storage (upper 16 bits of an IEEE float32). Host-side conversion only;
// CUDA kernels use cutlass/cuda types directly.
struct bf16_t {
  uint16_t bits;
};

inline float bf16_to_float(bf16_t x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, NaN preserved (same rounding as torch / c10::BFloat16).
inline bf16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

// Load/store helpers so CPU kernels can be written once for every storage type.
template <typename T> struct Convert;
template <> struct Convert<float> {
  static inline float load(float x) { return x; }
  static inline float store(float x) { return x; }
};
template <> struct Convert<double> {
  static inline double load(double x) { return x; }
  static inline double store(double x) { return x; }
};
template <> struct Convert<bf16_t> {
  static inline float load(bf16_t x) { return bf16_to_float(x); }
  static inline bf16_t store(float x) { return float_to_bf16(x); }
};

// Accumulation type: float64 inputs accumulate in float64, everything else in float32.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

}  // namespace rattention
