#include "op_common.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/window.h"

namespace rattention {
namespace {

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// [B, T, H, D] strides, or [total, H, D] ones (packed) with batch stride 0.
Strides4 strides_of(const at::Tensor& t) {
  if (t.dim() == 3) return Strides4{0, t.stride(0), t.stride(1), t.stride(2)};
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Kernels read rows of D contiguous values; anything else is copied once here.
at::Tensor rows_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

// The CUDA kernels move q, k, v (and the RLA backward's fp32 grad_out) in 16-byte pieces
// (cp.async in SWA, vector loads in RLA): rows contiguous along the last dim, the data 16-byte
// aligned and every other stride a whole number of 16-byte pieces. Any other view (a slice at
// an odd element offset, an odd stride) is copied to a fresh contiguous tensor here rather
// than faulting there.
at::Tensor rows_16byte_aligned(const at::Tensor& t) {
  const int64_t per_piece = 16 / t.element_size();
  bool ok = t.dim() > 0 && t.stride(-1) == 1 &&
            reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t i = 0; ok && i + 1 < t.dim(); ++i) ok = t.size(i) <= 1 || t.stride(i) % per_piece == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name,
              " must be a floating-point tensor, got dtype ", t.scalar_type());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as q (", ref.device(),
              "), got ", t.device());
}

void check_acc_tensor(const at::Tensor& t, const char* name, at::ScalarType acc,
                      at::IntArrayRef shape, const at::Tensor& like) {
  TORCH_CHECK(t.defined(), name, " must be a tensor");
  check_same_device(t, like, name);
  TORCH_CHECK(t.scalar_type() == acc, name, " must have dtype ", acc, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", shape_str(t));
}

}  // namespace

at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

FeatureMap parse_feature_map(const std::string& name) {
  if (name == "softmax") return FeatureMap::kSoftmax;
  if (name == "relu") return FeatureMap::kRelu;
  TORCH_CHECK_VALUE(false, "feature_map must be 'softmax' or 'relu', got '", name, "'");
}

void check_window(int64_t window_size) {
  TORCH_CHECK_VALUE(window_size >= 0, "window_size must be >= 0, got ", window_size);
}

int64_t clamp_window(int64_t window_size, int64_t seqlen) {
  check_window(window_size);
  return window_size < seqlen ? window_size : seqlen;
}

// A window of at least the key rows sees every key: clamped to them (k [B, T_k, H, D] or
// packed [total, H, D]) before any arithmetic on it, so no window size can overflow.
int64_t clamp_window_to_keys(int64_t window_size, const at::Tensor& k) {
  const int64_t key_rows = k.defined() && k.dim() >= 3 ? k.size(k.dim() - 3) : 0;
  return clamp_window(window_size, key_rows);
}

void check_softmax_scale(double softmax_scale) {
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale) && softmax_scale > 0,
                    "softmax_scale must be a finite number > 0, got ", softmax_scale);
}

void check_norm_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0,
                    "norm_eps must be a finite number > 0 (an all-zero branch output then mixes "
                    "in as zero), got ", eps);
}

namespace {
// q, k, v: same device and dtype, a dtype the backend's kernels take, k and v of one shape.
// Returns the dtype.
at::ScalarType check_qkv_dtypes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                bool cuda_backend) {
  check_same_device(k, q, "k");
  check_same_device(v, q, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k must have the dtype of q (",
              q.scalar_type(), "), got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), "v must have the dtype of q (",
              q.scalar_type(), "), got ", v.scalar_type());
  const auto dt = q.scalar_type();
  if (cuda_backend) {
    TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf,
                "q: the CUDA kernels support bfloat16 and float16, got ", dt,
                " (use the CPU backend or the reference for float32/float64)");
  } else {
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16,
                "q: the CPU kernels support float32, float64 and bfloat16, got ", dt);
  }
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "v must have the shape of k ", shape_str(k), ", got ",
                    shape_str(v));
  return dt;
}

// Head counts (GQA) and the head dim the kernels take.
void check_heads(int64_t Hq, int64_t Hkv, int64_t D, bool cuda_backend) {
  TORCH_CHECK_VALUE((Hkv >= 1 && Hq % Hkv == 0) || (Hkv == 0 && Hq == 0), "q heads (", Hq,
                    ") must be a multiple of k/v heads (", Hkv, ")");
  TORCH_CHECK_VALUE(D >= 2 && D % 2 == 0 && D <= 256, "head dim must be even and in [2, 256], got ",
                    D);
  if (cuda_backend) {
    TORCH_CHECK_VALUE(D == 64 || D == 128, "q: the CUDA kernels support head dim 64 and 128, got ",
                      D);
  }
}
}  // namespace

QkvInfo check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  bool cuda_backend) {
  check_float_tensor(q, "q");
  check_float_tensor(k, "k");
  check_float_tensor(v, "v");
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be 4-D [B, T, Hq, D], got shape ", shape_str(q));
  TORCH_CHECK_VALUE(k.dim() == 4, "k must be 4-D [B, T, Hkv, D], got shape ", shape_str(k));
  TORCH_CHECK_VALUE(v.dim() == 4, "v must be 4-D [B, T, Hkv, D], got shape ", shape_str(v));
  const auto dt = check_qkv_dtypes(q, k, v, cuda_backend);
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3), Hkv = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B, "k must have batch size ", B, " (from q), got ", k.size(0));
  TORCH_CHECK_VALUE(k.size(1) == T, "k must have sequence length ", T, " (from q), got ",
                    k.size(1));
  TORCH_CHECK_VALUE(k.size(3) == D, "k must have head dim ", D, " (from q), got ", k.size(3));
  check_heads(Hq, Hkv, D, cuda_backend);
  return QkvInfo{AttnDims{B, T, Hq, Hkv, D, T}, dt};
}

std::tuple<at::Tensor, at::Tensor> prepare_rotary(const c10::optional<at::Tensor>& cos,
                                                  const c10::optional<at::Tensor>& sin,
                                                  int64_t min_positions, int64_t head_dim,
                                                  const at::Tensor& like) {
  const bool has_cos = cos.has_value() && cos->defined();
  const bool has_sin = sin.has_value() && sin->defined();
  TORCH_CHECK_VALUE(has_cos == has_sin, "rotary_cos and rotary_sin must be given together");
  if (!has_cos) return {at::Tensor(), at::Tensor()};
  const auto acc = acc_scalar_type(like.scalar_type());
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{*cos, "rotary_cos"},
                         std::pair<const at::Tensor&, const char*>{*sin, "rotary_sin"}}) {
    check_float_tensor(t, name);
    check_same_device(t, like, name);
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == head_dim / 2, name,
                      " must be [positions, D/2] = [P, ", head_dim / 2, "], got ", shape_str(t));
    TORCH_CHECK_VALUE(t.size(0) >= min_positions, name, " has ", t.size(0),
                      " positions but ", min_positions, " are needed (one row per token position)");
  }
  return {cos->to(acc).contiguous(), sin->to(acc).contiguous()};
}

at::Tensor prepare_initial_state(const c10::optional<at::Tensor>& h0, const AttnDims& d,
                                 const at::Tensor& like) {
  if (!h0.has_value() || !h0->defined()) return at::Tensor();
  const at::Tensor& t = *h0;
  check_float_tensor(t, "initial_state");
  check_same_device(t, like, "initial_state");
  TORCH_CHECK_VALUE(t.dim() == 4 && (t.size(0) == d.batch || t.size(0) == 1) &&
                        t.size(1) == d.heads_q && t.size(2) == 2 * d.head_dim &&
                        t.size(3) == d.head_dim,
                    "initial_state must be [B or 1, Hq, 2D, D] = [", d.batch, " or 1, ", d.heads_q,
                    ", ", 2 * d.head_dim, ", ", d.head_dim, "], got ", shape_str(t));
  return t.to(acc_scalar_type(like.scalar_type())).contiguous();
}

namespace {

// cu_seqlens: int32 [N+1] on q's device; on the host also its values (see op_common.h).
at::Tensor check_cu_seqlens(const at::Tensor& cu, int64_t total, const at::Tensor& q) {
  TORCH_CHECK(cu.scalar_type() == at::kInt, "cu_seqlens must be an int32 tensor, got dtype ",
              cu.scalar_type());
  TORCH_CHECK(cu.device() == q.device(), "cu_seqlens must be on the device of q (", q.device(),
              "), got ", cu.device());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1,
                    "cu_seqlens must be 1-D [N+1] (document offsets), got shape ", shape_str(cu));
  TORCH_CHECK_VALUE(total <= std::numeric_limits<int32_t>::max(), "cu_seqlens: total rows ",
                    total, " do not fit int32");
  at::Tensor c = cu.contiguous();
  if (c.is_cpu()) {
    const int32_t* x = c.data_ptr<int32_t>();
    const int64_t n = c.size(0);
    TORCH_CHECK_VALUE(x[0] == 0, "cu_seqlens must start at 0, got cu_seqlens[0] = ", x[0]);
    for (int64_t i = 1; i < n; ++i) {
      TORCH_CHECK_VALUE(x[i] >= x[i - 1], "cu_seqlens must be non-decreasing, got cu_seqlens[",
                        i, "] = ", x[i], " < cu_seqlens[", i - 1, "] = ", x[i - 1]);
    }
    TORCH_CHECK_VALUE(x[n - 1] == total, "cu_seqlens must end at the total number of rows ",
                      total, " (q.size(0)), got cu_seqlens[", n - 1, "] = ", x[n - 1]);
  }
  return c;
}

}  // namespace

std::vector<int64_t> QkvPrepared::lse_shape() const {
  const auto& d = params.dims;
  if (packed()) return {d.heads_q, d.seqlen};
  return {d.batch, d.heads_q, d.seqlen};
}

QkvPrepared prepare_qkv(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                        const c10::optional<at::Tensor>& cu_seqlens, int64_t window_size,
                        bool cuda_backend) {
  check_float_tensor(q_in, "q");
  check_float_tensor(k_in, "k");
  check_float_tensor(v_in, "v");
  check_window(window_size);
  const bool packed = cu_seqlens.has_value() && cu_seqlens->defined();
  if (packed) {
    TORCH_CHECK_VALUE(q_in.dim() == 3, "q must be 3-D [total, Hq, D] with cu_seqlens, got shape ",
                      shape_str(q_in));
    TORCH_CHECK_VALUE(k_in.dim() == 3, "k must be 3-D [total, Hkv, D] with cu_seqlens, got shape ",
                      shape_str(k_in));
    TORCH_CHECK_VALUE(v_in.dim() == 3, "v must be 3-D [total, Hkv, D] with cu_seqlens, got shape ",
                      shape_str(v_in));
  } else {
    TORCH_CHECK_VALUE(q_in.dim() == 4, "q must be 4-D [B, T, Hq, D] (or 3-D [total, Hq, D] with "
                      "cu_seqlens), got shape ", shape_str(q_in));
    TORCH_CHECK_VALUE(k_in.dim() == 4, "k must be 4-D [B, T_k, Hkv, D], got shape ",
                      shape_str(k_in));
    TORCH_CHECK_VALUE(v_in.dim() == 4, "v must be 4-D [B, T_k, Hkv, D], got shape ",
                      shape_str(v_in));
  }
  const auto dt = check_qkv_dtypes(q_in, k_in, v_in, cuda_backend);
  const int64_t o = packed ? 0 : 1;  // offset of the row dim
  const int64_t T = q_in.size(o), Tk = k_in.size(o), Hq = q_in.size(o + 1),
                D = q_in.size(o + 2), Hkv = k_in.size(o + 1);
  if (!packed) {
    TORCH_CHECK_VALUE(k_in.size(0) == q_in.size(0), "k must have batch size ", q_in.size(0),
                      " (from q), got ", k_in.size(0));
    // Continuation: k/v rows before q's first token (bottom-right alignment).
    TORCH_CHECK_VALUE(Tk >= T && Tk - T <= window_size + 1, "k must have a sequence length "
                      "between T = ", T, " (from q) and T + window_size + 1 = ",
                      T + window_size + 1, " (q's tokens plus a halo of earlier keys), got ", Tk);
  } else {
    TORCH_CHECK_VALUE(Tk == T, "k must have the ", T, " rows of q with cu_seqlens (packed "
                      "batches take no halo), got ", Tk);
  }
  TORCH_CHECK_VALUE(k_in.size(o + 2) == D, "k must have head dim ", D, " (from q), got ",
                    k_in.size(o + 2));
  check_heads(Hq, Hkv, D, cuda_backend);
  if (cuda_backend) {
    TORCH_CHECK_NOT_IMPLEMENTED(Tk == T, "k: a halo (k/v with more rows than q) is not "
                                "implemented in the CUDA kernels yet (use the CPU backend)");
  }
  QkvPrepared r;
  r.dtype = dt;
  const auto rows = cuda_backend ? rows_16byte_aligned : rows_contiguous;
  r.q = rows(q_in);
  r.k = rows(k_in);
  r.v = rows(v_in);
  auto& p = r.params;
  p = QkvParams{};
  p.dtype = to_dtype(dt);
  r.max_seqlen_k = Tk;
  if (packed) {
    r.cu_seqlens = check_cu_seqlens(*cu_seqlens, T, q_in);
    p.dims = AttnDims{r.cu_seqlens.size(0) - 1, T, Hq, Hkv, D, T};
    p.cu_seqlens = r.cu_seqlens.data_ptr<int32_t>();
    if (r.cu_seqlens.is_cpu()) r.max_seqlen_k = p.max_seqlen_q();
  } else {
    p.dims = AttnDims{q_in.size(0), T, Hq, Hkv, D, Tk};
    p.cu_seqlens = nullptr;
  }
  p.q = r.q.data_ptr();
  p.k = r.k.data_ptr();
  p.v = r.v.data_ptr();
  p.q_stride = strides_of(r.q);
  p.k_stride = strides_of(r.k);
  p.v_stride = strides_of(r.v);
  return r;
}

SwaFwdPrepared prepare_swa_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                               const at::Tensor& v_in, int64_t window_size, double softmax_scale,
                               const c10::optional<at::Tensor>& rotary_cos,
                               const c10::optional<at::Tensor>& rotary_sin, bool cuda_backend,
                               const c10::optional<at::Tensor>& cu_seqlens) {
  window_size = clamp_window_to_keys(window_size, k_in);
  check_softmax_scale(softmax_scale);
  QkvPrepared qkv = prepare_qkv(q_in, k_in, v_in, cu_seqlens, window_size, cuda_backend);
  const auto& d = qkv.params.dims;
  const auto acc = acc_scalar_type(qkv.dtype);
  SwaFwdPrepared r;
  r.run_kernel = d.batch > 0 && d.seqlen > 0 && d.heads_q > 0;
  std::tie(r.cos, r.sin) =
      prepare_rotary(rotary_cos, rotary_sin, qkv.max_seqlen_k, d.head_dim, qkv.q);
  r.out = at::empty(q_in.sizes(), qkv.q.options().dtype(acc));
  r.lse = at::empty(qkv.lse_shape(), qkv.q.options().dtype(acc));
  auto& p = r.params;
  p = SwaFwdParams{};
  static_cast<QkvParams&>(p) = qkv.params;
  p.out = r.out.data_ptr();
  p.out_stride = strides_of(r.out);
  p.lse = r.lse.data_ptr();
  p.rotary_cos = r.cos.defined() ? r.cos.data_ptr() : nullptr;
  p.rotary_sin = r.sin.defined() ? r.sin.data_ptr() : nullptr;
  p.window_size = window_size;
  p.softmax_scale = softmax_scale;
  // q/k/v copies (if any) are referenced by the params: keep them alive with the outputs.
  r.keep = {qkv.q, qkv.k, qkv.v, qkv.cu_seqlens};
  return r;
}

namespace {
void check_checkpoint_args(int64_t chunk_size, int64_t checkpoint_every) {
  TORCH_CHECK_VALUE(chunk_size >= 1 && chunk_size <= 1024, "chunk_size must be in [1, 1024], got ",
                    chunk_size);
  TORCH_CHECK_VALUE(checkpoint_every >= 1, "checkpoint_every must be >= 1, got ", checkpoint_every);
}
// Shape of the checkpoint buffer (RlaCheckpointLayout in core/params.h): the [2D, D] states
// of the slots stacked along rows, [B (1 packed), Hkv, slots * 2D, D]. Stacked rather than a
// separate slots dimension because the slot count is 1 for short sequences: a size that may
// be 1 makes a traced (symbolic) shape guard on it, and torch.export / compile(dynamic=True)
// would specialise on T. The memory layout is the same either way.
std::vector<int64_t> checkpoint_shape(const QkvPrepared& qkv, int64_t chunk_size,
                                      int64_t every) {
  const auto& d = qkv.params.dims;
  if (qkv.packed()) {
    return {1, d.heads_kv,
            RlaCheckpointLayout::packed_slots(d.seqlen, d.batch, chunk_size, every) * 2 *
                d.head_dim,
            d.head_dim};
  }
  return {d.batch, d.heads_kv,
          RlaCheckpointLayout::per_seq(d.seqlen, chunk_size, every) * 2 * d.head_dim,
          d.head_dim};
}
// carried_state: [B, Hkv, 2D, D] (one per sequence and kv head); contiguous acc type.
at::Tensor prepare_carried_state(const c10::optional<at::Tensor>& cs, const AttnDims& d,
                                 const at::Tensor& like) {
  if (!cs.has_value() || !cs->defined()) return at::Tensor();
  const at::Tensor& t = *cs;
  check_float_tensor(t, "carried_state");
  check_same_device(t, like, "carried_state");
  TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == d.batch && t.size(1) == d.heads_kv &&
                        t.size(2) == 2 * d.head_dim && t.size(3) == d.head_dim,
                    "carried_state must be [B, Hkv, 2D, D] = [", d.batch, ", ", d.heads_kv, ", ",
                    2 * d.head_dim, ", ", d.head_dim, "], got ", shape_str(t));
  return t.to(acc_scalar_type(like.scalar_type())).contiguous();
}
// checkpoint_every beyond the number of chunks saves just the first state; clamped so the
// checkpoint count cannot overflow.
int64_t clamp_checkpoint_every(int64_t T, int64_t chunk_size, int64_t every) {
  const int64_t n_chunks = ceil_div(T, chunk_size);
  return every < n_chunks ? every : (n_chunks > 1 ? n_chunks : 1);
}
}  // namespace

SwaBwdPrepared prepare_swa_bwd(const at::Tensor& grad_out_in,
                               const c10::optional<at::Tensor>& grad_lse_in, const at::Tensor& q_in,
                               const at::Tensor& k_in, const at::Tensor& v_in,
                               const at::Tensor& out_in, const at::Tensor& lse_in,
                               int64_t window_size, double softmax_scale,
                               const c10::optional<at::Tensor>& rotary_cos,
                               const c10::optional<at::Tensor>& rotary_sin, bool deterministic,
                               bool cuda_backend, const c10::optional<at::Tensor>& cu_seqlens) {
  window_size = clamp_window_to_keys(window_size, k_in);
  check_softmax_scale(softmax_scale);
  QkvPrepared qkv = prepare_qkv(q_in, k_in, v_in, cu_seqlens, window_size, cuda_backend);
  const auto& d = qkv.params.dims;
  const auto acc = acc_scalar_type(qkv.dtype);
  const std::vector<int64_t> lshape = qkv.lse_shape();
  check_acc_tensor(grad_out_in, "grad_out", acc, q_in.sizes(), q_in);
  check_acc_tensor(out_in, "out", acc, q_in.sizes(), q_in);
  check_acc_tensor(lse_in, "lse", acc, lshape, q_in);
  SwaBwdPrepared r;
  at::Tensor go = rows_contiguous(grad_out_in), out = rows_contiguous(out_in);
  at::Tensor lse = lse_in.contiguous();
  at::Tensor glse;
  if (grad_lse_in.has_value() && grad_lse_in->defined()) {
    check_acc_tensor(*grad_lse_in, "grad_lse", acc, lshape, q_in);
    glse = grad_lse_in->contiguous();
  }
  auto [cos, sin] = prepare_rotary(rotary_cos, rotary_sin, qkv.max_seqlen_k, d.head_dim, qkv.q);
  const auto contiguous = at::MemoryFormat::Contiguous;
  r.grad_q = at::empty(q_in.sizes(), qkv.q.options().memory_format(contiguous));
  r.grad_k = at::empty(k_in.sizes(), qkv.k.options().memory_format(contiguous));
  r.grad_v = at::empty(v_in.sizes(), qkv.v.options().memory_format(contiguous));
  r.run_kernel = d.batch > 0 && d.seqlen > 0 && d.heads_q > 0;
  if (!r.run_kernel) {  // no query sees any key: zero key/value gradients
    r.grad_k.zero_();
    r.grad_v.zero_();
  }
  auto& p = r.params;
  p = SwaBwdParams{};
  static_cast<QkvParams&>(p) = qkv.params;
  p.out = out.data_ptr();
  p.out_stride = strides_of(out);
  p.grad_out = go.data_ptr();
  p.grad_out_stride = strides_of(go);
  p.lse = lse.data_ptr();
  p.grad_lse = glse.defined() ? glse.data_ptr() : nullptr;
  p.grad_q = r.grad_q.data_ptr();
  p.grad_k = r.grad_k.data_ptr();
  p.grad_v = r.grad_v.data_ptr();
  p.rotary_cos = cos.defined() ? cos.data_ptr() : nullptr;
  p.rotary_sin = sin.defined() ? sin.data_ptr() : nullptr;
  p.window_size = window_size;
  p.softmax_scale = softmax_scale;
  p.deterministic = deterministic;
  r.keep = {qkv.q, qkv.k, qkv.v, qkv.cu_seqlens, go, out, lse, glse, cos, sin};
  return r;
}

namespace {
void fill_rla_common(RlaCommonParams& p, const QkvPrepared& qkv, const std::string& feature_map,
                     int64_t window_size, int64_t chunk_size, int64_t checkpoint_every) {
  static_cast<QkvParams&>(p) = qkv.params;
  p.feature_map = parse_feature_map(feature_map);
  p.window_size = window_size;
  p.chunk_size = chunk_size;
  p.checkpoint_every = checkpoint_every;
}
}  // namespace

RlaFwdPrepared prepare_rla_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                               const at::Tensor& v_in, int64_t window_size,
                               const std::string& feature_map,
                               const c10::optional<at::Tensor>& initial_state, int64_t chunk_size,
                               int64_t checkpoint_every, bool cuda_backend,
                               const c10::optional<at::Tensor>& cu_seqlens,
                               const c10::optional<at::Tensor>& carried_state) {
  window_size = clamp_window_to_keys(window_size, k_in);
  QkvPrepared qkv = prepare_qkv(q_in, k_in, v_in, cu_seqlens, window_size, cuda_backend);
  check_checkpoint_args(chunk_size, checkpoint_every);
  parse_feature_map(feature_map);
  const auto& d = qkv.params.dims;
  checkpoint_every = clamp_checkpoint_every(d.seqlen, chunk_size, checkpoint_every);
  const auto acc = acc_scalar_type(qkv.dtype);
  RlaFwdPrepared r;
  r.h0 = prepare_initial_state(initial_state, d, qkv.q);
  r.carried = prepare_carried_state(carried_state, d, qkv.q);
  TORCH_CHECK_NOT_IMPLEMENTED(!(cuda_backend && r.carried.defined()),
                              "carried_state is not implemented in the CUDA kernels yet (use the "
                              "CPU backend)");
  const int64_t D2 = 2 * d.head_dim;
  r.out = at::empty(q_in.sizes(), qkv.q.options().dtype(acc));
  r.final_state = at::empty({d.batch, d.heads_kv, D2, d.head_dim}, qkv.q.options().dtype(acc));
  // Packed: the slots between documents are never written; zeros keep the output defined.
  const auto ckpt_shape = checkpoint_shape(qkv, chunk_size, checkpoint_every);
  r.checkpoints = qkv.packed() ? at::zeros(ckpt_shape, qkv.q.options().dtype(acc))
                               : at::empty(ckpt_shape, qkv.q.options().dtype(acc));
  // No query row (or no batch / head): nothing to run. The final state is then the carried
  // state (a halo of at most w + 1 rows adds no token to the state), else zero.
  r.run_kernel = d.batch > 0 && d.seqlen > 0 && d.heads_kv > 0;
  if (!r.run_kernel) {
    if (r.carried.defined()) r.final_state.copy_(r.carried);
    else r.final_state.zero_();
  }
  auto& p = r.params;
  p = RlaFwdParams{};
  fill_rla_common(p, qkv, feature_map, window_size, chunk_size, checkpoint_every);
  p.out = r.out.data_ptr();
  p.out_stride = strides_of(r.out);
  p.initial_state = r.h0.defined() ? r.h0.data_ptr() : nullptr;
  p.initial_state_bstride = (r.h0.defined() && r.h0.size(0) > 1) ? r.h0.stride(0) : 0;
  p.carried_state = r.carried.defined() ? r.carried.data_ptr() : nullptr;
  p.final_state = r.final_state.data_ptr();
  p.checkpoints = r.checkpoints.data_ptr();
  r.keep = {qkv.q, qkv.k, qkv.v, qkv.cu_seqlens};
  return r;
}

RlaBwdPrepared prepare_rla_bwd(const at::Tensor& grad_out_in,
                               const c10::optional<at::Tensor>& grad_final_state,
                               const at::Tensor& q_in, const at::Tensor& k_in,
                               const at::Tensor& v_in,
                               const c10::optional<at::Tensor>& initial_state,
                               const at::Tensor& checkpoints_in, int64_t window_size,
                               const std::string& feature_map, int64_t chunk_size,
                               int64_t checkpoint_every, bool cuda_backend,
                               const c10::optional<at::Tensor>& cu_seqlens,
                               const c10::optional<at::Tensor>& carried_state) {
  window_size = clamp_window_to_keys(window_size, k_in);
  QkvPrepared qkv = prepare_qkv(q_in, k_in, v_in, cu_seqlens, window_size, cuda_backend);
  check_checkpoint_args(chunk_size, checkpoint_every);
  parse_feature_map(feature_map);
  const auto& d = qkv.params.dims;
  checkpoint_every = clamp_checkpoint_every(d.seqlen, chunk_size, checkpoint_every);
  const auto acc = acc_scalar_type(qkv.dtype);
  const int64_t D2 = 2 * d.head_dim;
  check_acc_tensor(grad_out_in, "grad_out", acc, q_in.sizes(), q_in);
  check_acc_tensor(checkpoints_in, "checkpoints", acc,
                   checkpoint_shape(qkv, chunk_size, checkpoint_every), q_in);
  RlaBwdPrepared r;
  at::Tensor go = cuda_backend ? rows_16byte_aligned(grad_out_in) : rows_contiguous(grad_out_in);
  at::Tensor ckpt = checkpoints_in.contiguous();
  at::Tensor h0 = prepare_initial_state(initial_state, d, qkv.q);
  // Only the presence and shape of the carried state matter here: the checkpoints hold it.
  at::Tensor carried = prepare_carried_state(carried_state, d, qkv.q);
  TORCH_CHECK_NOT_IMPLEMENTED(!(cuda_backend && carried.defined()),
                              "carried_state is not implemented in the CUDA kernels yet (use the "
                              "CPU backend)");
  at::Tensor gfs;
  if (grad_final_state.has_value() && grad_final_state->defined()) {
    check_acc_tensor(*grad_final_state, "grad_final_state", acc,
                     {d.batch, d.heads_kv, D2, d.head_dim}, q_in);
    gfs = grad_final_state->contiguous();
  }
  const auto contiguous = at::MemoryFormat::Contiguous;
  r.grad_q = at::empty(q_in.sizes(), qkv.q.options().memory_format(contiguous));
  r.grad_k = at::empty(k_in.sizes(), qkv.k.options().memory_format(contiguous));
  r.grad_v = at::empty(v_in.sizes(), qkv.v.options().memory_format(contiguous));
  // The kernel writes one H0 gradient per sequence; a broadcast H0 is reduced after.
  const auto acc_opts = qkv.q.options().dtype(acc);
  r.grad_h0 = h0.defined() ? at::empty({d.batch, d.heads_q, D2, d.head_dim}, acc_opts)
                           : at::empty({0}, acc_opts);
  r.grad_carried = carried.defined() ? at::empty({d.batch, d.heads_kv, D2, d.head_dim}, acc_opts)
                                     : at::empty({0}, acc_opts);
  r.run_kernel = d.batch > 0 && d.seqlen > 0 && d.heads_kv > 0;
  if (!r.run_kernel) {  // no query row: only the final state's gradient flows (to carried)
    if (r.grad_h0.numel() > 0) r.grad_h0.zero_();
    r.grad_k.zero_();
    r.grad_v.zero_();
    if (r.grad_carried.numel() > 0) {
      if (gfs.defined()) r.grad_carried.copy_(gfs);
      else r.grad_carried.zero_();
    }
  }
  auto& p = r.params;
  p = RlaBwdParams{};
  fill_rla_common(p, qkv, feature_map, window_size, chunk_size, checkpoint_every);
  p.grad_out = go.data_ptr();
  p.grad_out_stride = strides_of(go);
  p.initial_state = h0.defined() ? h0.data_ptr() : nullptr;
  p.initial_state_bstride = (h0.defined() && h0.size(0) > 1) ? h0.stride(0) : 0;
  p.checkpoints = ckpt.data_ptr();
  p.grad_final_state = gfs.defined() ? gfs.data_ptr() : nullptr;
  p.grad_q = r.grad_q.data_ptr();
  p.grad_k = r.grad_k.data_ptr();
  p.grad_v = r.grad_v.data_ptr();
  p.grad_initial_state = h0.defined() ? r.grad_h0.data_ptr() : nullptr;
  p.grad_carried_state = carried.defined() ? r.grad_carried.data_ptr() : nullptr;
  r.keep = {qkv.q, qkv.k, qkv.v, qkv.cu_seqlens, go, ckpt, h0, gfs};
  return r;
}

at::Tensor reduce_grad_initial_state(const at::Tensor& grad_h0,
                                     const c10::optional<at::Tensor>& initial_state) {
  if (grad_h0.numel() > 0 && initial_state.has_value() && initial_state->size(0) == 1 &&
      grad_h0.size(0) > 1) {
    return grad_h0.sum(0, /*keepdim=*/true);
  }
  return grad_h0;
}

namespace {
at::Tensor prepare_norm_weight(const at::Tensor& w, const char* name, int64_t H, int64_t D,
                               at::ScalarType acc, const at::Tensor& like) {
  check_float_tensor(w, name);
  check_same_device(w, like, name);
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == H && w.size(1) == D, name,
                    " must be [Hq, D] = [", H, ", ", D, "], got ", shape_str(w));
  return w.to(acc).contiguous();
}

void check_branch_output(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  check_float_tensor(t, name);
  check_same_device(t, ref, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64 (the accumulation type), got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have dtype ", ref.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK_VALUE((t.dim() == 4 || t.dim() == 3) && t.sizes() == ref.sizes(), name,
                    " must be [B, T, Hq, D] (or packed [total, Hq, D]) ", shape_str(ref), ", got ",
                    shape_str(t));
}
}  // namespace

void check_mix_scalars(double eps, at::ScalarType out_dtype, at::ScalarType acc) {
  check_norm_eps(eps);
  TORCH_CHECK(acc == at::kDouble ? out_dtype == at::kDouble
                                 : (out_dtype == at::kFloat || out_dtype == at::kBFloat16 ||
                                    out_dtype == at::kHalf),
              "out_dtype ", out_dtype, " does not match accumulation dtype ", acc);
}

MixPrepared prepare_mix_fwd(const at::Tensor& o_swa_in, const at::Tensor& o_rla_in,
                            const at::Tensor& swa_weight, const at::Tensor& rla_weight, double eps,
                            at::ScalarType out_dtype) {
  check_branch_output(o_swa_in, "o_swa", o_swa_in);
  check_branch_output(o_rla_in, "o_rla", o_swa_in);
  check_mix_scalars(eps, out_dtype, o_swa_in.scalar_type());
  const auto acc = o_swa_in.scalar_type();
  const int64_t H = o_swa_in.size(-2), D = o_swa_in.size(-1);
  MixPrepared r;
  at::Tensor a = o_swa_in.contiguous(), b = o_rla_in.contiguous();
  at::Tensor ga = prepare_norm_weight(swa_weight, "swa_norm_weight", H, D, acc, a);
  at::Tensor gb = prepare_norm_weight(rla_weight, "rla_norm_weight", H, D, acc, a);
  r.out = at::empty(a.sizes(), a.options().dtype(out_dtype));
  r.run_kernel = a.numel() > 0;
  auto& p = r.params;
  p = MixParams{};
  p.rows = a.numel() / D;
  p.heads_q = H;
  p.head_dim = D;
  p.acc_dtype = to_dtype(acc);
  p.out_dtype = to_dtype(out_dtype);
  p.o_swa = a.data_ptr();
  p.o_rla = b.data_ptr();
  p.swa_weight = ga.data_ptr();
  p.rla_weight = gb.data_ptr();
  p.out = r.out.data_ptr();
  p.eps = eps;
  r.keep = {a, b, ga, gb};
  return r;
}

MixBwdPrepared prepare_mix_bwd(const at::Tensor& grad_out_in, const at::Tensor& o_swa_in,
                               const at::Tensor& o_rla_in, const at::Tensor& swa_weight,
                               const at::Tensor& rla_weight, double eps) {
  check_branch_output(o_swa_in, "o_swa", o_swa_in);
  check_branch_output(o_rla_in, "o_rla", o_swa_in);
  check_float_tensor(grad_out_in, "grad_out");
  check_same_device(grad_out_in, o_swa_in, "grad_out");
  TORCH_CHECK_VALUE(grad_out_in.sizes() == o_swa_in.sizes(), "grad_out must have shape ",
                    shape_str(o_swa_in), ", got ", shape_str(grad_out_in));
  const auto acc = o_swa_in.scalar_type();
  const auto gdt = grad_out_in.scalar_type();
  TORCH_CHECK(acc == at::kDouble ? gdt == at::kDouble
                                 : (gdt == at::kFloat || gdt == at::kBFloat16 || gdt == at::kHalf),
              "grad_out dtype ", gdt, " does not match accumulation dtype ", acc);
  const int64_t H = o_swa_in.size(-2), D = o_swa_in.size(-1);
  MixBwdPrepared r;
  at::Tensor go = grad_out_in.contiguous(), a = o_swa_in.contiguous(), b = o_rla_in.contiguous();
  at::Tensor ga = prepare_norm_weight(swa_weight, "swa_norm_weight", H, D, acc, a);
  at::Tensor gb = prepare_norm_weight(rla_weight, "rla_norm_weight", H, D, acc, a);
  r.grad_o_swa = at::empty(a.sizes(), a.options());
  r.grad_o_rla = at::empty(a.sizes(), a.options());
  r.grad_swa_weight = at::empty({H, D}, a.options());
  r.grad_rla_weight = at::empty({H, D}, a.options());
  check_norm_eps(eps);
  r.run_kernel = a.numel() > 0;
  if (!r.run_kernel) {  // no row: zero weight gradients
    r.grad_swa_weight.zero_();
    r.grad_rla_weight.zero_();
  }
  auto& p = r.params;
  p = MixBwdParams{};
  p.rows = a.numel() / D;
  p.heads_q = H;
  p.head_dim = D;
  p.acc_dtype = to_dtype(acc);
  p.grad_dtype = to_dtype(gdt);
  p.grad_out = go.data_ptr();
  p.o_swa = a.data_ptr();
  p.o_rla = b.data_ptr();
  p.swa_weight = ga.data_ptr();
  p.rla_weight = gb.data_ptr();
  p.grad_o_swa = r.grad_o_swa.data_ptr();
  p.grad_o_rla = r.grad_o_rla.data_ptr();
  p.grad_swa_weight = r.grad_swa_weight.data_ptr();
  p.grad_rla_weight = r.grad_rla_weight.data_ptr();
  p.eps = eps;
  r.keep = {go, a, b, ga, gb};
  return r;
}

DecodePrepared prepare_decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& state, const at::Tensor& pos,
                                   const std::string& feature_map, double softmax_scale,
                                   const c10::optional<at::Tensor>& initial_state,
                                   const c10::optional<at::Tensor>& rotary_cos,
                                   const c10::optional<at::Tensor>& rotary_sin,
                                   const at::Tensor& swa_weight, const at::Tensor& rla_weight,
                                   double eps, bool cuda_backend) {
  const auto info = check_qkv(q, k, v, cuda_backend);
  const auto& d = info.dims;
  TORCH_CHECK_VALUE(d.seqlen == 1, "decode_step takes one token: q must be [B, 1, Hq, D], got T=",
                    d.seqlen);
  const auto fm = parse_feature_map(feature_map);
  const auto acc = acc_scalar_type(info.dtype);
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.size(0) == d.batch && k_cache.size(1) >= 1 &&
                        k_cache.size(2) == d.heads_kv && k_cache.size(3) == d.head_dim,
                    "cache keys must be [B, w+1, Hkv, D] with B=", d.batch, ", Hkv=", d.heads_kv,
                    ", D=", d.head_dim, ", got ", shape_str(k_cache));
  TORCH_CHECK(k_cache.scalar_type() == info.dtype, "cache dtype ", k_cache.scalar_type(),
              " does not match q's dtype ", info.dtype);
  check_same_device(k_cache, q, "cache");
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == info.dtype,
                    "cache values must match cache keys ", shape_str(k_cache));
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "cache tensors must be contiguous");
  const int64_t window = k_cache.size(1) - 1;
  check_acc_tensor(state, "cache state", acc, {d.batch, d.heads_kv, 2 * d.head_dim, d.head_dim}, q);
  TORCH_CHECK(state.is_contiguous(), "cache state must be contiguous");
  TORCH_CHECK(pos.defined() && pos.scalar_type() == at::kLong && pos.dim() == 1 &&
                  pos.size(0) == d.batch && pos.is_contiguous(),
              "cache positions must be a contiguous int64 tensor [B=", d.batch, "]");
  check_same_device(pos, q, "cache positions");
  check_norm_eps(eps);
  check_softmax_scale(softmax_scale);
  DecodePrepared r;
  at::Tensor h0 = prepare_initial_state(initial_state, d, q);
  // Positions are checked against the rotary tables in the kernel (CPU: error, CUDA: the
  // kernel writes NaN for a position past the table rather than reading out of bounds).
  auto [cos, sin] = prepare_rotary(rotary_cos, rotary_sin, 1, d.head_dim, q);
  at::Tensor ga = prepare_norm_weight(swa_weight, "swa_norm_weight", d.heads_q, d.head_dim, acc, q);
  at::Tensor gb = prepare_norm_weight(rla_weight, "rla_norm_weight", d.heads_q, d.head_dim, acc, q);
  r.out = at::empty({d.batch, 1, d.heads_q, d.head_dim}, q.options());
  r.run_kernel = d.batch > 0 && d.heads_kv > 0;
  auto& p = r.params;
  p = DecodeParams{};
  p.batch = d.batch;
  p.heads_q = d.heads_q;
  p.heads_kv = d.heads_kv;
  p.head_dim = d.head_dim;
  p.dtype = to_dtype(info.dtype);
  p.feature_map = fm;
  at::Tensor qc = rows_contiguous(q), kc = rows_contiguous(k), vc = rows_contiguous(v);
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.q_bstride = qc.stride(0);
  p.q_hstride = qc.stride(2);
  p.k_bstride = kc.stride(0);
  p.k_hstride = kc.stride(2);
  p.v_bstride = vc.stride(0);
  p.v_hstride = vc.stride(2);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.state = state.data_ptr();
  p.pos = pos.data_ptr<int64_t>();
  p.initial_state = h0.defined() ? h0.data_ptr() : nullptr;
  p.initial_state_bstride = (h0.defined() && h0.size(0) > 1) ? h0.stride(0) : 0;
  p.rotary_cos = cos.defined() ? cos.data_ptr() : nullptr;
  p.rotary_sin = sin.defined() ? sin.data_ptr() : nullptr;
  // the rows both tables have: a position past the shorter one reads neither
  p.rotary_positions = cos.defined() ? std::min(cos.size(0), sin.size(0)) : 0;
  p.swa_weight = ga.data_ptr();
  p.rla_weight = gb.data_ptr();
  p.out = r.out.data_ptr();
  p.window_size = window;
  p.softmax_scale = softmax_scale;
  p.eps = eps;
  r.keep = {qc, kc, vc, h0, cos, sin, ga, gb};
  return r;
}

}  // namespace rattention

namespace rattention {

SwaMixFwdPrepared prepare_swa_mix_fwd(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, int64_t window_size,
                                      double softmax_scale,
                                      const c10::optional<at::Tensor>& rotary_cos,
                                      const c10::optional<at::Tensor>& rotary_sin,
                                      const at::Tensor& o_rla_in, const at::Tensor& swa_weight,
                                      const at::Tensor& rla_weight, double eps,
                                      at::ScalarType out_dtype, bool save_branch,
                                      bool cuda_backend,
                                      const c10::optional<at::Tensor>& cu_seqlens) {
  SwaMixFwdPrepared r;
  // Everything is validated (and allocated) before any kernel runs: the SWA half, then the
  // mixing over the SWA output buffer (o_rla against its shape, weights, eps, out_dtype).
  r.swa = prepare_swa_fwd(q, k, v, window_size, softmax_scale, rotary_cos, rotary_sin,
                          cuda_backend, cu_seqlens);
  MixPrepared mix = prepare_mix_fwd(r.swa.out, o_rla_in, swa_weight, rla_weight, eps, out_dtype);
  r.mix = mix.params;
  r.out = mix.out;
  r.keep = mix.keep;

  // The epilogue reads the same (contiguous) o_rla and weights and writes the same out.
  const Strides4 rows = strides_of(r.out);  // o_rla's copy and out: contiguous, q-shaped
  auto& e = r.swa.params.mix;
  e = MixEpilogueParams{};
  e.o_rla = r.mix.o_rla;
  e.o_rla_stride = rows;
  e.swa_weight = r.mix.swa_weight;
  e.rla_weight = r.mix.rla_weight;
  e.out = r.out.data_ptr();
  e.out_stride = rows;
  e.out_dtype = r.mix.out_dtype;
  e.eps = eps;

  if (cuda_backend && !save_branch) {
    // Inference: the fused kernel writes only the mixed output.
    const auto opts = r.swa.out.options();
    r.swa.params.out = nullptr;
    r.swa.params.lse = nullptr;
    r.mix.o_swa = nullptr;
    r.swa.out = at::empty({0}, opts);
    r.swa.lse = at::empty({0}, opts);
  }
  return r;
}

}  // namespace rattention
