// Mixing of the two branches (forward and backward), one row per (token, query head).
#include <stdexcept>
#include <vector>

#include "../core/rms_mix.h"
#include "kernels.h"
#include "parallel.h"

namespace rattention::cpu {
namespace {

template <typename acc_t, typename out_t>
void mix_fwd_impl(const MixParams& p) {
  const int D = static_cast<int>(p.head_dim);
  const auto* a = static_cast<const acc_t*>(p.o_swa);
  const auto* b = static_cast<const acc_t*>(p.o_rla);
  const auto* ga = static_cast<const acc_t*>(p.swa_weight);
  const auto* gb = static_cast<const acc_t*>(p.rla_weight);
  auto* out = static_cast<out_t*>(p.out);
  const acc_t eps = static_cast<acc_t>(p.eps);
  parallel_for(p.rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t* ar = a + r * D;
      const acc_t* br = b + r * D;
      const int64_t h = r % p.heads_q;
      const acc_t ra = rms_inv(ar, D, eps), rb = rms_inv(br, D, eps);
      for (int i = 0; i < D; ++i) {
        const acc_t y = ar[i] * ra * ga[h * D + i] + br[i] * rb * gb[h * D + i];
        out[r * D + i] = Convert<out_t>::store(y);
      }
    }
  });
}

template <typename acc_t, typename grad_t>
void mix_bwd_impl(const MixBwdParams& p) {
  const int D = static_cast<int>(p.head_dim);
  const int64_t H = p.heads_q;
  const auto* go = static_cast<const grad_t*>(p.grad_out);
  const auto* a = static_cast<const acc_t*>(p.o_swa);
  const auto* b = static_cast<const acc_t*>(p.o_rla);
  const auto* ga = static_cast<const acc_t*>(p.swa_weight);
  const auto* gb = static_cast<const acc_t*>(p.rla_weight);
  auto* da = static_cast<acc_t*>(p.grad_o_swa);
  auto* db = static_cast<acc_t*>(p.grad_o_rla);
  const acc_t eps = static_cast<acc_t>(p.eps);
  // Weight gradients: each task sums into its own partial buffer, reduced at the end so
  // the result does not depend on the thread count's interleaving beyond chunking.
  const int64_t grain = 256;
  const int64_t n_tasks = (p.rows + grain - 1) / grain;
  std::vector<acc_t> partial(static_cast<size_t>(n_tasks) * 2 * H * D, acc_t(0));
  parallel_for(n_tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> dy(D);
    for (int64_t task = t0; task < t1; ++task) {
      acc_t* pa = partial.data() + task * 2 * H * D;
      acc_t* pb = pa + H * D;
      const int64_t r_end = task * grain + grain < p.rows ? task * grain + grain : p.rows;
      for (int64_t r = task * grain; r < r_end; ++r) {
        const int64_t h = r % H;
        for (int i = 0; i < D; ++i) dy[i] = Convert<grad_t>::load(go[r * D + i]);
        const acc_t ra = rms_inv(a + r * D, D, eps), rb = rms_inv(b + r * D, D, eps);
        rms_scale_backward(a + r * D, ga + h * D, dy.data(), ra, D, da + r * D, pa + h * D);
        rms_scale_backward(b + r * D, gb + h * D, dy.data(), rb, D, db + r * D, pb + h * D);
      }
    }
  });
  auto* dga = static_cast<acc_t*>(p.grad_swa_weight);
  auto* dgb = static_cast<acc_t*>(p.grad_rla_weight);
  for (int64_t i = 0; i < H * D; ++i) {
    acc_t sa = 0, sb = 0;
    for (int64_t task = 0; task < n_tasks; ++task) {
      sa += partial[task * 2 * H * D + i];
      sb += partial[task * 2 * H * D + H * D + i];
    }
    dga[i] = sa;
    dgb[i] = sb;
  }
}

}  // namespace

void mix_fwd(const MixParams& p) {
  if (p.acc_dtype == DType::kFloat64) return mix_fwd_impl<double, double>(p);
  switch (p.out_dtype) {
    case DType::kFloat32: return mix_fwd_impl<float, float>(p);
    case DType::kBFloat16: return mix_fwd_impl<float, bf16_t>(p);
    default: throw std::invalid_argument("mix_fwd: unsupported output dtype on CPU");
  }
}

void mix_bwd(const MixBwdParams& p) {
  if (p.acc_dtype == DType::kFloat64) return mix_bwd_impl<double, double>(p);
  switch (p.grad_dtype) {
    case DType::kFloat32: return mix_bwd_impl<float, float>(p);
    case DType::kBFloat16: return mix_bwd_impl<float, bf16_t>(p);
    default: throw std::invalid_argument("mix_bwd: unsupported gradient dtype on CPU");
  }
}

}  // namespace rattention::cpu
