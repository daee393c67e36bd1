// XLA FFI handlers of the RMS mixing kernels (CPU):
//   rattention_mix_fwd_cpu: o_swa, o_rla, swa_weight, rla_weight -> out
//   rattention_mix_bwd_cpu: grad_out, o_swa, o_rla, swa_weight, rla_weight
//                           -> grad_o_swa, grad_o_rla, grad_swa_weight, grad_rla_weight
// Branch outputs, weights and the gradients are in acc type (float32 / float64); out and
// grad_out in q's dtype. Attribute: eps (float64).
#include <string>

#include "cpu/kernels.h"
#include "jax/ffi_mix_params.h"

namespace rattention::jax_ffi {
namespace {

struct MixDims {
  int64_t B, T, H, D;
  DType acc;
  ffi::DataType ffi_acc;
};

// o_swa sets the shape and acc dtype; o_rla and both weights must agree.
MixDims check_mix(const ffi::AnyBuffer& o_swa, const ffi::AnyBuffer& o_rla,
                  const ffi::AnyBuffer& swa_weight, const ffi::AnyBuffer& rla_weight, double eps,
                  Backend backend) {
  const auto od = o_swa.dimensions();
  if (od.size() != 4) throw InvalidArgument("o_swa must be [B, T, Hq, D], got " + dims_str(od));
  const auto et = o_swa.element_type();
  if (et != ffi::DataType::F32 && et != ffi::DataType::F64) {
    throw InvalidArgument("o_swa must be float32 or float64 (the accumulation type)");
  }
  MixDims m{od[0], od[1], od[2], od[3],
            et == ffi::DataType::F64 ? DType::kFloat64 : DType::kFloat32, et};
  if (backend == Backend::kCuda && (et != ffi::DataType::F32 || m.D > 256)) {
    throw InvalidArgument("o_swa: the CUDA mixing kernels take float32 branch outputs and head "
                          "dim <= 256");
  }
  check_buffer(o_rla, "o_rla", et, {m.B, m.T, m.H, m.D});
  check_buffer(swa_weight, "swa_norm_weight", et, {m.H, m.D});
  check_buffer(rla_weight, "rla_norm_weight", et, {m.H, m.D});
  check_finite_positive(eps, "norm_eps");
  return m;
}

// out / grad_out dtype: float64 with float64 acc; float32 or bfloat16 with float32 acc.
DType io_dtype(const ffi::AnyBuffer& b, const char* name, const MixDims& m, Backend backend) {
  // float32 grad_out / out is fine on CUDA too (the CPU rule adds it to bf16 / fp16).
  const DType dt = b.element_type() == ffi::DataType::F32 ? DType::kFloat32
                                                          : input_dtype(b, name, backend);
  if ((m.acc == DType::kFloat64) != (dt == DType::kFloat64)) {
    throw InvalidArgument(std::string(name) + " dtype does not match the accumulation dtype");
  }
  return dt;
}

}  // namespace

MixParams mix_fwd_params(const ffi::AnyBuffer& o_swa, const ffi::AnyBuffer& o_rla,
                         const ffi::AnyBuffer& swa_weight, const ffi::AnyBuffer& rla_weight,
                         ffi::AnyBuffer& out, double eps, Backend backend) {
  const MixDims m = check_mix(o_swa, o_rla, swa_weight, rla_weight, eps, backend);
  const DType out_dt = io_dtype(out, "out", m, backend);
  check_buffer(out, "out", out.element_type(), {m.B, m.T, m.H, m.D});
  MixParams p{};
  p.rows = m.B * m.T * m.H;
  p.heads_q = m.H;
  p.head_dim = m.D;
  p.acc_dtype = m.acc;
  p.out_dtype = out_dt;
  p.o_swa = o_swa.untyped_data();
  p.o_rla = o_rla.untyped_data();
  p.swa_weight = swa_weight.untyped_data();
  p.rla_weight = rla_weight.untyped_data();
  p.out = out.untyped_data();
  p.eps = eps;
  return p;
}

MixBwdParams mix_bwd_params(const ffi::AnyBuffer& grad_out, const ffi::AnyBuffer& o_swa,
                            const ffi::AnyBuffer& o_rla, const ffi::AnyBuffer& swa_weight,
                            const ffi::AnyBuffer& rla_weight, ffi::AnyBuffer& grad_o_swa,
                            ffi::AnyBuffer& grad_o_rla, ffi::AnyBuffer& grad_swa_weight,
                            ffi::AnyBuffer& grad_rla_weight, double eps, Backend backend) {
  const MixDims m = check_mix(o_swa, o_rla, swa_weight, rla_weight, eps, backend);
  const DType grad_dt = io_dtype(grad_out, "grad_out", m, backend);
  check_buffer(grad_out, "grad_out", grad_out.element_type(), {m.B, m.T, m.H, m.D});
  check_buffer(grad_o_swa, "grad_o_swa", m.ffi_acc, {m.B, m.T, m.H, m.D});
  check_buffer(grad_o_rla, "grad_o_rla", m.ffi_acc, {m.B, m.T, m.H, m.D});
  check_buffer(grad_swa_weight, "grad_swa_norm_weight", m.ffi_acc, {m.H, m.D});
  check_buffer(grad_rla_weight, "grad_rla_norm_weight", m.ffi_acc, {m.H, m.D});
  MixBwdParams p{};
  p.rows = m.B * m.T * m.H;
  p.heads_q = m.H;
  p.head_dim = m.D;
  p.acc_dtype = m.acc;
  p.grad_dtype = grad_dt;
  p.grad_out = grad_out.untyped_data();
  p.o_swa = o_swa.untyped_data();
  p.o_rla = o_rla.untyped_data();
  p.swa_weight = swa_weight.untyped_data();
  p.rla_weight = rla_weight.untyped_data();
  p.grad_o_swa = grad_o_swa.untyped_data();
  p.grad_o_rla = grad_o_rla.untyped_data();
  p.grad_swa_weight = grad_swa_weight.untyped_data();
  p.grad_rla_weight = grad_rla_weight.untyped_data();
  p.eps = eps;
  return p;
}

namespace {

ffi::Error mix_fwd_cpu(ffi::AnyBuffer o_swa, ffi::AnyBuffer o_rla, ffi::AnyBuffer swa_weight,
                       ffi::AnyBuffer rla_weight, ffi::Result<ffi::AnyBuffer> out, double eps) {
  return guarded("mix_fwd", [&] {
    cpu::mix_fwd(mix_fwd_params(o_swa, o_rla, swa_weight, rla_weight, *out, eps));
  });
}

ffi::Error mix_bwd_cpu(ffi::AnyBuffer grad_out, ffi::AnyBuffer o_swa, ffi::AnyBuffer o_rla,
                       ffi::AnyBuffer swa_weight, ffi::AnyBuffer rla_weight,
                       ffi::Result<ffi::AnyBuffer> grad_o_swa,
                       ffi::Result<ffi::AnyBuffer> grad_o_rla,
                       ffi::Result<ffi::AnyBuffer> grad_swa_weight,
                       ffi::Result<ffi::AnyBuffer> grad_rla_weight, double eps) {
  return guarded("mix_bwd", [&] {
    cpu::mix_bwd(mix_bwd_params(grad_out, o_swa, o_rla, swa_weight, rla_weight, *grad_o_swa,
                                *grad_o_rla, *grad_swa_weight, *grad_rla_weight, eps));
  });
}

}  // namespace
}  // namespace rattention::jax_ffi

namespace rj = rattention::jax_ffi;

RATT_FFI_HANDLER(rattention_mix_fwd_cpu, rj::mix_fwd_cpu,
                 rj::ffi::Ffi::Bind()
                     .Arg<rj::ffi::AnyBuffer>()  // o_swa
                     .Arg<rj::ffi::AnyBuffer>()  // o_rla
                     .Arg<rj::ffi::AnyBuffer>()  // swa_weight
                     .Arg<rj::ffi::AnyBuffer>()  // rla_weight
                     .Ret<rj::ffi::AnyBuffer>()  // out
                     .Attr<double>("eps"))

RATT_FFI_HANDLER(rattention_mix_bwd_cpu, rj::mix_bwd_cpu,
                 rj::ffi::Ffi::Bind()
                     .Arg<rj::ffi::AnyBuffer>()  // grad_out
                     .Arg<rj::ffi::AnyBuffer>()  // o_swa
                     .Arg<rj::ffi::AnyBuffer>()  // o_rla
                     .Arg<rj::ffi::AnyBuffer>()  // swa_weight
                     .Arg<rj::ffi::AnyBuffer>()  // rla_weight
                     .Ret<rj::ffi::AnyBuffer>()  // grad_o_swa
                     .Ret<rj::ffi::AnyBuffer>()  // grad_o_rla
                     .Ret<rj::ffi::AnyBuffer>()  // grad_swa_weight
                     .Ret<rj::ffi::AnyBuffer>()  // grad_rla_weight
                     .Attr<double>("eps"))
