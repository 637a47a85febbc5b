// Device helpers shared by the fastperc CUDA kernels (included by the .cu files only).
//
// The kernels are templates over the element type T (float, double, c10::Half,
// c10::BFloat16) and compute in acc_t<T>: float, or double for double inputs. They include no
// ATen header (only c10's Half and BFloat16, which are light), so that nvcc compiles them in
// seconds; tensors, checks and dtype dispatch live in bindings.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "fastperc.h"

namespace fastperc {

// Elements per 16-byte vector: 4 fp32, 8 fp16/bf16, 2 fp64.
template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));

constexpr int kThreads = 256;  // threads per block of every main kernel
constexpr int kWarps = kThreads / 32;
// Memory-bound loops load this many independent 16-byte vectors per thread before using any
// (several loads in flight per thread: one alone, at 4 blocks per SM, leaves HBM idle between
// requests). Vectors of 8 half-precision elements take 8 registers each once unpacked, so for
// them the loops load half as many (kUnrollFor<V>): registers decide how many blocks fit an SM.
constexpr int kUnroll = 4;
template <int V> constexpr int kUnrollFor = V >= 8 ? kUnroll / 2 : kUnroll;

template <typename T, int V> struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// One V-element load / store; V > 1 only where the caller has checked 16-byte alignment.
template <int V, typename T> __device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}
template <int V, typename T> __device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

template <typename T> __device__ __forceinline__ acc_t<T> to_acc(T v) { return static_cast<acc_t<T>>(v); }

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // the sum is in lane 0
}

// Sum over a block of kThreads threads in a fixed order (deterministic); valid in thread 0.
// `scratch` holds kWarps values; the function ends with a barrier, so it can be reused.
template <typename A> __device__ __forceinline__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : A(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();
  return v;
}

// Welford / Chan state: n values with mean `mean` and sum of squared deviations `m2`.
template <typename A> struct Welford {
  A mean;
  A m2;
  int64_t n;  // a batch-norm channel can hold more than 2^31 values
};

// Chan et al.'s merge of two states (either may be empty).
template <typename A> __device__ __forceinline__ Welford<A> welford_merge(Welford<A> a, const Welford<A>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const int64_t n = a.n + b.n;
  const A wb = A(b.n) / A(n);
  const A delta = b.mean - a.mean;
  a.mean += delta * wb;
  a.m2 += b.m2 + delta * delta * (A(a.n) * wb);
  a.n = n;
  return a;
}

template <typename A> __device__ __forceinline__ Welford<A> welford_shfl_down(const Welford<A>& w, int offset) {
  Welford<A> o;
  o.mean = __shfl_down_sync(0xffffffffu, w.mean, offset);
  o.m2 = __shfl_down_sync(0xffffffffu, w.m2, offset);
  o.n = __shfl_down_sync(0xffffffffu, w.n, offset);
  return o;
}

// Merge over a block of kThreads threads in a fixed order; valid in thread 0.
template <typename A> __device__ __forceinline__ Welford<A> block_welford(Welford<A> w, Welford<A>* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) w = welford_merge(w, welford_shfl_down(w, offset));
  if (lane == 0) scratch[warp] = w;
  __syncthreads();
  if (warp == 0) {
    w = lane < kWarps ? scratch[lane] : Welford<A>{A(0), A(0), 0};
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) w = welford_merge(w, welford_shfl_down(w, offset));
  }
  __syncthreads();
  return w;
}

// Knuth's TwoSum: hi + lo == a + b exactly, hi = fl(a + b).
template <typename A> __device__ __forceinline__ void two_sum(A a, A b, A& hi, A& lo) {
  hi = a + b;
  const A bb = hi - a;
  lo = (a - (hi - bb)) + (b - bb);
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Division by a runtime constant d in [1, 2^31] of numerators n < 2^31, by a multiply-high
// and a shift (Granlund and Montgomery): integer division is tens of instructions, too many
// for a kernel that moves 16 bytes per thread and iteration.
struct FastDiv {
  uint32_t d = 1, m = 1, shift = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor) {
    while (shift < 32 && (uint64_t(1) << shift) < divisor) ++shift;
    m = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - divisor)) / divisor + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> shift; }
  __device__ __forceinline__ uint32_t mod(uint32_t n) const { return n - div(n) * d; }
};

}  // namespace fastperc
