// The SIMD row kernels, written once over a vector type `S` (one per instruction set):
//   S::Vec, S::kLanes, S::zero(), S::set1(a), S::load(p), S::store(p, v), S::fma(a, b, c) (a*b+c),
//   S::add(a, b), S::hsum(v), S::weights<kType>(w, c) (kLanes weights from index c, widened to
//   fp32).
// row_kernels_avx2.cpp and row_kernels_avx512.cpp include this AFTER their `#pragma GCC target`, so
// every function here is compiled for that file's extensions. Everything sits in an anonymous
// namespace on purpose: each file gets its own internal copy, so the linker can never keep an
// AVX-512 build of a shared helper (load1, prefetch) for the AVX2 path.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "axpy_passes.h"
#include "row_kernels.h"

namespace sparseinfer {
namespace cpu {
namespace {

template <WeightType kType>
inline float load1(const void* w, int64_t c) {
  if constexpr (kType == WeightType::kF32) {
    return static_cast<const float*>(w)[c];
  } else if constexpr (kType == WeightType::kBF16) {
    const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(w)[c]) << 16;
    float v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  } else {
    return _cvtsh_ss(static_cast<const uint16_t*>(w)[c]);
  }
}

// Prefetch (into L2: more fills then run at once than with T0) the cache lines of `next` that start
// within weights [c, c + count) of a row (each line once, when called for consecutive ranges).
template <WeightType kType>
inline void prefetch(const void* next, int64_t c, int count) {
  constexpr int64_t kSize = kType == WeightType::kF32 ? 4 : 2;
  const char* row = static_cast<const char*>(next);
  const int64_t first = (c * kSize + 63) / 64 * 64;
  for (int64_t off = first; off < (c + count) * kSize; off += 64)
    _mm_prefetch(row + off, _MM_HINT_T2);
}

// kRows rows of x against one weight row. Per row kChains accumulators take kLanes-wide blocks in
// turn (enough independent FMA chains to hide the FMA latency: with two, one row's dot product was
// capped near 21 GB/s of bf16 weights at 2.6 GHz), then single blocks go to the first, the chains
// are summed pairwise, and the scalar tail follows. The same order for every kRows, so a row's
// result does not depend on its batch mates; kRows <= 2 keeps 4 x kRows accumulators in registers.
template <class S, WeightType kType, int kRows>
void dots_n(const void* w, const void* next, const float* const* xs, int64_t d, float* out) {
  using Vec = typename S::Vec;
  constexpr int kChains = 4, kL = S::kLanes;
  Vec acc[kRows][kChains];
  for (int r = 0; r < kRows; ++r)
    for (int u = 0; u < kChains; ++u) acc[r][u] = S::zero();
  int64_t c = 0;
  for (; c + kL * kChains <= d; c += kL * kChains) {
    if (next != nullptr) prefetch<kType>(next, c, kL * kChains);
    for (int u = 0; u < kChains; ++u) {
      const Vec wv = S::template weights<kType>(w, c + kL * u);
      for (int r = 0; r < kRows; ++r)
        acc[r][u] = S::fma(wv, S::load(xs[r] + c + kL * u), acc[r][u]);
    }
  }
  for (; c + kL <= d; c += kL) {
    const Vec wv = S::template weights<kType>(w, c);
    for (int r = 0; r < kRows; ++r) acc[r][0] = S::fma(wv, S::load(xs[r] + c), acc[r][0]);
  }
  for (int r = 0; r < kRows; ++r) {
    float s = S::hsum(S::add(S::add(acc[r][0], acc[r][1]), S::add(acc[r][2], acc[r][3])));
    for (int64_t t = c; t < d; ++t) s = __builtin_fmaf(load1<kType>(w, t), xs[r][t], s);
    out[r] = s;
  }
}

template <class S, WeightType kType>
void dots(const void* w, const void* next, const float* const* xs, int nrows, int64_t d,
          float* out) {
  if (nrows == 1) return dots_n<S, kType, 1>(w, next, xs, d, out);
  return dots_n<S, kType, 2>(w, next, xs, d, out);
}

// One pass of axpys_n over the weights for kRows batch rows (dst[k]: row k's output, coef[k]: its
// kNw coefficients): a strip's weights are widened once for all of them (once per row made the
// batch-16 down projection compute-bound). `nexts` (or nullptr) are prefetched.
template <class S, WeightType kType, int kNw, int kRows>
void axpys_pass(const void* const* ws, const void* const* nexts, float* const* dst,
                const float (*coef)[kNw], int64_t len) {
  using Vec = typename S::Vec;
  constexpr int kL = S::kLanes;
  int64_t c = 0;
  for (; c + 2 * kL <= len; c += 2 * kL) {
    Vec w0[kNw], w1[kNw];
#pragma GCC unroll 4
    for (int i = 0; i < kNw; ++i) {
      if (nexts != nullptr && nexts[i] != nullptr) prefetch<kType>(nexts[i], c, 2 * kL);
      w0[i] = S::template weights<kType>(ws[i], c);
      w1[i] = S::template weights<kType>(ws[i], c + kL);
    }
#pragma GCC unroll 4
    for (int k = 0; k < kRows; ++k) {
      Vec acc0 = S::load(dst[k] + c);
      Vec acc1 = S::load(dst[k] + c + kL);
#pragma GCC unroll 4
      for (int i = 0; i < kNw; ++i) {
        const Vec a = S::set1(coef[k][i]);
        acc0 = S::fma(a, w0[i], acc0);
        acc1 = S::fma(a, w1[i], acc1);
      }
      S::store(dst[k] + c, acc0);
      S::store(dst[k] + c + kL, acc1);
    }
  }
  for (; c + kL <= len; c += kL) {
    Vec w0[kNw];
#pragma GCC unroll 4
    for (int i = 0; i < kNw; ++i) w0[i] = S::template weights<kType>(ws[i], c);
    for (int k = 0; k < kRows; ++k) {
      Vec acc0 = S::load(dst[k] + c);
#pragma GCC unroll 4
      for (int i = 0; i < kNw; ++i) acc0 = S::fma(S::set1(coef[k][i]), w0[i], acc0);
      S::store(dst[k] + c, acc0);
    }
  }
  for (; c < len; ++c) {
    for (int k = 0; k < kRows; ++k) {
      float v = dst[k][c];
      for (int i = 0; i < kNw; ++i) v = __builtin_fmaf(coef[k][i], load1<kType>(ws[i], c), v);
      dst[k][c] = v;
    }
  }
}

template <class S, WeightType kType, int kNw>
void axpys_n(const void* const* ws, const void* const* nexts, const float* const* coefs,
             const int32_t* rows, int nrows, float* buf, int64_t ldb, int64_t len) {
  axpy_passes<kNw>(
      coefs, rows, nrows, buf, ldb, nexts,
      [&](auto kRows, const void* const* fetch, float* const* dst, const float (*coef)[kNw]) {
        axpys_pass<S, kType, kNw, decltype(kRows)::value>(ws, fetch, dst, coef, len);
      });
}

template <class S, WeightType kType>
void axpys(const void* const* ws, int nw, const void* const* nexts, const float* const* coefs,
           const int32_t* rows, int nrows, float* buf, int64_t ldb, int64_t len) {
  switch (nw) {
    case 1:
      return axpys_n<S, kType, 1>(ws, nexts, coefs, rows, nrows, buf, ldb, len);
    case 2:
      return axpys_n<S, kType, 2>(ws, nexts, coefs, rows, nrows, buf, ldb, len);
    case 3:
      return axpys_n<S, kType, 3>(ws, nexts, coefs, rows, nrows, buf, ldb, len);
    default:
      return axpys_n<S, kType, 4>(ws, nexts, coefs, rows, nrows, buf, ldb, len);
  }
}

// The kernels of `S` for weights of `type`.
template <class S>
RowKernels simd_row_kernels(WeightType type) {
  switch (type) {
    case WeightType::kBF16:
      return RowKernels{&dots<S, WeightType::kBF16>, &axpys<S, WeightType::kBF16>};
    case WeightType::kF16:
      return RowKernels{&dots<S, WeightType::kF16>, &axpys<S, WeightType::kF16>};
    case WeightType::kF32:
      break;
  }
  return RowKernels{&dots<S, WeightType::kF32>, &axpys<S, WeightType::kF32>};
}

}  // namespace
}  // namespace cpu
}  // namespace sparseinfer
