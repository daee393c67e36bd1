// XLA FFI handlers of the CUDA kernels (symbols rattention_<op>_cuda, registered for the CUDA
// platform by rattention_ext/jax.py when present): the same params filling as the CPU
// handlers (ffi_*_params, Backend::kCuda: bf16/fp16, head dim 64/128), launched on the
// stream XLA gives the call; workspaces come from XLA's scratch allocator. Host code only:
// the kernels are csrc/cuda/*.cu behind their launch headers.
//
// Compiled (not run) by `make cuda-check`; linked into _jax_ffi in a CUDA build.
#include <cuda_runtime_api.h>

#include <string>

#include "cuda/mix_launch.h"
#include "cuda/rla_launch.h"
#include "cuda/swa_launch.h"
#include "jax/ffi_mix_params.h"
#include "jax/ffi_rla_params.h"
#include "jax/ffi_swa_params.h"

namespace rattention::jax_ffi {
namespace {

constexpr Backend kCuda = Backend::kCuda;

void check_launch(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": CUDA kernel launch failed: " +
                             cudaGetErrorString(err));
  }
}

// SMs of the GPU the call runs on (XLA has made its device current).
int current_device_sms() {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess || sms <= 0) {
    throw std::runtime_error(std::string("rla_bwd: cannot read the GPU's SM count: ") +
                             cudaGetErrorString(err));
  }
  return sms;
}

// As check_smem_fits in cuda/ops_cuda_common.h: a clear error before any launch when the
// kernels need more dynamic shared memory per block than this GPU allows.
// The current GPU's opt-in dynamic shared memory per block (bytes).
int64_t device_smem_per_block(const char* op) {
  int device = 0, have = 0;
  check_launch(cudaGetDevice(&device), op);
  check_launch(cudaDeviceGetAttribute(&have, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), op);
  return have;
}

void check_smem_fits(int64_t need, const char* op, int64_t head_dim) {
  const int64_t have = device_smem_per_block(op);
  if (need > have) {
    throw InvalidArgument(std::string(op) + ": the CUDA kernels for head dim " +
                          std::to_string(head_dim) + " need " + std::to_string(need) +
                          " bytes of shared memory per block; this GPU allows " +
                          std::to_string(have) + ". Use head dim 64");
  }
}

float* scratch_floats(ffi::ScratchAllocator& scratch, int64_t n, const char* op) {
  auto ptr = scratch.Allocate(static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float), 256);
  if (!ptr.has_value()) throw std::runtime_error(std::string(op) + ": no scratch memory");
  return static_cast<float*>(*ptr);
}

void check_chunk(int64_t chunk_size) {
  if (chunk_size != cuda::kRlaChunk) {
    throw InvalidArgument("chunk_size: the CUDA RLA kernels use chunk_size=" +
                          std::to_string(cuda::kRlaChunk) + ", got " + std::to_string(chunk_size));
  }
}

ffi::Error swa_fwd_cuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer cos, ffi::AnyBuffer sin, ffi::Result<ffi::AnyBuffer> out,
                        ffi::Result<ffi::AnyBuffer> lse, int64_t window_size,
                        double softmax_scale) {
  return guarded("swa_fwd", [&] {
    const SwaFwdParams p =
        swa_fwd_params(q, k, v, cos, sin, *out, *lse, window_size, softmax_scale, kCuda);
    check_smem_fits(cuda::swa_fwd_smem_bytes(p), "swa_fwd", p.dims.head_dim);
    check_launch(cuda::swa_fwd(p, stream), "swa_fwd_kernel");
  });
}

ffi::Error swa_bwd_cuda(cudaStream_t stream, ffi::ScratchAllocator scratch,
                        ffi::AnyBuffer grad_out, ffi::AnyBuffer grad_lse, ffi::AnyBuffer q,
                        ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                        ffi::AnyBuffer cos, ffi::AnyBuffer sin,
                        ffi::Result<ffi::AnyBuffer> grad_q, ffi::Result<ffi::AnyBuffer> grad_k,
                        ffi::Result<ffi::AnyBuffer> grad_v, int64_t window_size,
                        double softmax_scale) {
  return guarded("swa_bwd", [&] {
    const SwaBwdParams p = swa_bwd_params(grad_out, grad_lse, q, k, v, out, lse, cos, sin,
                                          *grad_q, *grad_k, *grad_v, window_size, softmax_scale,
                                          kCuda);
    check_smem_fits(cuda::swa_bwd_smem_bytes(p), "swa_bwd", p.dims.head_dim);
    float* ws = scratch_floats(scratch, cuda::swa_bwd_workspace_floats(p), "swa_bwd");
    check_launch(cuda::swa_bwd(p, ws, stream), "swa_bwd");
  });
}

ffi::Error rla_fwd_cuda(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer h0, ffi::Result<ffi::AnyBuffer> out,
                        ffi::Result<ffi::AnyBuffer> final_state,
                        ffi::Result<ffi::AnyBuffer> checkpoints, int64_t window_size,
                        std::string_view feature_map, int64_t chunk_size,
                        int64_t checkpoint_every) {
  return guarded("rla_fwd", [&] {
    check_chunk(chunk_size);
    const RlaConfig cfg{window_size, feature_map, chunk_size, checkpoint_every};
    RlaFwdParams p = rla_fwd_params(q, k, v, h0, *out, *final_state, *checkpoints, cfg, kCuda);
    p.max_smem_per_block = device_smem_per_block("rla_fwd");  // picks the configuration
    check_smem_fits(cuda::rla_fwd_smem_bytes(p), "rla_fwd", p.dims.head_dim);
    const int num_sms = current_device_sms();  // sizes the segment parts and the workspace
    const int64_t ws_floats = cuda::rla_fwd_workspace_floats(p, num_sms);
    float* ws = ws_floats > 0 ? scratch_floats(scratch, ws_floats, "rla_fwd") : nullptr;
    check_launch(cuda::rla_fwd(p, num_sms, ws, stream), "rla_fwd");
  });
}

ffi::Error rla_bwd_cuda(cudaStream_t stream, ffi::ScratchAllocator scratch,
                        ffi::AnyBuffer grad_out, ffi::AnyBuffer grad_final_state,
                        ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer h0,
                        ffi::AnyBuffer checkpoints, ffi::Result<ffi::AnyBuffer> grad_q,
                        ffi::Result<ffi::AnyBuffer> grad_k, ffi::Result<ffi::AnyBuffer> grad_v,
                        ffi::Result<ffi::AnyBuffer> grad_h0, int64_t window_size,
                        std::string_view feature_map, int64_t chunk_size,
                        int64_t checkpoint_every) {
  return guarded("rla_bwd", [&] {
    check_chunk(chunk_size);
    const RlaConfig cfg{window_size, feature_map, chunk_size, checkpoint_every};
    RlaBwdParams p = rla_bwd_params(grad_out, grad_final_state, q, k, v, h0, checkpoints,
                                    *grad_q, *grad_k, *grad_v, *grad_h0, cfg, kCuda);
    p.max_smem_per_block = device_smem_per_block("rla_bwd");  // picks the configuration
    check_smem_fits(cuda::rla_bwd_smem_bytes(p), "rla_bwd", p.dims.head_dim);
    const int num_sms = current_device_sms();  // sizes the dk/dv segments and the workspace
    float* ws = scratch_floats(scratch, cuda::rla_bwd_workspace_floats(p, num_sms), "rla_bwd");
    check_launch(cuda::rla_bwd(p, num_sms, ws, stream), "rla_bwd");
  });
}

ffi::Error mix_fwd_cuda(cudaStream_t stream, ffi::AnyBuffer o_swa, ffi::AnyBuffer o_rla,
                        ffi::AnyBuffer swa_weight, ffi::AnyBuffer rla_weight,
                        ffi::Result<ffi::AnyBuffer> out, double eps) {
  return guarded("mix_fwd", [&] {
    const MixParams p = mix_fwd_params(o_swa, o_rla, swa_weight, rla_weight, *out, eps, kCuda);
    check_launch(cuda::mix_fwd(p, stream), "mix_fwd");
  });
}

ffi::Error mix_bwd_cuda(cudaStream_t stream, ffi::ScratchAllocator scratch,
                        ffi::AnyBuffer grad_out, ffi::AnyBuffer o_swa, ffi::AnyBuffer o_rla,
                        ffi::AnyBuffer swa_weight, ffi::AnyBuffer rla_weight,
                        ffi::Result<ffi::AnyBuffer> grad_o_swa,
                        ffi::Result<ffi::AnyBuffer> grad_o_rla,
                        ffi::Result<ffi::AnyBuffer> grad_swa_weight,
                        ffi::Result<ffi::AnyBuffer> grad_rla_weight, double eps) {
  return guarded("mix_bwd", [&] {
    const MixBwdParams p =
        mix_bwd_params(grad_out, o_swa, o_rla, swa_weight, rla_weight, *grad_o_swa, *grad_o_rla,
                       *grad_swa_weight, *grad_rla_weight, eps, kCuda);
    float* ws = scratch_floats(scratch, cuda::mix_bwd_workspace_floats(p), "mix_bwd");
    check_launch(cuda::mix_bwd(p, ws, stream), "mix_bwd");
  });
}

}  // namespace
}  // namespace rattention::jax_ffi

namespace rj = rattention::jax_ffi;
using Buf = rj::ffi::AnyBuffer;
using Stream = rj::ffi::PlatformStream<cudaStream_t>;

RATT_FFI_HANDLER(rattention_swa_fwd_cuda, rj::swa_fwd_cuda,
                 rj::ffi::Ffi::Bind()
                     .Ctx<Stream>()
                     .Arg<Buf>()  // q
                     .Arg<Buf>()  // k
                     .Arg<Buf>()  // v
                     .Arg<Buf>()  // rotary_cos
                     .Arg<Buf>()  // rotary_sin
                     .Ret<Buf>()  // out
                     .Ret<Buf>()  // lse
                     .Attr<int64_t>("window_size")
                     .Attr<double>("softmax_scale"))

RATT_FFI_HANDLER(rattention_swa_bwd_cuda, rj::swa_bwd_cuda,
                 rj::ffi::Ffi::Bind()
                     .Ctx<Stream>()
                     .Ctx<rj::ffi::ScratchAllocator>()
                     .Arg<Buf>()  // grad_out
                     .Arg<Buf>()  // grad_lse
                     .Arg<Buf>()  // q
                     .Arg<Buf>()  // k
                     .Arg<Buf>()  // v
                     .Arg<Buf>()  // out
                     .Arg<Buf>()  // lse
                     .Arg<Buf>()  // rotary_cos
                     .Arg<Buf>()  // rotary_sin
                     .Ret<Buf>()  // grad_q
                     .Ret<Buf>()  // grad_k
                     .Ret<Buf>()  // grad_v
                     .Attr<int64_t>("window_size")
                     .Attr<double>("softmax_scale"))

RATT_FFI_HANDLER(rattention_rla_fwd_cuda, rj::rla_fwd_cuda,
                 rj::ffi::Ffi::Bind()
                     .Ctx<Stream>()
                     .Ctx<rj::ffi::ScratchAllocator>()
                     .Arg<Buf>()  // q
                     .Arg<Buf>()  // k
                     .Arg<Buf>()  // v
                     .Arg<Buf>()  // initial_state
                     .Ret<Buf>()  // out
                     .Ret<Buf>()  // final_state
                     .Ret<Buf>()  // checkpoints
                     .Attr<int64_t>("window_size")
                     .Attr<std::string_view>("feature_map")
                     .Attr<int64_t>("chunk_size")
                     .Attr<int64_t>("checkpoint_every"))

RATT_FFI_HANDLER(rattention_rla_bwd_cuda, rj::rla_bwd_cuda,
                 rj::ffi::Ffi::Bind()
                     .Ctx<Stream>()
                     .Ctx<rj::ffi::ScratchAllocator>()
                     .Arg<Buf>()  // grad_out
                     .Arg<Buf>()  // grad_final_state
                     .Arg<Buf>()  // q
                     .Arg<Buf>()  // k
                     .Arg<Buf>()  // v
                     .Arg<Buf>()  // initial_state
                     .Arg<Buf>()  // checkpoints
                     .Ret<Buf>()  // grad_q
                     .Ret<Buf>()  // grad_k
                     .Ret<Buf>()  // grad_v
                     .Ret<Buf>()  // grad_initial_state
                     .Attr<int64_t>("window_size")
                     .Attr<std::string_view>("feature_map")
                     .Attr<int64_t>("chunk_size")
                     .Attr<int64_t>("checkpoint_every"))

RATT_FFI_HANDLER(rattention_mix_fwd_cuda, rj::mix_fwd_cuda,
                 rj::ffi::Ffi::Bind()
                     .Ctx<Stream>()
                     .Arg<Buf>()  // o_swa
                     .Arg<Buf>()  // o_rla
                     .Arg<Buf>()  // swa_weight
                     .Arg<Buf>()  // rla_weight
                     .Ret<Buf>()  // out
                     .Attr<double>("eps"))

RATT_FFI_HANDLER(rattention_mix_bwd_cuda, rj::mix_bwd_cuda,
                 rj::ffi::Ffi::Bind()
                     .Ctx<Stream>()
                     .Ctx<rj::ffi::ScratchAllocator>()
                     .Arg<Buf>()  // grad_out
                     .Arg<Buf>()  // o_swa
                     .Arg<Buf>()  // o_rla
                     .Arg<Buf>()  // swa_weight
                     .Arg<Buf>()  // rla_weight
                     .Ret<Buf>()  // grad_o_swa
                     .Ret<Buf>()  // grad_o_rla
                     .Ret<Buf>()  // grad_swa_weight
                     .Ret<Buf>()  // grad_rla_weight
                     .Attr<double>("eps"))
