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
//   2. norm_stats_finalize: a block per (statistic row, tile of up to 32 channels) merges the
//      row's partials in parallel, Chan's combine in its k-way form over part lanes and a fixed
//      tree (deterministic, no atomics), into the double-float mean (hi + lo = pivot + mean,
//      TwoSum), the variance or rstd, and the coefficients of the apply pass.
//   3. norm_apply: y = relu?(fma(x − μ, rstd γ, β)) (+ residual), vectorised, walking the
//      tensor in the reverse order of the statistics pass (its first reads find L2 warm).
//   Bytes: read x twice (once when it stays in L2) and the residual once, write y once:
//   3 (4 with a residual) × numel × itemsize.
//
// Backward (dx = γ rstd (g − A/M − x̂ B/M), g = dy · [z > 0], x̂ = (x − μ) rstd, A = Σ g,
// B = Σ g x̂ over the statistic's M elements; without the mean terms for running statistics):
//   norm_grad_partial_{planar,interleaved} (fp32 partial A and B per split, the ReLU mask
//   recomputed from x with the forward's exact operations), norm_grad_finalize (a block per
//   (statistic row, channel tile): A and B from the row's partials in parallel, the apply
//   coefficients, the row's sums: the gradients of (N, C) parameters), norm_param_grads (dγ =
//   Σ_g B, dβ = Σ_g A over the rows in order, for (C,) parameters of instance norm),
//   norm_grad_apply (dx). Bytes: read x and dy twice, write dx: 5 × numel × itemsize.
//
// γ and β are (C,) or, for instance norm, (N, C) (conditional instance norm): element (b, c) at
// b · row stride + c, the row stride 0 or C (NormAffine).
//
// Every memory-bound loop loads several independent 16-byte vectors per thread before using
// them (kUnrollFor<V>: 4 of fp32/fp64, 2 of fp16/bf16, whose unpacked elements take twice the
// registers; 2 positions in the interleaved backward), so that several requests per thread are
// in flight: one at a time, at 4 blocks of 256 per SM (the reductions' grid), covers too little
// of HBM's latency-bandwidth product (predicted 60-70% of bandwidth; benchmarks/NOTES.md). The
// reductions stay within 64 registers (4 blocks resident; sm_90, ptxas -v), but the interleaved
// backward of fp16/bf16 (2 blocks, as before).
//
// Floors on the H200 (~4.3 TB/s), fp32 (fp16/bf16: half), at the DESIGN.md activations:
//   forward  2 · numel · itemsize (read x, write y; +1 with a residual), backward 3 · (x, dy, dx)
//   (4, 32, 256, 256):  67.1 MB 15.6 µs  /  101 MB 23.4 µs
//   (4, 64, 128, 128):  33.6 MB  7.8 µs  /  50.3 MB 11.7 µs
//   (4, 128, 64, 64):   16.8 MB  3.9 µs  /  25.2 MB  5.9 µs
// The design reads x twice in each direction (the second from L2 when it fits in 60 MB).
#include <algorithm>
#include <initializer_list>

#include "common.cuh"

namespace fastperc {
namespace {

constexpr int kBlocksPerSm = 4;       // reductions: aim at this many blocks per SM
constexpr int64_t kMaxSplits = 1024;  // at most this many partials per (n, c)
// Note: the interleaved backward kernels keep 5-6 coefficients for each of a thread's V
// channels in registers: 106-119 registers for fp16/bf16 (V = 8, two positions in flight;
// sm_90, ptxas -v), so 2 blocks of 256 per SM; four positions took 141 (one block). Bounding
// them to 3 blocks (80 registers) spilled inside the loop, so they are left unbounded; whether
// fewer channels per thread pays is a question for the GPU benchmarks.

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
  // Partials per statistic, stored one after another: the splits of its row (instance norm)
  // or of every image (batch norm).
  __device__ __forceinline__ int64_t parts() const { return per_sample ? splits : n * splits; }
  // Positions of a statistic's partial p: its split is p % splits, the last one shorter.
  __device__ __forceinline__ int64_t part_count(int64_t p) const {
    return min(int64_t(chunk), int64_t(S) - (p % splits) * int64_t(chunk));
  }
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
  constexpr uint32_t kStride = kThreads * V;
  constexpr int U = kUnrollFor<V>;
  Welford<A> w{A(0), A(0), 0};
  for (uint32_t k0 = begin + threadIdx.x * V; k0 < end; k0 += kStride * U) {
    Vec<T, V> v[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (k0 + u * kStride < end) v[u] = load_vec<V>(xr + k0 + u * kStride);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (k0 + u * kStride >= end) continue;
      A d[V], sum = A(0);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        d[e] = to_acc(v[u].v[e]) - pivot;
        sum += d[e];
      }
      Welford<A> wv{sum / A(V), A(0), V};
#pragma unroll
      for (int e = 0; e < V; ++e) wv.m2 += (d[e] - wv.mean) * (d[e] - wv.mean);
      w = welford_merge(w, wv);
    }
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
    constexpr int U = kUnrollFor<V>;
    for (uint32_t s0 = begin + ty; s0 < end; s0 += ls * U) {
      Vec<T, V> v[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (s0 + u * ls < end) v[u] = load_vec<V>(xb + int64_t(s0 + u * ls) * geo.C);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (s0 + u * ls >= end) continue;
        ++count;
        const A inv = A(1) / A(count);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const A d = to_acc(v[u].v[e]) - pivot[e];
          const A delta = d - mean[e];
          mean[e] += delta * inv;
          m2[e] += delta * (d - mean[e]);
        }
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

// ---- finalize: a statistic's partials merged by a block, in parallel --------------------------
//
// Block (channel tile, statistic row g): ct adjacent channels (lanes tx: coalesced reads of the
// (parts, C) partials) times kThreads / ct part lanes ty, each walking parts ty, ty + lanes, ...
// (kUnroll loads in flight), then a fixed pairwise tree over the part lanes. ct is a power of
// two, at most kFinalizeChannels: 32 channels for C >= 32 (8 part lanes), 4 for C = 3 (64).

constexpr int kFinalizeChannels = 32;

inline int finalize_channels(int64_t C) {
  int ct = 1;
  while (ct < C && ct < kFinalizeChannels) ct *= 2;
  return ct;
}

// The sum of v over the part lanes of a finalize block, in a fixed pairwise order, returned to
// every thread (its channel lane's total). scratch: kThreads values. Starts and ends with a
// barrier: every thread of the block must call it.
template <typename A> __device__ __forceinline__ A part_lane_sum(A v, A* scratch, int ct) {
  const int ty = threadIdx.x / ct;
  __syncthreads();  // scratch may still be read by a previous call
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int half = kThreads / ct / 2; half > 0; half /= 2) {
    // Part lane ty < half adds lane ty + half's value; no thread reads a slot below half.
    if (ty < half) scratch[threadIdx.x] = v = v + scratch[threadIdx.x + half * ct];
    __syncthreads();
  }
  return scratch[threadIdx.x % ct];
}

// Where a finalize block's thread works: channel c of its tile (active while c < C), part lane
// ty of `lanes`, statistic row g, whose partial p is at offset + p · C.
struct FinalizeLane {
  int ty, lanes;
  uint32_t c;
  int64_t g, parts, offset;
  bool active;
  __device__ FinalizeLane(const Geo& geo, int ct)
      : ty(int(threadIdx.x) / ct), lanes(kThreads / ct), c(uint32_t(blockIdx.x) * ct + threadIdx.x % ct),
        g(blockIdx.y), parts(geo.parts()), offset(g * parts * geo.C + c), active(c < geo.C) {}
};

template <typename A>
__device__ __forceinline__ void write_coef(A* coef, int64_t gc, int64_t i, int64_t g, uint32_t c, A rstd,
                                           const NormAffine<A>& affine) {
  coef[kRstd * gc + i] = rstd;
  coef[kScale * gc + i] = affine.weight != nullptr ? rstd * affine.weight[g * affine.weight_sn + c] : rstd;
}

// Block (channel tile, g): merge the partials (count n_j, mean_j, M2_j) of statistic row g by
// Chan's combine in its k-way form, n = Σ n_j, mean = Σ n_j mean_j / n,
// M2 = Σ M2_j + Σ n_j (mean_j − mean)² (two passes over the partials, the second from L1/L2;
// equal to the pairwise tree of merges, and no division per merge); write mean (2, G, C), stat
// (G, C: var or rstd) and the coefficients.
template <typename T>
__global__ void __launch_bounds__(kThreads) norm_stats_finalize(const T* __restrict__ x, Geo geo, bool channels_last,
                                                                int ct, const acc_t<T>* __restrict__ pmean,
                                                                const acc_t<T>* __restrict__ pm2, acc_t<T> eps,
                                                                bool stat_is_var, NormAffine<acc_t<T>> affine,
                                                                acc_t<T>* __restrict__ mean, acc_t<T>* __restrict__ stat,
                                                                acc_t<T>* __restrict__ coef) {
  using A = acc_t<T>;
  __shared__ A scratch[kThreads];
  const FinalizeLane t(geo, ct);
  const A* pm = pmean + t.offset;  // partial p of this statistic at pm[p * C]
  const A* p2 = pm2 + t.offset;
  // Positions of the statistic: N·S can pass 2^31 for batch norm, so it is formed in A.
  const A total = A(geo.per_sample ? 1 : geo.n) * A(geo.S);
  A s1 = A(0);
  if (t.active) {
#pragma unroll kUnroll
    for (int64_t p = t.ty; p < t.parts; p += t.lanes) s1 += A(geo.part_count(p)) * pm[p * geo.C];
  }
  const A mean_d = part_lane_sum(s1, scratch, ct) / total;
  A s2 = A(0);
  if (t.active) {
#pragma unroll kUnroll
    for (int64_t p = t.ty; p < t.parts; p += t.lanes) {
      const A dev = pm[p * geo.C] - mean_d;
      s2 += p2[p * geo.C] + A(geo.part_count(p)) * (dev * dev);
    }
  }
  const A m2 = part_lane_sum(s2, scratch, ct);
  if (t.ty != 0 || !t.active) return;
  const uint32_t c = t.c;
  const int64_t g = t.g;
  const int64_t gc = geo.groups() * geo.C;
  const int64_t i = g * geo.C + c;
  const A var = m2 / total;
  const int64_t b_first = geo.per_sample ? g : 0;
  const T* pivot_ptr =
      channels_last ? x + b_first * int64_t(geo.S) * geo.C + c : x + (b_first * geo.C + c) * int64_t(geo.S);
  A hi, lo;
  two_sum(to_acc(*pivot_ptr), mean_d, hi, lo);
  mean[i] = hi;
  mean[gc + i] = lo;
  const A rstd = A(1) / sqrt(var + eps);
  stat[i] = stat_is_var ? var : rstd;
  write_coef(coef, gc, i, g, c, rstd, affine);
}

// The coefficients from given statistics (running statistics, or the backward's saved ones).
template <typename A>
__global__ void __launch_bounds__(kThreads) norm_coef(Geo geo, const A* __restrict__ stat, A eps, bool stat_is_var,
                                                      NormAffine<A> affine, A* __restrict__ coef) {
  const int64_t gc = geo.groups() * geo.C;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= gc) return;
  const A rstd = stat_is_var ? A(1) / sqrt(stat[i] + eps) : stat[i];
  write_coef(coef, gc, i, i / geo.C, uint32_t(i % geo.C), rstd, affine);
}

// ---- the elementwise passes ---------------------------------------------------------------

// Per-statistic values an elementwise pass needs, in acc_t.
template <typename A> struct ChannelCoef {
  A hi, lo, scale, shift, k1, k2;
};

template <typename A, bool GRAD>
__device__ __forceinline__ ChannelCoef<A> channel_coef(const Geo& geo, int64_t b, uint32_t c, const A* __restrict__ mean,
                                                       const A* __restrict__ coef, const NormAffine<A>& affine) {
  const int64_t gc = geo.groups() * geo.C;
  const int64_t i = geo.stat(b, c);
  ChannelCoef<A> k;
  k.hi = mean[i];
  k.lo = mean[gc + i];
  k.scale = coef[kScale * gc + i];  // rstd γ, γ of image b
  k.shift = affine.bias != nullptr ? affine.bias[b * affine.bias_sn + c] : A(0);
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
// of one (n, c) row a vector (S % V == 0), so the coefficients are per vector (and the same
// for most of a warp: broadcast loads). A thread loads kUnrollFor<V> vectors of x (and of the
// other input), then computes and stores them.
template <typename T, int V, bool GRAD>
__global__ void __launch_bounds__(kThreads) norm_apply_planar(const T* __restrict__ x, const T* __restrict__ other,
                                                              Geo geo, FastDiv div_s, const acc_t<T>* __restrict__ mean,
                                                              const acc_t<T>* __restrict__ coef,
                                                              NormAffine<acc_t<T>> affine, bool relu,
                                                              T* __restrict__ out) {
  // other: the residual (forward, may be null) or dy (backward).
  using A = acc_t<T>;
  const uint32_t vecs = uint32_t(int64_t(geo.C) * geo.S / V);
  const uint32_t stride = gridDim.x * kThreads;
  const bool has_other = GRAD || other != nullptr;
  constexpr int U = kUnrollFor<V>;
  for (int64_t step = blockIdx.y; step < geo.n; step += gridDim.y) {
    const int64_t b = geo.n - 1 - step;  // reverse order: the statistics pass read the end last
    const int64_t base = b * int64_t(geo.C) * geo.S;
    for (uint32_t t0 = blockIdx.x * kThreads + threadIdx.x; t0 < vecs; t0 += stride * U) {
      Vec<T, V> xv[U] = {}, rv[U] = {};
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (t0 + u * stride >= vecs) continue;
        const uint32_t off = (vecs - 1 - (t0 + u * stride)) * V;
        xv[u] = load_vec<V>(x + base + off);
        if (has_other) rv[u] = load_vec<V>(other + base + off);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (t0 + u * stride >= vecs) continue;
        const uint32_t off = (vecs - 1 - (t0 + u * stride)) * V;
        const ChannelCoef<A> k = channel_coef<A, GRAD>(geo, b, div_s.div(off), mean, coef, affine);
        Vec<T, V> ov;
#pragma unroll
        for (int e = 0; e < V; ++e) ov.v[e] = apply_one<T, GRAD>(xv[u].v[e], rv[u].v[e], other != nullptr, relu, k);
        store_vec<V>(out + base + off, ov);
      }
    }
  }
}

// The same, channels_last: block (n, channel tile, run of positions) in reverse order; a
// thread owns V adjacent channels, keeps their coefficients in registers and walks positions,
// several of them (their loads) at a time.
template <typename T, int V, bool GRAD>
__global__ void __launch_bounds__(kThreads) norm_apply_interleaved(const T* __restrict__ x, const T* __restrict__ other,
                                                                   Geo geo, int lc, uint32_t run,
                                                                   const acc_t<T>* __restrict__ mean,
                                                                   const acc_t<T>* __restrict__ coef,
                                                                   NormAffine<acc_t<T>> affine, bool relu,
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
  for (int e = 0; e < V; ++e) k[e] = channel_coef<A, GRAD>(geo, b, c0 + e, mean, coef, affine);
  const int64_t base = b * int64_t(geo.S) * geo.C + c0;
  const uint32_t begin = uint32_t(bid % runs) * run;
  const uint32_t end = min(begin + run, geo.S);
  const bool has_other = GRAD || other != nullptr;
  constexpr int U = kUnrollFor<V>;  // 8-channel threads: 106 registers at two (141 at four)
  for (uint32_t s0 = begin + ty; s0 < end; s0 += ls * U) {
    Vec<T, V> xv[U] = {}, rv[U] = {};
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (s0 + u * ls >= end) continue;
      const int64_t off = base + int64_t(s0 + u * ls) * geo.C;
      xv[u] = load_vec<V>(x + off);
      if (has_other) rv[u] = load_vec<V>(other + off);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (s0 + u * ls >= end) continue;
      Vec<T, V> ov;
#pragma unroll
      for (int e = 0; e < V; ++e) ov.v[e] = apply_one<T, GRAD>(xv[u].v[e], rv[u].v[e], other != nullptr, relu, k[e]);
      store_vec<V>(out + base + int64_t(s0 + u * ls) * geo.C, ov);
    }
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
                                                                     NormAffine<acc_t<T>> affine, bool relu,
                                                                     acc_t<T>* __restrict__ pa,
                                                                     acc_t<T>* __restrict__ pb) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarps];
  const int64_t split = blockIdx.x % geo.splits;
  const int64_t row = blockIdx.x / geo.splits;
  const uint32_t c = uint32_t(row % geo.C);
  const int64_t b = row / geo.C;
  const ChannelCoef<A> k = channel_coef<A, false>(geo, b, c, mean, coef, affine);
  const A rstd = coef[kRstd * geo.groups() * geo.C + geo.stat(b, c)];
  const uint32_t begin = uint32_t(split) * geo.chunk;
  const uint32_t end = min(begin + geo.chunk, geo.S);
  const T* xr = x + row * geo.S;
  const T* dr = dy + row * geo.S;
  constexpr uint32_t kStride = kThreads * V;
  constexpr int U = kUnrollFor<V>;
  A sa = A(0), sb = A(0);
  for (uint32_t j0 = begin + threadIdx.x * V; j0 < end; j0 += kStride * U) {
    Vec<T, V> xv[U], dv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (j0 + u * kStride >= end) continue;
      xv[u] = load_vec<V>(xr + j0 + u * kStride);
      dv[u] = load_vec<V>(dr + j0 + u * kStride);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (j0 + u * kStride >= end) continue;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const GradTerms<T> t = grad_terms<T>(xv[u].v[e], dv[u].v[e], k, rstd, relu);
        sa += t.g;
        sb += t.gx;
      }
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
    const acc_t<T>* __restrict__ coef, NormAffine<acc_t<T>> affine, bool relu, acc_t<T>* __restrict__ pa,
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
      k[e] = channel_coef<A, false>(geo, b, c0 + e, mean, coef, affine);
      rstd[e] = coef[kRstd * geo.groups() * geo.C + geo.stat(b, c0 + e)];
    }
    const int64_t base = b * int64_t(geo.S) * geo.C + c0;
    const uint32_t begin = uint32_t(split) * geo.chunk;
    const uint32_t end = min(begin + geo.chunk, geo.S);
    // Two positions (four vectors) in flight: 64 registers for fp32 (4 blocks per SM), 115-119
    // for fp16/bf16, whose 8 channels' coefficients crowd them (2 blocks, as with one).
    constexpr int U = kUnroll / 2;
    for (uint32_t s0 = begin + ty; s0 < end; s0 += ls * U) {
      Vec<T, V> xv[U], dv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (s0 + u * ls >= end) continue;
        xv[u] = load_vec<V>(x + base + int64_t(s0 + u * ls) * geo.C);
        dv[u] = load_vec<V>(dy + base + int64_t(s0 + u * ls) * geo.C);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (s0 + u * ls >= end) continue;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const GradTerms<T> t = grad_terms<T>(xv[u].v[e], dv[u].v[e], k[e], rstd[e], relu);
          sa[e] += t.g;
          sb[e] += t.gx;
        }
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

// Block (channel tile, statistic row g): A = Σ g and B = Σ g x̂ of the row from its partials
// (part lanes, then the fixed tree), the apply coefficients k1, k2, and the row's sums into
// row_a, row_b (G, C): the gradients of (N, C) parameters, or summed over g below.
template <typename A>
__global__ void __launch_bounds__(kThreads) norm_grad_finalize(Geo geo, int ct, const A* __restrict__ pa,
                                                               const A* __restrict__ pb, bool centred,
                                                               A* __restrict__ coef, A* __restrict__ row_a,
                                                               A* __restrict__ row_b) {
  __shared__ A scratch[kThreads];
  const FinalizeLane t(geo, ct);
  const A* qa = pa + t.offset;
  const A* qb = pb + t.offset;
  A sa = A(0), sb = A(0);
  if (t.active) {
#pragma unroll kUnroll
    for (int64_t p = t.ty; p < t.parts; p += t.lanes) {
      sa += qa[p * geo.C];
      sb += qb[p * geo.C];
    }
  }
  sa = part_lane_sum(sa, scratch, ct);
  sb = part_lane_sum(sb, scratch, ct);
  if (t.ty != 0 || !t.active) return;
  const int64_t gc = geo.groups() * geo.C;
  const int64_t i = t.g * geo.C + t.c;
  const A m = geo.per_sample ? A(geo.S) : A(geo.n) * A(geo.S);
  const A scale = coef[kScale * gc + i];
  coef[kK1 * gc + i] = centred ? -scale * sa / m : A(0);
  coef[kK2 * gc + i] = centred ? -scale * coef[kRstd * gc + i] * sb / m : A(0);
  row_a[i] = sa;
  row_b[i] = sb;
}

// Thread c: the (C,) gradients from the per-row sums, dγ[c] = Σ_g B[g, c], dβ[c] = Σ_g A[g, c],
// g in order (coalesced over c). A null output is not wanted (its parameter is (N, C)).
template <typename A>
__global__ void __launch_bounds__(kThreads) norm_param_grads(Geo geo, const A* __restrict__ row_a,
                                                             const A* __restrict__ row_b, A* __restrict__ dweight,
                                                             A* __restrict__ dbias) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= geo.C) return;
  A dw = A(0), db = A(0);
#pragma unroll kUnroll
  for (int64_t g = 0; g < geo.groups(); ++g) {
    db += row_a[g * geo.C + c];
    dw += row_b[g * geo.C + c];
  }
  if (dweight != nullptr) dweight[c] = dw;
  if (dbias != nullptr) dbias[c] = db;
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

// The grid of a finalize kernel: (channel tiles, statistic rows).
dim3 finalize_grid(const NormShape& shape, int ct) {
  return dim3(unsigned(ceil_div(shape.c, ct)), unsigned(shape.per_sample ? shape.n : 1));
}

template <typename T, bool GRAD>
void launch_apply(const T* x, const T* other, const Geo& geo, const NormShape& shape, const acc_t<T>* mean,
                  const acc_t<T>* coef, const NormAffine<acc_t<T>>& affine, bool relu, T* out, bool vec, int device,
                  cudaStream_t stream) {
  const int V = vec ? kVec<T> : 1;
  if (shape.channels_last) {
    // Runs of 8 positions per thread; the grid is n x channel tiles x runs.
    const int lc = lanes_c(shape.c, V);
    const uint32_t run = uint32_t(8 * (kThreads / lc));
    const unsigned blocks = unsigned(shape.n * ceil_div(shape.c, int64_t(lc) * V) * ceil_div(shape.s, run));
#define FASTPERC_APPLY_CL(VV)                                                                             \
  norm_apply_interleaved<T, VV, GRAD><<<blocks, kThreads, 0, stream>>>(x, other, geo, lc, run, mean, coef, affine, \
                                                                       relu, out)
    if (vec) FASTPERC_APPLY_CL(kVec<T>); else FASTPERC_APPLY_CL(1);
#undef FASTPERC_APPLY_CL
  } else {
    // Up to ~8 resident blocks per SM in all, a grid-stride loop over each image (kUnroll
    // vectors a thread and step); images on y.
    const int64_t vecs = shape.c * shape.s / V;
    const unsigned y = unsigned(std::min<int64_t>(shape.n, 65535));
    const int64_t want = ceil_div(int64_t(8) * sm_count(device), y);
    const int64_t per_step = int64_t(kThreads) * (vec ? kUnrollFor<kVec<T>> : kUnrollFor<1>);  // vectors a block's step
    const dim3 grid(unsigned(std::max<int64_t>(1, std::min(want, ceil_div(vecs, per_step)))), y);
    const FastDiv div_s(uint32_t(shape.s));
#define FASTPERC_APPLY_PLANAR(VV) \
  norm_apply_planar<T, VV, GRAD><<<grid, kThreads, 0, stream>>>(x, other, geo, div_s, mean, coef, affine, relu, out)
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
cudaError_t norm_forward(const T* x, const NormAffine<acc_t<T>>& affine, const T* residual, double eps, bool relu,
                         bool stats_given, bool stat_is_var, const NormShape& shape, const NormPlan& plan,
                         acc_t<T>* workspace, acc_t<T>* mean, acc_t<T>* stat, acc_t<T>* coef, T* y, int device,
                         cudaStream_t stream) {
  using A = acc_t<T>;
  const Geo geo = make_geo(shape, plan);
  const int64_t gc = (shape.per_sample ? shape.n : 1) * shape.c;
  const bool vec = vectorisable<T>(shape, {x, residual, y});
  if (stats_given) {
    norm_coef<A><<<blocks_for(gc), kThreads, 0, stream>>>(geo, stat, A(eps), stat_is_var, affine, coef);
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
    const int ct = finalize_channels(shape.c);
    norm_stats_finalize<T><<<finalize_grid(shape, ct), kThreads, 0, stream>>>(
        x, geo, shape.channels_last, ct, pmean, pm2, A(eps), stat_is_var, affine, mean, stat, coef);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  launch_apply<T, false>(x, residual, geo, shape, mean, coef, affine, relu, y, vec, device, stream);
  return cudaGetLastError();
}

template <typename T>
cudaError_t norm_backward(const T* dy, const T* x, const NormAffine<acc_t<T>>& affine, const acc_t<T>* mean,
                          const acc_t<T>* stat, double eps, bool relu, bool stat_is_var, bool centred,
                          const NormShape& shape, const NormPlan& plan, acc_t<T>* workspace, acc_t<T>* coef, T* dx,
                          acc_t<T>* dweight, acc_t<T>* dbias, int device, cudaStream_t stream) {
  using A = acc_t<T>;
  const Geo geo = make_geo(shape, plan);
  const int64_t G = shape.per_sample ? shape.n : 1;
  const int64_t gc = G * shape.c;
  const bool vec = vectorisable<T>(shape, {x, dy, dx});
  norm_coef<A><<<blocks_for(gc), kThreads, 0, stream>>>(geo, stat, A(eps), stat_is_var, affine, coef);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  A* pa = workspace;
  A* pb = workspace + shape.n * plan.splits * shape.c;
  const int V = vec ? kVec<T> : 1;
  if (shape.channels_last) {
    const int lc = lanes_c(shape.c, V);
    const unsigned blocks = reduce_blocks(shape, plan, lc, V);
    if (vec)
      norm_grad_partial_interleaved<T, kVec<T>><<<blocks, kThreads, 0, stream>>>(dy, x, geo, lc, mean, coef, affine,
                                                                                  relu, pa, pb);
    else
      norm_grad_partial_interleaved<T, 1><<<blocks, kThreads, 0, stream>>>(dy, x, geo, lc, mean, coef, affine, relu,
                                                                            pa, pb);
  } else {
    const unsigned blocks = reduce_blocks(shape, plan, 0, V);
    if (vec)
      norm_grad_partial_planar<T, kVec<T>><<<blocks, kThreads, 0, stream>>>(dy, x, geo, mean, coef, affine, relu, pa,
                                                                             pb);
    else
      norm_grad_partial_planar<T, 1><<<blocks, kThreads, 0, stream>>>(dy, x, geo, mean, coef, affine, relu, pa, pb);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // The per-row sums go straight into a gradient that has rows: an (N, C) parameter's, or any
  // when there is one row (batch norm); else into the workspace, summed over the rows after.
  A* rows = workspace + 2 * shape.n * plan.splits * shape.c;
  A* row_a = (affine.bias_sn != 0 || G == 1) ? dbias : rows;
  A* row_b = (affine.weight_sn != 0 || G == 1) ? dweight : rows + gc;
  const int ct = finalize_channels(shape.c);
  norm_grad_finalize<A><<<finalize_grid(shape, ct), kThreads, 0, stream>>>(geo, ct, pa, pb, centred, coef, row_a,
                                                                           row_b);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (row_a != dbias || row_b != dweight) {
    norm_param_grads<A><<<blocks_for(shape.c), kThreads, 0, stream>>>(
        geo, row_a, row_b, row_b == dweight ? nullptr : dweight, row_a == dbias ? nullptr : dbias);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  launch_apply<T, true>(x, dy, geo, shape, mean, coef, affine, relu, dx, vec, device, stream);
  return cudaGetLastError();
}

#define FASTPERC_INSTANTIATE_NORM(T)                                                                             \
  template cudaError_t norm_forward<T>(const T*, const NormAffine<acc_t<T>>&, const T*, double, bool, bool, bool, \
                                       const NormShape&, const NormPlan&, acc_t<T>*, acc_t<T>*, acc_t<T>*,         \
                                       acc_t<T>*, T*, int, cudaStream_t);                                         \
  template cudaError_t norm_backward<T>(const T*, const T*, const NormAffine<acc_t<T>>&, const acc_t<T>*,         \
                                        const acc_t<T>*, double, bool, bool, bool, const NormShape&,              \
                                        const NormPlan&, acc_t<T>*, acc_t<T>*, T*, acc_t<T>*, acc_t<T>*, int,     \
                                        cudaStream_t);
FASTPERC_INSTANTIATE_NORM(float)
FASTPERC_INSTANTIATE_NORM(double)
FASTPERC_INSTANTIATE_NORM(c10::Half)
FASTPERC_INSTANTIATE_NORM(c10::BFloat16)
#undef FASTPERC_INSTANTIATE_NORM

}  // namespace fastperc
