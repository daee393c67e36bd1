#include "jax/ffi_common.h"

#include <limits>
#include <sstream>
#include <string>

namespace rattention::jax_ffi {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw InvalidArgument(msg); }

const char* dtype_name(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F16: return "float16";
    default: return "a non-float dtype";
  }
}

}  // namespace

std::string dims_str(ffi::AnyBuffer::Dimensions d) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < d.size(); ++i) s << (i ? ", " : "") << d[i];
  s << "]";
  return s.str();
}

DType input_dtype(const ffi::AnyBuffer& b, const char* name, Backend backend) {
  const auto t = b.element_type();
  if (backend == Backend::kCuda) {
    if (t == ffi::DataType::BF16) return DType::kBFloat16;
    if (t == ffi::DataType::F16) return DType::kFloat16;
    fail(std::string(name) + ": the CUDA kernels support bfloat16 and float16, got " +
         dtype_name(t) + " (use the CPU platform or the reference for float32/float64)");
  }
  switch (t) {
    case ffi::DataType::F32: return DType::kFloat32;
    case ffi::DataType::F64: return DType::kFloat64;
    case ffi::DataType::BF16: return DType::kBFloat16;
    default:
      fail(std::string(name) + ": the CPU kernels support float32, float64 and bfloat16, got " +
           dtype_name(t));
  }
}

ffi::DataType acc_of(DType dt) {
  return dt == DType::kFloat64 ? ffi::DataType::F64 : ffi::DataType::F32;
}

void check_buffer(const ffi::AnyBuffer& b, const char* name, ffi::DataType dtype,
                  std::initializer_list<int64_t> shape) {
  if (b.element_type() != dtype) {
    fail(std::string(name) + " must have dtype " + dtype_name(dtype) + ", got " +
         dtype_name(b.element_type()));
  }
  const auto d = b.dimensions();
  bool ok = d.size() == shape.size();
  size_t i = 0;
  for (int64_t s : shape) ok = ok && d[i++] == s;
  if (!ok) {
    std::ostringstream want;
    want << "[";
    i = 0;
    for (int64_t s : shape) want << (i++ ? ", " : "") << s;
    want << "]";
    fail(std::string(name) + " must have shape " + want.str() + ", got " + dims_str(d));
  }
}

bool check_optional(const ffi::AnyBuffer& b, const char* name, ffi::DataType dtype,
                    std::initializer_list<int64_t> shape) {
  if (b.element_count() == 0) return false;
  check_buffer(b, name, dtype, shape);
  return true;
}

QkvInfo check_qkv(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                  Backend backend) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4) fail("q must be 4-D [B, T, Hq, D], got shape " + dims_str(qd));
  if (kd.size() != 4) fail("k must be 4-D [B, T, Hkv, D], got shape " + dims_str(kd));
  if (vd.size() != 4) fail("v must be 4-D [B, T, Hkv, D], got shape " + dims_str(vd));
  const DType dt = input_dtype(q, "q", backend);
  if (k.element_type() != q.element_type() || v.element_type() != q.element_type()) {
    fail(std::string(k.element_type() != q.element_type() ? "k" : "v") +
         " must have the dtype of q (" + dtype_name(q.element_type()) + ")");
  }
  for (int i = 0; i < 4; ++i) {
    if (vd[i] != kd[i]) fail("v must have the shape of k " + dims_str(kd) + ", got " + dims_str(vd));
  }
  const int64_t B = qd[0], T = qd[1], Hq = qd[2], D = qd[3], Hkv = kd[2];
  if (kd[0] != B) fail("k must have batch size " + std::to_string(B) + " (from q)");
  if (kd[1] != T) fail("k must have sequence length " + std::to_string(T) + " (from q)");
  if (kd[3] != D) fail("k must have head dim " + std::to_string(D) + " (from q)");
  if (Hkv < 1 || Hq % Hkv != 0) {
    fail("q heads (" + std::to_string(Hq) + ") must be a multiple of k/v heads (" +
         std::to_string(Hkv) + ")");
  }
  if (D < 2 || D % 2 != 0 || D > 256) {
    fail("head dim must be even and in [2, 256], got " + std::to_string(D));
  }
  if (backend == Backend::kCuda && D != 64 && D != 128) {
    fail("q: the CUDA kernels support head dim 64 and 128, got " + std::to_string(D));
  }
  return QkvInfo{AttnDims{B, T, Hq, Hkv, D, /*seqlen_k=*/T}, dt, q.element_type(), acc_of(dt)};
}

void check_window(int64_t window_size) {
  if (window_size < 0) fail("window_size must be >= 0, got " + std::to_string(window_size));
}

// The Python layer checks these too; a custom call made without it (an exported artifact,
// jax.ffi.ffi_call) gets the same rule from the handler.
void check_finite_positive(double x, const char* name) {
  if (!(x > 0 && x < std::numeric_limits<double>::infinity())) {
    fail(std::string(name) + " must be a finite number > 0, got " + std::to_string(x));
  }
}

Strides4 contiguous_strides(const AttnDims& d, int64_t heads) {
  const int64_t D = d.head_dim;
  return Strides4{d.seqlen * heads * D, heads * D, D, 1};
}

Rotary check_rotary(const ffi::AnyBuffer& cos, const ffi::AnyBuffer& sin, const QkvInfo& info) {
  const bool has_cos = cos.element_count() > 0, has_sin = sin.element_count() > 0;
  if (has_cos != has_sin) fail("rotary_cos and rotary_sin must be given together");
  if (!has_cos) return {};
  const auto cd = cos.dimensions();
  if (cd.size() != 2 || cd[1] != info.dims.head_dim / 2 || cd[0] < info.dims.seqlen) {
    fail("rotary_cos must be [P >= " + std::to_string(info.dims.seqlen) + ", " +
         std::to_string(info.dims.head_dim / 2) + "], got " + dims_str(cd));
  }
  check_buffer(cos, "rotary_cos", info.acc, {cd[0], cd[1]});
  check_buffer(sin, "rotary_sin", info.acc, {cd[0], cd[1]});
  return Rotary{cos.untyped_data(), sin.untyped_data()};
}

}  // namespace rattention::jax_ffi
