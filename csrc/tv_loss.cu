// Total-variation loss, forward and backward.
//
//   tv[n] = sum_{c,i,j} |x[n,c,i+1,j] - x[n,c,i,j]|^p + |x[n,c,i,j+1] - x[n,c,i,j]|^p,  p in {1, 2}
//
// Each image is walked as a dense (rows x row_len) matrix in memory order (see TvShape in
// fastperc.h), so NCHW and channels_last are both read in place and coalesced. A thread owns V
// consecutive elements of a row: one 16-byte load where the row length, the right-neighbour
// step and the pointer allow it (V = 4 fp32, 8 fp16/bf16, 2 fp64), else V = 1. The pixel
// below is the vector one row further (+row_len); the one to the right is the next element
// of the vector plus one scalar (NCHW, step 1) or the vector `step` further (channels_last,
// step = C a multiple of V). Those neighbour loads re-read lines that the block or its
// neighbours have just brought into L1/L2, so DRAM sees each element about once.
//
// Forward: block (part, n) reduces a contiguous range of image n's vectors in fp32 (fp64 for
// fp64) to one partial; tv_finish then sums the partials in a fixed order, per image ("none")
// or all of them ("sum", "mean"): deterministic, no atomics.
//   Bytes: read numel * itemsize; write/read n * parts * 4 (a few KB); write 4 per image.
// Backward: dx = g_n (phi'(dh[i-1,j]) - phi'(dh[i,j]) + phi'(dw[i,j-1]) - phi'(dw[i,j])),
// phi'(d) = 2d (p = 2) or sign(d) (p = 1, sign(0) = 0), differences outside the image 0; a
// grid-stride loop over each image's vectors.
//   Bytes: read numel * itemsize, write numel * itemsize.
//
// Loads in flight: the forward's grid is 4 blocks per SM, so it loads two fp32/fp64 vectors per
// thread (and their neighbours) before summing any: one 16-byte DRAM request at a time per
// thread at 4 blocks per SM leaves HBM idle between requests (predicted 60-70% of bandwidth;
// benchmarks/NOTES.md). The backward is left as it was: each vector already issues its 3-5
// loads together, and a second vector per thread took 70-128 registers instead of 40 (sm_90),
// halving the resident blocks: as many DRAM requests per SM as before.
//
// Floors on the H200 (~4.3 TB/s), fp32 (fp16/bf16: half): forward numel · 4 bytes read,
// backward 2 · numel · 4 (read x, write dx). At the image TV is taken on, (4, 3, 256, 256):
// 3.1 MB, 0.73 µs / 6.3 MB, 1.5 µs (launch-bound: a few µs each). At the DESIGN.md activation
// shapes, for comparison: (4, 32, 256, 256) 33.6 MB 7.8 µs / 67.1 MB 15.6 µs; (4, 64, 128, 128)
// 16.8 MB 3.9 µs / 33.6 MB 7.8 µs; (4, 128, 64, 64) 8.4 MB 2.0 µs / 16.8 MB 3.9 µs.
#include "common.cuh"

namespace fastperc {
namespace {

constexpr int kBlocksPerSm = 4;      // forward: aim at this many blocks per SM
constexpr int64_t kMaxParts = 1024;  // forward: at most this many partials per image

template <int P, typename A> __device__ __forceinline__ A tv_term(A d) {
  if constexpr (P == 2) {
    return d * d;
  } else {
    return fabs(d);
  }
}

// phi'(d): 2d for p = 2, sign(d) (sign(0) = 0) for p = 1.
template <int P, typename A> __device__ __forceinline__ A tv_slope(A d) {
  if constexpr (P == 2) {
    return A(2) * d;
  } else {
    return A(d > A(0)) - A(d < A(0));
  }
}

// Where a vector of an image lies: its row, its position in the row, and whether it has a
// row below it.
struct TvIndex {
  FastDiv row_len;
  FastDiv height;
  uint32_t last_row;  // height - 1
};

template <typename T, int V, int P>
__global__ void __launch_bounds__(kThreads) tv_partial_kernel(const T* __restrict__ x, TvIndex ix, uint32_t step,
                                                              uint32_t vecs_per_image, uint32_t vecs_per_part,
                                                              int64_t n, acc_t<T>* __restrict__ partials) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarps];
  const uint32_t len = ix.row_len.d;
  const uint32_t begin = blockIdx.x * vecs_per_part;
  const uint32_t end = min(begin + vecs_per_part, vecs_per_image);
  for (int64_t img = blockIdx.y; img < n; img += gridDim.y) {
    const T* xi = x + img * int64_t(vecs_per_image) * V;
    A acc = A(0);
    // U vectors a thread: first every load (the vector, the one below, the right neighbour),
    // then the sums. Two fp32/fp64 vectors (up to six loads) in flight take 48-54 registers,
    // so the grid's 4 blocks per SM stay resident (sm_90, ptxas -v); fp16/bf16 took 78 at two
    // (3 blocks), so they load one at a time.
    constexpr int U = V >= 8 ? 1 : 2;
    for (uint32_t k0 = begin + threadIdx.x; k0 < end; k0 += kThreads * U) {
      Vec<T, V> cv[U], dv[U], rv[U];
      T right[U];
      bool has_below[U], has_right[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        has_below[u] = has_right[u] = false;
        const uint32_t k = k0 + u * kThreads;
        if (k >= end) continue;
        const uint32_t off = k * V;
        const uint32_t row = ix.row_len.div(off);
        const uint32_t f = off - row * len;
        cv[u] = load_vec<V>(xi + off);
        has_below[u] = ix.height.mod(row) < ix.last_row;
        if (has_below[u]) dv[u] = load_vec<V>(xi + off + len);
        if (step == 1) {
          has_right[u] = f + V < len;
          if (has_right[u]) right[u] = xi[off + V];
        } else {
          has_right[u] = f + step < len;  // step is a multiple of V: the whole vector has a right neighbour
          if (has_right[u]) rv[u] = load_vec<V>(xi + off + step);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (k0 + u * kThreads >= end) continue;
        A c[V];
#pragma unroll
        for (int e = 0; e < V; ++e) c[e] = to_acc(cv[u].v[e]);
        if (has_below[u]) {
#pragma unroll
          for (int e = 0; e < V; ++e) acc += tv_term<P>(to_acc(dv[u].v[e]) - c[e]);
        }
        if (step == 1) {
#pragma unroll
          for (int e = 0; e + 1 < V; ++e) acc += tv_term<P>(c[e + 1] - c[e]);
          if (has_right[u]) acc += tv_term<P>(to_acc(right[u]) - c[V - 1]);
        } else if (has_right[u]) {
#pragma unroll
          for (int e = 0; e < V; ++e) acc += tv_term<P>(to_acc(rv[u].v[e]) - c[e]);
        }
      }
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[img * gridDim.x + blockIdx.x] = acc;
  }
}

// reduction 0: block i sums image i's `parts` partials; 1, 2: block 0 sums all (2: / n).
template <typename A>
__global__ void __launch_bounds__(kThreads) tv_finish_kernel(const A* __restrict__ partials, int64_t parts,
                                                             int64_t n, int reduction, A* __restrict__ out) {
  __shared__ A scratch[kWarps];
  const int64_t begin = reduction == 0 ? int64_t(blockIdx.x) * parts : 0;
  const int64_t count = reduction == 0 ? parts : n * parts;
  A acc = A(0);
  for (int64_t k = threadIdx.x; k < count; k += kThreads) acc += partials[begin + k];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = reduction == 2 ? acc / A(n) : acc;
}

template <typename T, int V, int P>
__global__ void __launch_bounds__(kThreads) tv_grad_kernel(const T* __restrict__ x, const acc_t<T>* __restrict__ grad,
                                                           int64_t grad_stride, bool mean, TvIndex ix, uint32_t step,
                                                           uint32_t vecs_per_image, int64_t n, T* __restrict__ dx) {
  using A = acc_t<T>;
  const uint32_t len = ix.row_len.d;
  for (int64_t img = blockIdx.y; img < n; img += gridDim.y) {
    const int64_t base = img * int64_t(vecs_per_image) * V;
    const T* xi = x + base;
    T* oi = dx + base;
    A g = grad[img * grad_stride];
    if (mean) g /= A(n);
    for (uint32_t k = blockIdx.x * kThreads + threadIdx.x; k < vecs_per_image; k += gridDim.x * kThreads) {
      const uint32_t off = k * V;
      const uint32_t row = ix.row_len.div(off);
      const uint32_t f = off - row * len;
      const uint32_t i = ix.height.mod(row);
      const Vec<T, V> cv = load_vec<V>(xi + off);
      A c[V], t[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        c[e] = to_acc(cv.v[e]);
        t[e] = A(0);
      }
      if (i > 0) {  // + phi'(x[i] - x[i-1])
        const Vec<T, V> uv = load_vec<V>(xi + off - len);
#pragma unroll
        for (int e = 0; e < V; ++e) t[e] += tv_slope<P>(c[e] - to_acc(uv.v[e]));
      }
      if (i < ix.last_row) {  // - phi'(x[i+1] - x[i])
        const Vec<T, V> dv = load_vec<V>(xi + off + len);
#pragma unroll
        for (int e = 0; e < V; ++e) t[e] -= tv_slope<P>(to_acc(dv.v[e]) - c[e]);
      }
      if (step == 1) {
#pragma unroll
        for (int e = 0; e + 1 < V; ++e) {
          const A s = tv_slope<P>(c[e + 1] - c[e]);
          t[e + 1] += s;
          t[e] -= s;
        }
        if (f > 0) t[0] += tv_slope<P>(c[0] - to_acc(xi[off - 1]));
        if (f + V < len) t[V - 1] -= tv_slope<P>(to_acc(xi[off + V]) - c[V - 1]);
      } else {
        if (f >= step) {
          const Vec<T, V> lv = load_vec<V>(xi + off - step);
#pragma unroll
          for (int e = 0; e < V; ++e) t[e] += tv_slope<P>(c[e] - to_acc(lv.v[e]));
        }
        if (f + step < len) {
          const Vec<T, V> rv = load_vec<V>(xi + off + step);
#pragma unroll
          for (int e = 0; e < V; ++e) t[e] -= tv_slope<P>(to_acc(rv.v[e]) - c[e]);
        }
      }
      Vec<T, V> ov;
#pragma unroll
      for (int e = 0; e < V; ++e) ov.v[e] = static_cast<T>(t[e] * g);
      store_vec<V>(oi + off, ov);
    }
  }
}

// The vector width for this tensor: 16 bytes when rows, steps and the pointer allow it.
template <typename T> int tv_vec(const T* x, const TvShape& s) {
  constexpr int V = kVec<T>;
  const bool ok = reinterpret_cast<uintptr_t>(x) % 16 == 0 && s.row_len % V == 0 && (s.step == 1 || s.step % V == 0);
  return ok ? V : 1;
}

TvIndex tv_index(const TvShape& s) {
  return TvIndex{FastDiv(uint32_t(s.row_len)), FastDiv(uint32_t(s.height)), uint32_t(s.height - 1)};
}

unsigned grid_y(int64_t n) { return unsigned(n < 65535 ? n : 65535); }

}  // namespace

int64_t tv_loss_parts(const TvShape& s, int device) {
  const int64_t vecs = s.rows * s.row_len / kVec<float>;  // the plan does not depend on the dtype
  int64_t parts = ceil_div(int64_t(kBlocksPerSm) * sm_count(device), s.n);
  parts = std::min(parts, std::min(kMaxParts, ceil_div(vecs, kThreads)));
  return std::max<int64_t>(parts, 1);
}

template <typename T>
cudaError_t tv_loss_forward(const T* x, const TvShape& s, int p, int reduction, int64_t parts,
                            acc_t<T>* partials, acc_t<T>* out, int device, cudaStream_t stream) {
  (void)device;
  const int V = tv_vec(x, s);
  const uint32_t vecs = uint32_t(s.rows * s.row_len / V);
  const uint32_t per_part = uint32_t(ceil_div(vecs, parts));
  const dim3 grid(unsigned(parts), grid_y(s.n));
  const TvIndex ix = tv_index(s);
  const uint32_t step = uint32_t(s.step);
#define FASTPERC_TV_PARTIAL(VV, PP) \
  tv_partial_kernel<T, VV, PP><<<grid, kThreads, 0, stream>>>(x, ix, step, vecs, per_part, s.n, partials)
  if (V == 1) {
    if (p == 1) FASTPERC_TV_PARTIAL(1, 1); else FASTPERC_TV_PARTIAL(1, 2);
  } else {
    if (p == 1) FASTPERC_TV_PARTIAL(kVec<T>, 1); else FASTPERC_TV_PARTIAL(kVec<T>, 2);
  }
#undef FASTPERC_TV_PARTIAL
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  tv_finish_kernel<acc_t<T>><<<reduction == 0 ? unsigned(s.n) : 1u, kThreads, 0, stream>>>(
      partials, parts, s.n, reduction, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t tv_loss_backward(const T* x, const acc_t<T>* grad, int64_t grad_stride, bool mean,
                             const TvShape& s, int p, T* dx, int device, cudaStream_t stream) {
  const int V = tv_vec(x, s) == 1 || reinterpret_cast<uintptr_t>(dx) % 16 != 0 ? 1 : kVec<T>;
  const uint32_t vecs = uint32_t(s.rows * s.row_len / V);
  const int64_t want = ceil_div(int64_t(8) * sm_count(device), s.n);  // ~8 resident blocks per SM
  const dim3 grid(unsigned(std::max<int64_t>(1, std::min(want, ceil_div(vecs, kThreads)))), grid_y(s.n));
  const TvIndex ix = tv_index(s);
  const uint32_t step = uint32_t(s.step);
#define FASTPERC_TV_GRAD(VV, PP) \
  tv_grad_kernel<T, VV, PP><<<grid, kThreads, 0, stream>>>(x, grad, grad_stride, mean, ix, step, vecs, s.n, dx)
  if (V == 1) {
    if (p == 1) FASTPERC_TV_GRAD(1, 1); else FASTPERC_TV_GRAD(1, 2);
  } else {
    if (p == 1) FASTPERC_TV_GRAD(kVec<T>, 1); else FASTPERC_TV_GRAD(kVec<T>, 2);
  }
#undef FASTPERC_TV_GRAD
  return cudaGetLastError();
}

#define FASTPERC_INSTANTIATE_TV(T)                                                                      \
  template cudaError_t tv_loss_forward<T>(const T*, const TvShape&, int, int, int64_t, acc_t<T>*,      \
                                          acc_t<T>*, int, cudaStream_t);                               \
  template cudaError_t tv_loss_backward<T>(const T*, const acc_t<T>*, int64_t, bool, const TvShape&, int, \
                                           T*, int, cudaStream_t);
FASTPERC_INSTANTIATE_TV(float)
FASTPERC_INSTANTIATE_TV(double)
FASTPERC_INSTANTIATE_TV(c10::Half)
FASTPERC_INSTANTIATE_TV(c10::BFloat16)
#undef FASTPERC_INSTANTIATE_TV

}  // namespace fastperc
