// fastperc._C: the CUDA C++ backend's entry points, bound with pybind11 through
// torch/extension.h. This file owns the tensors: input checks (TORCH_CHECK), the dense layout
// each kernel walks (NCHW or channels_last, read in place; anything else is copied once),
// outputs and workspaces from PyTorch's caching allocator, the dtype dispatch (AT_DISPATCH:
// fp32, fp64, fp16, bf16) and the current stream. The kernels (tv_loss.cu, norm.cu) see raw
// pointers only.
//
// The Python signatures are those of the Triton launchers in fastperc/kernels/ (see
// fastperc/cuda_backend.py, which calls these), so the op layer dispatches to either.
#include <torch/extension.h>

#include <array>
#include <atomic>
#include <optional>
#include <tuple>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "fastperc.h"

namespace fastperc {

int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  const bool cached = device >= 0 && device < int(cache.size());
  if (cached) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  if (cached) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kMaxImage = (int64_t(1) << 31) - 1;  // kernels index within one image in 32 bits

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_image(const Tensor& x, const char* what) {
  TORCH_CHECK(x.is_cuda(), what, ": expected a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 4, what, ": expected a 4-D (N, C, H, W) tensor, got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                   x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16),
              what, ": expected float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.numel() > 0, what, ": expected a non-empty tensor, got shape ", x.sizes());
  TORCH_CHECK(x.numel() / x.size(0) <= kMaxImage, what, ": images of 2^31 elements or more are not supported, got ",
              x.sizes());
}

void check_like(const Tensor& t, const Tensor& x, const char* what) {
  TORCH_CHECK(t.device() == x.device(), what, ": expected a tensor on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.sizes() == x.sizes(), what, ": expected shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), what, ": expected dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
}

// x laid out densely: itself when it is NCHW- or channels_last-contiguous, else a copy in the
// format torch.empty_like(x) would pick. Outputs are then empty_like(x), with x's strides.
Tensor dense(const Tensor& x) {
  if (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  return x.contiguous(x.suggest_memory_format());
}

// Planar (NCHW) unless x is channels_last and not also NCHW-contiguous (C == 1 or H·W == 1
// are both, and are walked as planar).
bool channels_last(const Tensor& x) { return !x.is_contiguous(); }

// `t` in the layout of the dense tensor x.
Tensor like_layout(const Tensor& t, const Tensor& x) {
  const auto fmt = channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

void check_channel_vector(const Tensor& t, const Tensor& x, int64_t numel, const char* what) {
  TORCH_CHECK(t.device() == x.device(), what, ": expected a tensor on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.numel() == numel, what, ": expected ", numel, " values, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), what, ": expected a floating-point tensor, got ", t.scalar_type());
}

// A (C,) parameter or a statistic as a contiguous acc-typed vector on x's device (read only).
Tensor channel_vector(const Tensor& t, const Tensor& x, int64_t numel, const char* what) {
  check_channel_vector(t, x, numel, what);
  return t.to(acc_type(x.scalar_type())).contiguous();
}

template <typename A> const A* opt_ptr(const std::optional<Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<A>() : nullptr;
}

// γ and β as contiguous acc-typed tensors on x's device (read only), each (C,) or, for
// instance norm (`per_sample`), also (N, C), with their row strides (0 for (C,), C for (N, C)).
struct Affine {
  OptTensor weight, bias;
  int64_t weight_sn = 0, bias_sn = 0;

  template <typename A> NormAffine<A> pointers() const {
    return NormAffine<A>{opt_ptr<A>(weight), opt_ptr<A>(bias), weight_sn, bias_sn};
  }
};

Tensor affine_param(const Tensor& t, const Tensor& x, bool per_sample, const char* what, int64_t& row_stride) {
  const int64_t n = x.size(0), c = x.size(1);
  const bool rows = per_sample && t.dim() == 2 && t.size(0) == n && t.size(1) == c;
  if (per_sample) {
    TORCH_CHECK(rows || (t.dim() == 1 && t.size(0) == c), what, ": expected shape (", c, ") or (", n, ", ", c,
                "), got ", t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == c, what, ": expected shape (", c, "), got ", t.sizes());
  }
  row_stride = rows ? c : 0;
  return channel_vector(t, x, t.numel(), what);
}

Affine affine_params(const OptTensor& weight, const OptTensor& bias, const Tensor& x, bool per_sample) {
  Affine a;
  if (weight.has_value()) a.weight = affine_param(*weight, x, per_sample, "weight", a.weight_sn);
  if (bias.has_value()) a.bias = affine_param(*bias, x, per_sample, "bias", a.bias_sn);
  return a;
}

cudaStream_t current_stream(const Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.get_device()).stream(); }

// ---- tv_loss ------------------------------------------------------------------------------

TvShape tv_shape(const Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  if (channels_last(x)) return TvShape{n, h, h, w * c, c};
  return TvShape{n, c * h, h, w, 1};
}

void check_tv_args(int64_t p, int64_t reduction) {
  TORCH_CHECK(p == 1 || p == 2, "tv_loss: p: expected 1 or 2, got ", p);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "tv_loss: reduction: expected 0 (none), 1 (sum) or 2 (mean), got ",
              reduction);
}

Tensor tv_loss_forward_cuda(const Tensor& x_in, int64_t p, int64_t reduction) {
  check_image(x_in, "tv_loss: x");
  check_tv_args(p, reduction);
  const Tensor x = dense(x_in);
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  const TvShape s = tv_shape(x);
  const int64_t parts = tv_loss_parts(s, device);
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  Tensor partials = at::empty({s.n * parts}, acc);
  Tensor out = reduction == 0 ? at::empty({s.n}, acc) : at::empty({}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastperc.tv_loss_forward", [&] {
    using A = acc_t<scalar_t>;
    C10_CUDA_CHECK(tv_loss_forward<scalar_t>(x.const_data_ptr<scalar_t>(), s, int(p), int(reduction), parts,
                                             partials.data_ptr<A>(), out.data_ptr<A>(), device, current_stream(x)));
  });
  return out;
}

Tensor tv_loss_backward_cuda(const Tensor& grad, const Tensor& x_in, int64_t p, int64_t reduction) {
  check_image(x_in, "tv_loss_backward: x");
  check_tv_args(p, reduction);
  TORCH_CHECK(grad.device() == x_in.device(), "tv_loss_backward: grad: expected a tensor on ", x_in.device(),
              ", got ", grad.device());
  const int64_t n = x_in.size(0);
  TORCH_CHECK(reduction == 0 ? grad.numel() == n : grad.numel() == 1, "tv_loss_backward: grad: expected ",
              reduction == 0 ? n : 1, " values, got shape ", grad.sizes());
  const Tensor x = dense(x_in);
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  const Tensor g = grad.to(acc_type(x.scalar_type())).contiguous();
  Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastperc.tv_loss_backward", [&] {
    using A = acc_t<scalar_t>;
    C10_CUDA_CHECK(tv_loss_backward<scalar_t>(x.const_data_ptr<scalar_t>(), g.const_data_ptr<A>(),
                                              reduction == 0 ? 1 : 0, reduction == 2, tv_shape(x), int(p),
                                              dx.data_ptr<scalar_t>(), device, current_stream(x)));
  });
  return dx;
}

// ---- instance / batch norm ----------------------------------------------------------------

NormShape norm_shape(const Tensor& x, bool per_sample) {
  return NormShape{x.size(0), x.size(1), x.size(2) * x.size(3), channels_last(x), per_sample};
}

using Triple = std::tuple<Tensor, Tensor, Tensor>;

// The shared forward. `given`: (mean (2, 1, C), var (1, C)) for batch norm in eval mode.
Triple norm_forward_impl(const Tensor& x_in, const OptTensor& weight_in, const OptTensor& bias_in,
                         const OptTensor& residual_in, double eps, bool relu, bool per_sample,
                         const std::optional<std::pair<Tensor, Tensor>>& given) {
  const char* op = per_sample ? "instance_norm" : "batch_norm";
  check_image(x_in, op);
  TORCH_CHECK(eps > 0, op, ": eps: expected a number > 0, got ", eps);
  const Tensor x = dense(x_in);
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  const int64_t C = x.size(1);
  const int64_t G = per_sample ? x.size(0) : 1;
  const NormShape shape = norm_shape(x, per_sample);
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  const Affine affine = affine_params(weight_in, bias_in, x, per_sample);
  OptTensor residual;
  if (residual_in.has_value()) {
    check_like(*residual_in, x_in, "residual");
    residual = like_layout(*residual_in, x);
  }
  Tensor y = at::empty_like(x);
  Tensor mean, stat;
  NormPlan plan{1, shape.s};
  if (given.has_value()) {
    mean = given->first;
    stat = given->second;
  } else {
    mean = at::empty({2, G, C}, acc);
    stat = at::empty({G, C}, acc);
    plan = norm_plan(shape, device);
  }
  Tensor workspace = at::empty({given.has_value() ? 0 : norm_workspace(shape, plan)}, acc);
  Tensor coef = at::empty({4 * G * C}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastperc.norm_forward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* r = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    C10_CUDA_CHECK(norm_forward<scalar_t>(
        x.const_data_ptr<scalar_t>(), affine.pointers<A>(), r, eps, relu, given.has_value(),
        /*stat_is_var=*/!per_sample, shape, plan, workspace.data_ptr<A>(), mean.data_ptr<A>(), stat.data_ptr<A>(),
        coef.data_ptr<A>(), y.data_ptr<scalar_t>(), device, current_stream(x)));
  });
  return {y, mean, stat};
}

Triple norm_backward_impl(const Tensor& dy_in, const Tensor& x_in, const OptTensor& weight_in,
                          const OptTensor& bias_in, const Tensor& mean_in, const Tensor& stat_in, double eps,
                          bool relu, bool per_sample, bool centred) {
  const char* op = per_sample ? "instance_norm_backward" : "batch_norm_backward";
  check_image(x_in, op);
  check_like(dy_in, x_in, "dy");
  const Tensor x = dense(x_in);
  const Tensor dy = like_layout(dy_in, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  const int64_t C = x.size(1);
  const int64_t G = per_sample ? x.size(0) : 1;
  const NormShape shape = norm_shape(x, per_sample);
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  const Affine affine = affine_params(weight_in, bias_in, x, per_sample);
  const Tensor mean = channel_vector(mean_in, x, 2 * G * C, "mean");
  const Tensor stat = channel_vector(stat_in, x, G * C, per_sample ? "rstd" : "var");
  const NormPlan plan = norm_plan(shape, device);
  Tensor workspace = at::empty({norm_workspace(shape, plan)}, acc);
  Tensor coef = at::empty({4 * G * C}, acc);
  Tensor dx = at::empty_like(x);
  // Each gradient shaped as its parameter: (N, C) for a per-sample one, else (C,).
  Tensor dweight = affine.weight_sn != 0 ? at::empty({x.size(0), C}, acc) : at::empty({C}, acc);
  Tensor dbias = affine.bias_sn != 0 ? at::empty({x.size(0), C}, acc) : at::empty({C}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastperc.norm_backward", [&] {
    using A = acc_t<scalar_t>;
    C10_CUDA_CHECK(norm_backward<scalar_t>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), affine.pointers<A>(),
        mean.const_data_ptr<A>(), stat.const_data_ptr<A>(), eps, relu, /*stat_is_var=*/!per_sample, centred, shape,
        plan, workspace.data_ptr<A>(), coef.data_ptr<A>(), dx.data_ptr<scalar_t>(), dweight.data_ptr<A>(),
        dbias.data_ptr<A>(), device, current_stream(x)));
  });
  return {dx, dweight, dbias};
}

Triple instance_norm_forward_cuda(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                  const OptTensor& residual, double eps, bool relu) {
  return norm_forward_impl(x, weight, bias, residual, eps, relu, true, std::nullopt);
}

Triple instance_norm_backward_cuda(const Tensor& dy, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                   const Tensor& mean, const Tensor& rstd, bool relu) {
  return norm_backward_impl(dy, x, weight, bias, mean, rstd, 0.0, relu, true, true);
}

Triple batch_norm_forward_cuda(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& residual, const OptTensor& running_mean, const OptTensor& running_var,
                               bool training, double eps, bool relu) {
  if (training) return norm_forward_impl(x, weight, bias, residual, eps, relu, false, std::nullopt);
  TORCH_CHECK(running_mean.has_value() && running_var.has_value(),
              "batch_norm: running_mean, running_var: required when training is false");
  check_image(x, "batch_norm");
  const int64_t C = x.size(1);
  const auto acc = acc_type(x.scalar_type());
  check_channel_vector(*running_mean, x, C, "running_mean");
  check_channel_vector(*running_var, x, C, "running_var");
  // The running statistics as (mean (2, 1, C) double-float, var (1, C)), new tensors (a custom
  // op's outputs never alias its inputs).
  const Tensor rm = running_mean->to(at::kDouble).reshape({1, C});
  const Tensor hi = rm.to(acc);
  const Tensor mean = at::stack({hi, (rm - hi.to(at::kDouble)).to(acc)});
  const Tensor var = running_var->to(acc).reshape({1, C}).clone();
  return norm_forward_impl(x, weight, bias, residual, eps, relu, false, std::make_pair(mean, var));
}

// (splits, chunk) of the norm reductions for x, as the launchers choose them (for tests).
std::tuple<int64_t, int64_t> norm_plan_cuda(const Tensor& x_in, bool per_sample) {
  check_image(x_in, "norm_plan");
  const Tensor x = dense(x_in);
  const NormPlan plan = norm_plan(norm_shape(x, per_sample), x.get_device());
  return {plan.splits, plan.chunk};
}

Triple batch_norm_backward_cuda(const Tensor& dy, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                const Tensor& mean, const Tensor& var, bool training, double eps, bool relu) {
  TORCH_CHECK(eps > 0, "batch_norm_backward: eps: expected a number > 0, got ", eps);
  return norm_backward_impl(dy, x, weight, bias, mean, var, eps, relu, false, training);
}

}  // namespace
}  // namespace fastperc

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastperc's CUDA C++ kernels (see fastperc/cuda_backend.py for the launcher signatures)";
  namespace py = pybind11;
  m.def("tv_loss_forward", &fastperc::tv_loss_forward_cuda, py::arg("x"), py::arg("p"), py::arg("reduction"),
        "tv per image (N,) for reduction 0, else its sum (1) or batch mean (2), 0-d; float32 (float64 for float64)");
  m.def("tv_loss_backward", &fastperc::tv_loss_backward_cuda, py::arg("grad"), py::arg("x"), py::arg("p"),
        py::arg("reduction"), "d tv / d x, laid out as torch.empty_like(x)");
  m.def("instance_norm_forward", &fastperc::instance_norm_forward_cuda, py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("residual"), py::arg("eps"), py::arg("relu"),
        "-> (y, mean (2, N, C), rstd (N, C))");
  m.def("instance_norm_backward", &fastperc::instance_norm_backward_cuda, py::arg("dy"), py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("rstd"), py::arg("relu"),
        "-> (dx, dweight, dbias): each (C,), or (N, C) for an (N, C) parameter");
  m.def("norm_plan", &fastperc::norm_plan_cuda, py::arg("x"), py::arg("per_sample"),
        "-> (splits, chunk): S is reduced in splits chunks of chunk positions per (n, c) row (for tests)");
  m.def("batch_norm_forward", &fastperc::batch_norm_forward_cuda, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("residual"), py::arg("running_mean"), py::arg("running_var"), py::arg("training"), py::arg("eps"),
        py::arg("relu"), "-> (y, mean (2, 1, C), var (1, C)): batch statistics if training, else the running ones");
  m.def("batch_norm_backward", &fastperc::batch_norm_backward_cuda, py::arg("dy"), py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("mean"), py::arg("var"), py::arg("training"), py::arg("eps"), py::arg("relu"),
        "-> (dx, dweight (C,), dbias (C,))");
}
