// The kernel entry points of fastperc._C: host functions defined in the .cu files, called by
// bindings.cpp (which owns the tensors: checks, layout, allocation, dtype dispatch, streams).
//
// Everything here takes raw device pointers of one dense layout that bindings.cpp has chosen.
// Each function launches on `stream` and returns cudaGetLastError(); templates are explicitly
// instantiated for float, double, c10::Half and c10::BFloat16 in the .cu files.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fastperc {

// The accumulation type: float, or double for double inputs.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

// Streaming multiprocessors of a device (cached); grids are sized from it.
int sm_count(int device);

// -- tv_loss ---------------------------------------------------------------------------------
//
// Each image is a dense (rows x row_len) matrix of its elements in memory order: the pixel
// below is +row_len (valid while row % height < height - 1), the pixel to the right +step
// (valid while the position in the row is < row_len - step).
//   NCHW:          rows = C * H, row_len = W,     step = 1
//   channels_last: rows = H,     row_len = W * C, step = C
struct TvShape {
  int64_t n;
  int64_t rows;
  int64_t height;
  int64_t row_len;
  int64_t step;
};

// Partial sums per image that tv_loss_forward writes (the workspace has n * parts entries).
int64_t tv_loss_parts(const TvShape& s, int device);

// reduction: 0 "none" (out: n values), 1 "sum", 2 "mean" (out: 1 value).
template <typename T>
cudaError_t tv_loss_forward(const T* x, const TvShape& s, int p, int reduction, int64_t parts,
                            acc_t<T>* partials, acc_t<T>* out, int device, cudaStream_t stream);

// grad: g_n = grad[n * grad_stride] (grad_stride 0 for a 0-d gradient), divided by n if `mean`.
template <typename T>
cudaError_t tv_loss_backward(const T* x, const acc_t<T>* grad, int64_t grad_stride, bool mean,
                             const TvShape& s, int p, T* dx, int device, cudaStream_t stream);

// -- instance / batch norm -------------------------------------------------------------------
//
// x is (N, C, S = H*W), dense: planar (NCHW: offset (n*C + c)*S + s) or interleaved
// (channels_last: offset (n*S + s)*C + c). A statistic covers (n, c) over S (instance norm,
// G = N groups) or c over N*S (batch norm, G = 1).
struct NormShape {
  int64_t n;
  int64_t c;
  int64_t s;
  bool channels_last;
  bool per_sample;  // instance norm
};

// S is split into `splits` chunks of `chunk` positions for the reductions.
struct NormPlan {
  int64_t splits;
  int64_t chunk;
};
NormPlan norm_plan(const NormShape& shape, int device);

// Workspace of the reductions, in acc_t: the partials (2 * n * splits * c values) and the
// backward's per-statistic sums (2 * G * c).
inline int64_t norm_workspace(const NormShape& shape, const NormPlan& plan) {
  return 2 * shape.n * plan.splits * shape.c + 2 * (shape.per_sample ? shape.n : 1) * shape.c;
}

// γ and β in acc_t, each null (1 and 0), (C,) or, for instance norm, (N, C) (one scale and
// shift per sample: conditional instance norm). Element (b, c) is weight[b * weight_sn + c]:
// the row stride is 0 for (C,) and C for (N, C).
template <typename A> struct NormAffine {
  const A* weight = nullptr;
  const A* bias = nullptr;
  int64_t weight_sn = 0;
  int64_t bias_sn = 0;
};

// Forward. When `stats_given` (batch norm in eval mode) mean (2, G, C) and stat (G, C) are
// read, else computed from x (into mean, and stat = rstd for instance norm, var for batch
// norm). stat_is_var: stat holds the variance (rstd = 1/sqrt(var + eps)), else rstd.
// residual like x or null. coef: 4 * G * C acc_t scratch.
template <typename T>
cudaError_t norm_forward(const T* x, const NormAffine<acc_t<T>>& affine, const T* residual,
                         double eps, bool relu, bool stats_given, bool stat_is_var, const NormShape& shape,
                         const NormPlan& plan, acc_t<T>* workspace, acc_t<T>* mean, acc_t<T>* stat,
                         acc_t<T>* coef, T* y, int device, cudaStream_t stream);

// Backward. centred: the statistics are those of x (training), so dx has the mean terms.
// dweight, dbias: acc_t, always written: (C,), or (N, C) where the parameter's row stride
// (affine.weight_sn, affine.bias_sn) is not 0.
template <typename T>
cudaError_t norm_backward(const T* dy, const T* x, const NormAffine<acc_t<T>>& affine,
                          const acc_t<T>* mean, const acc_t<T>* stat, double eps, bool relu, bool stat_is_var,
                          bool centred, const NormShape& shape, const NormPlan& plan, acc_t<T>* workspace,
                          acc_t<T>* coef, T* dx, acc_t<T>* dweight, acc_t<T>* dbias, int device,
                          cudaStream_t stream);

}  // namespace fastperc
