// Instance and batch normalisation with the fused ReLU and residual add, forward and backward.
//
//   y = relu?(γ (x − μ) rstd + β) (+ residual),  rstd = 1/sqrt(σ² + ε)
//
// x is (N, C, S = H·W), dense, planar (NCHW) or interleaved (channels_last), read in place.
// A statistic covers (n, c) over S (instance norm, G = N rows of statistics) or c over N·S
// (batch norm, G = 1). Accumulation is fp32 (fp64 for fp64 inputs).
//
// Statistics (the forward when they are not given):
//   1. norm_stats_{planar,interleaved}: block (n, channel or channel tile, split of S) reduces
//      its chunk to a Welford partial (mean, M2) of x − pivot, the pivot being the first
//      element of the statistic's group, so that a large mean costs no precision (never
//      E[x²] − E[x]²). Planar: threads walk the (n, c) row with 16-byte vectors, each vector's
//      mean and M2 computed two-pass in registers and merged by Chan's formula, then a
//      warp-shuffle and shared-memory merge. Interleaved: a thread owns V adjacent channels
//      (one 16-byte load per position) and runs Welford over positions, threads of the same
//      channels are merged by a fixed shared-memory tree. Splitting S keeps ~4 blocks per SM
//      busy when there are few rows: at batch 4 the (4, 32, 256, 256) instance norm has 128
//      rows of 65,536 elements.
//   2. norm_stats_finalize: one thread per statistic merges its partials in a fixed order
//      (deterministic, no atomics) into the double-float mean (hi + lo = pivot + mean, TwoSum),
//      the variance or rstd, and the coefficients of the apply pass.
//   3. norm_apply: y = relu?(fma(x − μ, rstd γ, β)) (+ residual), vectorised, walking the
//      tensor in the reverse order of the statistics pass (its first reads find L2 warm).
//   Bytes: read x twice (once when it stays in L2) and the residual once, write y once:
//   3 (4 with a residual) × numel × itemsize.
//
// Backward (dx = γ rstd (g − A/M − x̂ B/M), g = dy · [z > 0], x̂ = (x − μ) rstd, A = Σ g,
// B = Σ g x̂ over the statistic's M elements; without the mean terms for running statistics):
//   norm_grad_partial_{planar,interleaved} (fp32 partial A and B per split, the ReLU mask
//   recomputed from x with the forward's exact operations), norm_grad_finalize (A and B per
//   statistic in a fixed order, dγ = Σ B, dβ = Σ A, and the apply coefficients),
//   norm_grad_apply (dx). Bytes: read x and dy twice, write dx: 5 × numel × itemsize.
#include <algorithm>
#include <initializer_list>

#include "common.cuh"

namespace fastperc {
namespace {

constexpr int kBlocksPerSm = 4;       // reductions: aim at this many blocks per SM
constexpr int64_t kMaxSplits = 1024;  // at most this many partials per (n, c)
// Note: the interleaved backward kernels keep 5-6 coefficients for each of a thread's V
// channels in registers: ~105 registers for fp16/bf16 (V = 8), so 2 blocks of 256 per SM.
// Bounding them to 3 blocks (80 registers) spills inside the loop (ptxas -v), so they are left
// unbounded; whether fewer channels per thread pays is a question for the GPU benchmarks.

// The per-statistic coefficients, (4, G, C): rstd, scale = rstd γ, k1, k2 (backward:
// dx = scale g + k1 + (x − μ) k2).
enum Coef { kRstd = 0, kScale = 1, kK1 = 2, kK2 = 3 };

// Geometry shared by the kernels. Offsets within one image fit in 32 bits (checked by the host).
struct Geo {
  int64_t n;
  uint32_t C;
  uint32_t S;
  bool per_sample;
  int64_t splits;
  uint32_t chunk;
  // Statistic index of (image b, channel c): b * C + c (instance norm) or c (batch norm).
  __device__ __forceinline__ int64_t stat(int64_t b, uint32_t c) const { return per_sample ? b * C + c : c; }
  __device__ __forceinline__ int64_t groups() const { return per_sample ? n : 1; }
};

// Channel lanes of the interleaved kernels: LC threads cover LC·V adjacent channels, the other
// kThreads / LC threads of the block walk positions.
inline int lanes_c(int64_t C, int V) { return int(std::min<int64_t>(ceil_div(C, V), 32)); }

// ---- statistics ---------------------------------------------------------------------------

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) norm_stats_planar(const T* __restrict__ x, Geo geo,
                                                              acc_t<T>* __restrict__ pmean, acc_t<T>* __restrict__ pm2) {
  using A = acc_t<T>;
  __shared__ Welford<A> scratch[kWarps];
  const int64_t split = blockIdx.x % geo.splits;
  const int64_t row = blockIdx.x / geo.splits;  // b * C + c
  const uint32_t c = uint32_t(row % geo.C);
  const int64_t b = row / geo.C;
  const T* xr = x + row * geo.S;
  const A pivot = to_acc(geo.per_sample ? xr[0] : x[int64_t(c) * geo.S]);
  const uint32_t begin = uint32_t(split) * geo.chunk;
  const uint32_t end = min(begin + geo.chunk, geo.S);
  Welford<A> w{A(0), A(0), 0};
  for (uint32_t k = begin + threadIdx.x * V; k < end; k += kThreads * V) {
    const Vec<T, V> v = load_vec<V>(xr + k);
    A d[V], s = A(0);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      d[e] = to_acc(v.v[e]) - pivot;
      s += d[e];
    }
    Welford<A> wv{s / A(V), A(0), V};
#pragma unroll
    for (int e = 0; e < V; ++e) wv.m2 += (d[e] - wv.mean) * (d[e] - wv.mean);
    w = welford_merge(w, wv);
  }
  w = block_welford(w, scratch);
  if (threadIdx.x == 0) {
    const int64_t out = (b * geo.splits + split) * geo.C + c;
    pmean[out] = w.mean;
    pm2[out] = w.m2;
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) norm_stats_interleaved(const T* __restrict__ x, Geo geo, int lc,
                                                                   acc_t<T>* __restrict__ pmean,
                                                                   acc_t<T>* __restrict__ pm2) {
  using A = acc_t<T>;
  __shared__ A s_mean[kThreads * V];
  __shared__ A s_m2[kThreads * V];
  __shared__ int s_n[kThreads];
  const int ls = kThreads / lc;
  const int tx = threadIdx.x % lc, ty = threadIdx.x / lc;
  const int64_t c_tiles = ceil_div(geo.C, int64_t(lc) * V);
  const int64_t split = blockIdx.x % geo.splits;
  const int64_t bc = blockIdx.x / geo.splits;
  const int64_t b = bc / c_tiles;
  const uint32_t c0 = uint32_t((bc % c_tiles) * lc * V + tx * V);
  const bool active = ty < ls && c0 < geo.C;
  const T* xb = x + b * int64_t(geo.S) * geo.C + c0;
  const T* pivot_ptr = x + (geo.per_sample ? b * int64_t(geo.S) * geo.C : 0) + c0;
  A pivot[V], mean[V], m2[V];
  int count = 0;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    pivot[e] = A(0);
    mean[e] = A(0);
    m2[e] = A(0);
  }
  if (active) {
    const Vec<T, V> pv = load_vec<V>(pivot_ptr);
#pragma unroll
    for (int e = 0; e < V; ++e) pivot[e] = to_acc(pv.v[e]);
    const uint32_t begin = uint32_t(split) * geo.chunk;
    const uint32_t end = min(begin + geo.chunk, geo.S);
    for (uint32_t s = begin + ty; s < end; s += ls) {
      const Vec<T, V> v = load_vec<V>(xb + int64_t(s) * geo.C);
      ++count;
      const A inv = A(1) / A(count);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const A d = to_acc(v.v[e]) - pivot[e];
        const A delta = d - mean[e];
        mean[e] += delta * inv;
        m2[e] += delta * (d - mean[e]);
      }
    }
  }
  // Merge the ls states of each channel lane: a fixed pairwise tree in shared memory.
#pragma unroll
  for (int e = 0; e < V; ++e) {
    s_mean[threadIdx.x * V + e] = mean[e];
    s_m2[threadIdx.x * V + e] = m2[e];
  }
  s_n[threadIdx.x] = count;
  __syncthreads();
  for (int m = ls; m > 1;) {
    const int half = (m + 1) / 2;
    if (ty + half < m) {
      const int other = threadIdx.x + half * lc;
      const int n_o = s_n[other];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        Welford<A> w = welford_merge(Welford<A>{mean[e], m2[e], count},
                                     Welford<A>{s_mean[other * V + e], s_m2[other * V + e], n_o});
        mean[e] = w.mean;
        m2[e] = w.m2;
        s_mean[threadIdx.x * V + e] = w.mean;
        s_m2[threadIdx.x * V + e] = w.m2;
      }
      count += n_o;
      s_n[threadIdx.x] = count;
    }
    __syncthreads();
    m = half;
  }
  if (ty == 0 && c0 < geo.C) {
    const int64_t out = (b * geo.splits + split) * geo.C + c0;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      pmean[out + e] = mean[e];
      pm2[out + e] = m2[e];
    }
  }
}

template <typename A>
__device__ __forceinline__ void write_coef(A* coef, int64_t gc, int64_t i, uint32_t c, A rstd, const A* weight) {
  coef[kRstd * gc + i] = rstd;
  coef[kScale * gc + i] = weight != nullptr ? rstd * weight[c] : rstd;
}

// One thread per statistic (g, c): merge its partials in order; write mean (2, G, C), stat
// (G, C: var or rstd) and the coefficients.
template <typename T>
__global__ void __launch_bounds__(kThreads) norm_stats_finalize(const T* __restrict__ x, Geo geo, bool channels_last,
                                                                const acc_t<T>* __restrict__ pmean,
                                                                const acc_t<T>* __restrict__ pm2, acc_t<T> eps,
                                                                bool stat_is_var, const acc_t<T>* __restrict__ weight,
                                                                acc_t<T>* __restrict__ mean, acc_t<T>* __restrict__ stat,
                                                                acc_t<T>* __restrict__ coef) {
  using A = acc_t<T>;
  const int64_t gc = geo.groups() * geo.C;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= gc) return;
  const uint32_t c = uint32_t(i % geo.C);
  const int64_t g = i / geo.C;
  const int64_t b_first = geo.per_sample ? g : 0, b_end = geo.per_sample ? g + 1 : geo.n;
  Welford<A> w{A(0), A(0), 0};
  for (int64_t b = b_first; b < b_end; ++b) {
    for (int64_t j = 0; j < geo.splits; ++j) {
      const int64_t part = (b * geo.splits + j) * geo.C + c;
      const int64_t cnt = min(int64_t(geo.chunk), int64_t(geo.S) - j * geo.chunk);
      if (cnt > 0) w = welford_merge(w, Welford<A>{pmean[part], pm2[part], cnt});
    }
  }
  // The counts of a batch-norm channel can pass 2^31: the variance uses the exact total.
  const A total = A(b_end - b_first) * A(geo.S);
  const A var = w.m2 / total;
  const T* pivot_ptr = channels_last ? x + b_first * int64_t(geo.S) * geo.C + c : x + (b_first * geo.C + c) * int64_t(geo.S);
  A hi, lo;
  two_sum(to_acc(*pivot_ptr), w.mean, hi, lo);
  mean[i] = hi;
  mean[gc + i] = lo;
  const A rstd = A(1) / sqrt(var + eps);
  stat[i] = stat_is_var ? var : rstd;
  write_coef(coef, gc, i, c, rstd, weight);
}

// The coefficients from given statistics (running statistics, or the backward's saved ones).
template <typename A>
__global__ void __launch_bounds__(kThreads) norm_coef(Geo geo, const A* __restrict__ stat, A eps, bool stat_is_var,
                                                      const A* __restrict__ weight, A* __restrict__ coef) {
  const int64_t gc = geo.groups() * geo.C;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= gc) return;
  const A rstd = stat_is_var ? A(1) / sqrt(stat[i] + eps) : stat[i];
  write_coef(coef, gc, i, uint32_t(i % geo.C), rstd, weight);
}

// ---- the elementwise passes ---------------------------------------------------------------

// Per-statistic values an elementwise pass needs, in acc_t.
template <typename A> struct ChannelCoef {
  A hi, lo, scale, shift, k1, k2;
};

template <typename A, bool GRAD>
__device__ __forceinline__ ChannelCoef<A> channel_coef(const Geo& geo, int64_t b, uint32_t c, const A* __restrict__ mean,
                                                       const A* __restrict__ coef, const A* __restrict__ bias) {
  const int64_t gc = geo.groups() * geo.C;
  const int64_t i = geo.stat(b, c);
  ChannelCoef<A> k;
  k.hi = mean[i];
  k.lo = mean[gc + i];
  k.scale = coef[kScale * gc + i];
  k.shift = bias != nullptr ? bias[c] : A(0);
  if (GRAD) {
    k.k1 = coef[kK1 * gc + i];
    k.k2 = coef[kK2 * gc + i];
  }
  return k;
}

// x − μ for the double-float μ = hi + lo; the forward and the backward share it (and the fma
// below), so the backward's ReLU mask is the forward's bit for bit.
template <typename A> __device__ __forceinline__ A centred(A x, const ChannelCoef<A>& k) { return (x - k.hi) - k.lo; }
template <typename A> __device__ __forceinline__ A pre_activation(A xm, const ChannelCoef<A>& k) {
  return fma(xm, k.scale, k.shift);
}

// One element of y = relu?(z) (+ r) (forward) or dx = scale g + k1 + (x − μ) k2 with
// g = r · [z > 0] (backward, r = dy), z = fma(x − μ, scale, shift).
template <typename T, bool GRAD>
__device__ __forceinline__ T apply_one(T xv, T rv, bool has_r, bool relu, const ChannelCoef<acc_t<T>>& k) {
  using A = acc_t<T>;
  const A xm = centred(to_acc(xv), k);
  const A z = pre_activation(xm, k);
  if (GRAD) {
    const A g = (relu && !(z > A(0))) ? A(0) : to_acc(rv);
    return static_cast<T>(fma(k.scale, g, fma(xm, k.k2, k.k1)));
  }
  A y = (relu && z < A(0)) ? A(0) : z;
  if (has_r) y += to_acc(rv);
  return static_cast<T>(y);
}

// y (forward, GRAD false) or dx (GRAD true), planar: one image per blockIdx.y step, V elements
// of one (n, c) row a thread (S % V == 0), so the coefficients are per vector (and the same
// for most of a warp: broadcast loads).
template <typename T, int V, bool GRAD>
__global__ void __launch_bounds__(kThreads) norm_apply_planar(const T* __restrict__ x, const T* __restrict__ other,
                                                              Geo geo, FastDiv div_s, const acc_t<T>* __restrict__ mean,
                                                              const acc_t<T>* __restrict__ coef,
                                                              const acc_t<T>* __restrict__ bias, bool relu,
                                                              T* __restrict__ out) {
  // other: the residual (forward, may be null) or dy (backward).
  using A = acc_t<T>;
  const uint32_t vecs = uint32_t(int64_t(geo.C) * geo.S / V);
  for (int64_t step = blockIdx.y; step < geo.n; step += gridDim.y) {
    const int64_t b = geo.n - 1 - step;  // reverse order: the statistics pass read the end last
    const int64_t base = b * int64_t(geo.C) * geo.S;
    for (uint32_t t = blockIdx.x * kThreads + threadIdx.x; t < vecs; t += gridDim.x * kThreads) {
      const uint32_t off = (vecs - 1 - t) * V;
      const ChannelCoef<A> k = channel_coef<A, GRAD>(geo, b, div_s.div(off), mean, coef, bias);
      const Vec<T, V> xv = load_vec<V>(x + base + off);
      Vec<T, V> rv{}, ov;
      if (GRAD || other != nullptr) rv = load_vec<V>(other + base + off);
#pragma unroll
      for (int e = 0; e < V; ++e) ov.v[e] = apply_one<T, GRAD>(xv.v[e], rv.v[e], other != nullptr, relu, k);
      store_vec<V>(out + base + off, ov);
    }
  }
}

// The same, channels_last: block (n, channel tile, run of positions) in reverse order; a
// thread owns V adjacent channels, keeps their coefficients in registers and walks positions.
template <typename T, int V, bool GRAD>
__global__ void __launch_bounds__(kThreads) norm_apply_interleaved(const T* __restrict__ x, const T* __restrict__ other,
                                                                   Geo geo, int lc, uint32_t run,
                                                                   const acc_t<T>* __restrict__ mean,
                                                                   const acc_t<T>* __restrict__ coef,
                                                                   const acc_t<T>* __restrict__ bias, bool relu,
                                                                   T* __restrict__ out) {
  using A = acc_t<T>;
  const int ls = kThreads / lc;
  const int tx = threadIdx.x % lc, ty = threadIdx.x / lc;
  const int64_t c_tiles = ceil_div(geo.C, int64_t(lc) * V);
  const int64_t runs = ceil_div(geo.S, run);
  const int64_t bid = int64_t(gridDim.x) - 1 - blockIdx.x;
  const int64_t bc = bid / runs;
  const int64_t b = bc / c_tiles;
  const uint32_t c0 = uint32_t((bc % c_tiles) * lc * V + tx * V);
  if (ty >= ls || c0 >= geo.C) return;
  ChannelCoef<A> k[V];
#pragma unroll
  for (int e = 0; e < V; ++e) k[e] = channel_coef<A, GRAD>(geo, b, c0 + e, mean, coef, bias);
  const int64_t base = b * int64_t(geo.S) * geo.C + c0;
  const uint32_t begin = uint32_t(bid % runs) * run;
  const uint32_t end = min(begin + run, geo.S);
  for (uint32_t s = begin + ty; s < end; s += ls) {
    const int64_t off = base + int64_t(s) * geo.C;
    const Vec<T, V> xv = load_vec<V>(x + off);
    Vec<T, V> rv{}, ov;
    if (GRAD || other != nullptr) rv = load_vec<V>(other + off);
#pragma unroll
    for (int e = 0; e < V; ++e) ov.v[e] = apply_one<T, GRAD>(xv.v[e], rv.v[e], other != nullptr, relu, k[e]);
    store_vec<V>(out + off, ov);
  }
}

// ---- backward reductions ------------------------------------------------------------------

template <typename T> struct GradTerms {
  acc_t<T> g, gx;  // g = dy · mask, and g · x̂
};

template <typename T>
__device__ __forceinline__ GradTerms<T> grad_terms(T xv, T dyv, const ChannelCoef<acc_t<T>>& k, acc_t<T> rstd,
                                                   bool relu) {
  using A = acc_t<T>;
  const A xm = centred(to_acc(xv), k);
  const A g = (relu && !(pre_activation(xm, k) > A(0))) ? A(0) : to_acc(dyv);
  return GradTerms<T>{g, g * (xm * rstd)};
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) norm_grad_partial_planar(const T* __restrict__ dy, const T* __restrict__ x,
                                                                     Geo geo, const acc_t<T>* __restrict__ mean,
                                                                     const acc_t<T>* __restrict__ coef,
                                                                     const acc_t<T>* __restrict__ bias, bool relu,
                                                                     acc_t<T>* __restrict__ pa,
                                                                     acc_t<T>* __restrict__ pb) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarps];
  const int64_t split = blockIdx.x % geo.splits;
  const int64_t row = blockIdx.x / geo.splits;
  const uint32_t c = uint32_t(row % geo.C);
  const int64_t b = row / geo.C;
  const ChannelCoef<A> k = channel_coef<A, false>(geo, b, c, mean, coef, bias);
  const A rstd = coef[kRstd * geo.groups() * geo.C + geo.stat(b, c)];
  const uint32_t begin = uint32_t(split) * geo.chunk;
  const uint32_t end = min(begin + geo.chunk, geo.S);
  A sa = A(0), sb = A(0);
  for (uint32_t j = begin + threadIdx.x * V; j < end; j += kThreads * V) {
    const Vec<T, V> xv = load_vec<V>(x + row * geo.S + j);
    const Vec<T, V> dv = load_vec<V>(dy + row * geo.S + j);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const GradTerms<T> t = grad_terms<T>(xv.v[e], dv.v[e], k, rstd, relu);
      sa += t.g;
      sb += t.gx;
    }
  }
  sa = block_sum(sa, scratch);
  sb = block_sum(sb, scratch);
  if (threadIdx.x == 0) {
    const int64_t out = (b * geo.splits + split) * geo.C + c;
    pa[out] = sa;
    pb[out] = sb;
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) norm_grad_partial_interleaved(
    const T* __restrict__ dy, const T* __restrict__ x, Geo geo, int lc, const acc_t<T>* __restrict__ mean,
    const acc_t<T>* __restrict__ coef, const acc_t<T>* __restrict__ bias, bool relu, acc_t<T>* __restrict__ pa,
    acc_t<T>* __restrict__ pb) {
  using A = acc_t<T>;
  __shared__ A s_a[kThreads * V];
  __shared__ A s_b[kThreads * V];
  const int ls = kThreads / lc;
  const int tx = threadIdx.x % lc, ty = threadIdx.x / lc;
  const int64_t c_tiles = ceil_div(geo.C, int64_t(lc) * V);
  const int64_t split = blockIdx.x % geo.splits;
  const int64_t bc = blockIdx.x / geo.splits;
  const int64_t b = bc / c_tiles;
  const uint32_t c0 = uint32_t((bc % c_tiles) * lc * V + tx * V);
  A sa[V], sb[V];
#pragma unroll
  for (int e = 0; e < V; ++e) sa[e] = sb[e] = A(0);
  if (ty < ls && c0 < geo.C) {
    ChannelCoef<A> k[V];
    A rstd[V];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      k[e] = channel_coef<A, false>(geo, b, c0 + e, mean, coef, bias);
      rstd[e] = coef[kRstd * geo.groups() * geo.C + geo.stat(b, c0 + e)];
    }
    const int64_t base = b * int64_t(geo.S) * geo.C + c0;
    const uint32_t begin = uint32_t(split) * geo.chunk;
    const uint32_t end = min(begin + geo.chunk, geo.S);
    for (uint32_t s = begin + ty; s < end; s += ls) {
      const Vec<T, V> xv = load_vec<V>(x + base + int64_t(s) * geo.C);
      const Vec<T, V> dv = load_vec<V>(dy + base + int64_t(s) * geo.C);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const GradTerms<T> t = grad_terms<T>(xv.v[e], dv.v[e], k[e], rstd[e], relu);
        sa[e] += t.g;
        sb[e] += t.gx;
      }
    }
  }
#pragma unroll
  for (int e = 0; e < V; ++e) {
    s_a[threadIdx.x * V + e] = sa[e];
    s_b[threadIdx.x * V + e] = sb[e];
  }
  __syncthreads();
  for (int m = ls; m > 1;) {
    const int half = (m + 1) / 2;
    if (ty + half < m) {
      const int other = threadIdx.x + half * lc;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        sa[e] += s_a[other * V + e];
        sb[e] += s_b[other * V + e];
        s_a[threadIdx.x * V + e] = sa[e];
        s_b[threadIdx.x * V + e] = sb[e];
      }
    }
    __syncthreads();
    m = half;
  }
  if (ty == 0 && c0 < geo.C) {
    const int64_t out = (b * geo.splits + split) * geo.C + c0;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      pa[out + e] = sa[e];
      pb[out + e] = sb[e];
    }
  }
}

// One thread per channel c: per statistic g (in order) A and B from its partials, the apply
// coefficients k1, k2; dγ[c] = Σ_g B, dβ[c] = Σ_g A.
template <typename A>
__global__ void __launch_bounds__(kThreads) norm_grad_finalize(Geo geo, const A* __restrict__ pa, const A* __restrict__ pb,
                                                               bool centred, A* __restrict__ coef, A* __restrict__ dweight,
                                                               A* __restrict__ dbias) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= geo.C) return;
  const int64_t gc = geo.groups() * geo.C;
  const int64_t parts_per_stat = geo.per_sample ? geo.splits : geo.n * geo.splits;
  const A m = geo.per_sample ? A(geo.S) : A(geo.n) * A(geo.S);
  A dw = A(0), db = A(0);
  for (int64_t g = 0; g < geo.groups(); ++g) {
    A sa = A(0), sb = A(0);
    for (int64_t j = 0; j < parts_per_stat; ++j) {
      const int64_t part = (g * parts_per_stat + j) * geo.C + c;
      sa += pa[part];
      sb += pb[part];
    }
    const int64_t i = g * geo.C + c;
    const A scale = coef[kScale * gc + i];
    coef[kK1 * gc + i] = centred ? -scale * sa / m : A(0);
    coef[kK2 * gc + i] = centred ? -scale * coef[kRstd * gc + i] * sb / m : A(0);
    dw += sb;
    db += sa;
  }
  dweight[c] = dw;
  dbias[c] = db;
}

// ---- launch helpers -----------------------------------------------------------------------

template <typename T> bool aligned16(const T* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte vectors when every tensor's pointer is aligned and vectors cannot straddle a row
// (planar: S % V) or run past a position's channels (interleaved: C % V).
template <typename T> bool vectorisable(const NormShape& shape, std::initializer_list<const T*> ptrs) {
  constexpr int V = kVec<T>;
  for (const T* p : ptrs)
    if (!aligned16(p)) return false;
  return shape.channels_last ? shape.c % V == 0 : shape.s % V == 0;
}

Geo make_geo(const NormShape& shape, const NormPlan& plan) {
  return Geo{shape.n, uint32_t(shape.c), uint32_t(shape.s), shape.per_sample, plan.splits, uint32_t(plan.chunk)};
}

unsigned blocks_for(int64_t threads) { return unsigned(ceil_div(threads, kThreads)); }

// Blocks of a reduction pass: (n, channel or channel tile, split).
unsigned reduce_blocks(const NormShape& shape, const NormPlan& plan, int lc, int V) {
  const int64_t per_image = shape.channels_last ? ceil_div(shape.c, int64_t(lc) * V) : shape.c;
  return unsigned(shape.n * per_image * plan.splits);
}

template <typename T, bool GRAD>
void launch_apply(const T* x, const T* other, const Geo& geo, const NormShape& shape, const acc_t<T>* mean,
                  const acc_t<T>* coef, const acc_t<T>* bias, bool relu, T* out, bool vec, int device,
                  cudaStream_t stream) {
  const int V = vec ? kVec<T> : 1;
  if (shape.channels_last) {
    // Runs of 8 positions per thread; the grid is n x channel tiles x runs.
    const int lc = lanes_c(shape.c, V);
    const uint32_t run = uint32_t(8 * (kThreads / lc));
    const unsigned blocks = unsigned(shape.n * ceil_div(shape.c, int64_t(lc) * V) * ceil_div(shape.s, run));
#define FASTPERC_APPLY_CL(VV) \
  norm_apply_interleaved<T, VV, GRAD><<<blocks, kThreads, 0, stream>>>(x, other, geo, lc, run, mean, coef, bias, relu, out)
    if (vec) FASTPERC_APPLY_CL(kVec<T>); else FASTPERC_APPLY_CL(1);
#undef FASTPERC_APPLY_CL
  } else {
    // Up to ~8 resident blocks per SM in all, a grid-stride loop over each image; images on y.
    const int64_t vecs = shape.c * shape.s / V;
    const unsigned y = unsigned(std::min<int64_t>(shape.n, 65535));
    const int64_t want = ceil_div(int64_t(8) * sm_count(device), y);
    const dim3 grid(unsigned(std::max<int64_t>(1, std::min(want, ceil_div(vecs, kThreads)))), y);
    const FastDiv div_s(uint32_t(shape.s));
#define FASTPERC_APPLY_PLANAR(VV) \
  norm_apply_planar<T, VV, GRAD><<<grid, kThreads, 0, stream>>>(x, other, geo, div_s, mean, coef, bias, relu, out)
    if (vec) FASTPERC_APPLY_PLANAR(kVec<T>); else FASTPERC_APPLY_PLANAR(1);
#undef FASTPERC_APPLY_PLANAR
  }
}

}  // namespace

NormPlan norm_plan(const NormShape& shape, int device) {
  // Rows of independent work the reduction has without splitting S, and how many positions
  // one block should at least walk (a few iterations of every thread).
  const int64_t rows = shape.channels_last ? shape.n * ceil_div(shape.c, int64_t(32) * kVec<float>) : shape.n * shape.c;
  const int64_t min_chunk = shape.channels_last ? 64 : int64_t(kThreads) * kVec<float> * 2;
  int64_t splits = ceil_div(int64_t(kBlocksPerSm) * sm_count(device), rows);
  splits = std::max<int64_t>(1, std::min({splits, kMaxSplits, ceil_div(shape.s, min_chunk)}));
  // Chunks are multiples of 8 positions, so that planar chunks start on a 16-byte boundary.
  const int64_t chunk = ceil_div(ceil_div(shape.s, splits), 8) * 8;
  return NormPlan{ceil_div(shape.s, chunk), chunk};
}

template <typename T>
cudaError_t norm_forward(const T* x, const acc_t<T>* weight, const acc_t<T>* bias, const T* residual,
                         double eps, bool relu, bool stats_given, bool stat_is_var, const NormShape& shape,
                         const NormPlan& plan, acc_t<T>* workspace, acc_t<T>* mean, acc_t<T>* stat,
                         acc_t<T>* coef, T* y, int device, cudaStream_t stream) {
  using A = acc_t<T>;
  const Geo geo = make_geo(shape, plan);
  const int64_t gc = (shape.per_sample ? shape.n : 1) * shape.c;
  const bool vec = vectorisable<T>(shape, {x, residual, y});
  if (stats_given) {
    norm_coef<A><<<blocks_for(gc), kThreads, 0, stream>>>(geo, stat, A(eps), stat_is_var, weight, coef);
  } else {
    A* pmean = workspace;
    A* pm2 = workspace + shape.n * plan.splits * shape.c;
    const int V = vec ? kVec<T> : 1;
    if (shape.channels_last) {
      const int lc = lanes_c(shape.c, V);
      const unsigned blocks = reduce_blocks(shape, plan, lc, V);
      if (vec) norm_stats_interleaved<T, kVec<T>><<<blocks, kThreads, 0, stream>>>(x, geo, lc, pmean, pm2);
      else norm_stats_interleaved<T, 1><<<blocks, kThreads, 0, stream>>>(x, geo, lc, pmean, pm2);
    } else {
      const unsigned blocks = reduce_blocks(shape, plan, 0, V);
      if (vec) norm_stats_planar<T, kVec<T>><<<blocks, kThreads, 0, stream>>>(x, geo, pmean, pm2);
      else norm_stats_planar<T, 1><<<blocks, kThreads, 0, stream>>>(x, geo, pmean, pm2);
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    norm_stats_finalize<T><<<blocks_for(gc), kThreads, 0, stream>>>(x, geo, shape.channels_last, pmean, pm2, A(eps),
                                                                      stat_is_var, weight, mean, stat, coef);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  launch_apply<T, false>(x, residual, geo, shape, mean, coef, bias, relu, y, vec, device, stream);
  return cudaGetLastError();
}

template <typename T>
cudaError_t norm_backward(const T* dy, const T* x, const acc_t<T>* weight, const acc_t<T>* bias,
                          const acc_t<T>* mean, const acc_t<T>* stat, double eps, bool relu, bool stat_is_var,
                          bool centred, const NormShape& shape, const NormPlan& plan, acc_t<T>* workspace,
                          acc_t<T>* coef, T* dx, acc_t<T>* dweight, acc_t<T>* dbias, int device,
                          cudaStream_t stream) {
  using A = acc_t<T>;
  const Geo geo = make_geo(shape, plan);
  const int64_t gc = (shape.per_sample ? shape.n : 1) * shape.c;
  const bool vec = vectorisable<T>(shape, {x, dy, dx});
  norm_coef<A><<<blocks_for(gc), kThreads, 0, stream>>>(geo, stat, A(eps), stat_is_var, weight, coef);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  A* pa = workspace;
  A* pb = workspace + shape.n * plan.splits * shape.c;
  const int V = vec ? kVec<T> : 1;
  if (shape.channels_last) {
    const int lc = lanes_c(shape.c, V);
    const unsigned blocks = reduce_blocks(shape, plan, lc, V);
    if (vec)
      norm_grad_partial_interleaved<T, kVec<T>><<<blocks, kThreads, 0, stream>>>(dy, x, geo, lc, mean, coef, bias,
                                                                                  relu, pa, pb);
    else
      norm_grad_partial_interleaved<T, 1><<<blocks, kThreads, 0, stream>>>(dy, x, geo, lc, mean, coef, bias, relu,
                                                                            pa, pb);
  } else {
    const unsigned blocks = reduce_blocks(shape, plan, 0, V);
    if (vec)
      norm_grad_partial_planar<T, kVec<T>><<<blocks, kThreads, 0, stream>>>(dy, x, geo, mean, coef, bias, relu, pa, pb);
    else
      norm_grad_partial_planar<T, 1><<<blocks, kThreads, 0, stream>>>(dy, x, geo, mean, coef, bias, relu, pa, pb);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  norm_grad_finalize<A><<<blocks_for(shape.c), kThreads, 0, stream>>>(geo, pa, pb, centred, coef, dweight, dbias);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  launch_apply<T, true>(x, dy, geo, shape, mean, coef, bias, relu, dx, vec, device, stream);
  return cudaGetLastError();
}

#define FASTPERC_INSTANTIATE_NORM(T)                                                                            \
  template cudaError_t norm_forward<T>(const T*, const acc_t<T>*, const acc_t<T>*, const T*, double, bool, bool, \
                                       bool, const NormShape&, const NormPlan&, acc_t<T>*, acc_t<T>*, acc_t<T>*, \
                                       acc_t<T>*, T*, int, cudaStream_t);                                       \
  template cudaError_t norm_backward<T>(const T*, const T*, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*,   \
                                        const acc_t<T>*, double, bool, bool, bool, const NormShape&,             \
                                        const NormPlan&, acc_t<T>*, acc_t<T>*, T*, acc_t<T>*, acc_t<T>*, int,    \
                                        cudaStream_t);
FASTPERC_INSTANTIATE_NORM(float)
FASTPERC_INSTANTIATE_NORM(double)
FASTPERC_INSTANTIATE_NORM(c10::Half)
FASTPERC_INSTANTIATE_NORM(c10::BFloat16)
#undef FASTPERC_INSTANTIATE_NORM

}  // namespace fastperc
