// AVX-512F row kernels (16 lanes), the same structure as the AVX2 file. Compiled for those
// extensions by the pragma below and only called after the dispatcher (sparse_ffn.cpp) has checked
// that the CPU has them, so the extension still loads and runs on a CPU without AVX-512. Weights
// are widened to fp32 in registers (bf16: a 16-bit shift; fp16: vcvtph2ps) and every product
// accumulates in fp32 with FMA. NOT yet run on hardware: the development machine has no AVX-512 (it
// compiles there); on a CPU that has it the tests force this path with SPARSEINFER_CPU_ISA=avx512.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "row_kernels.h"

#pragma GCC target("avx512f,avx2,fma,f16c")
// GCC 12's own AVX-512 headers trip these on _mm512_undefined_*() (a known false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace sparseinfer {
namespace cpu {
namespace {

template <WeightType kType>
inline __m512 load16(const void* w, int64_t c) {
  if constexpr (kType == WeightType::kF32) {
    return _mm512_loadu_ps(static_cast<const float*>(w) + c);
  } else {
    const __m256i h = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + c));  // 16 x 16 bit
    if constexpr (kType == WeightType::kBF16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

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

// Prefetch the cache lines of `next` that start within weights [c, c + count) of a row (each line
// once, when called for consecutive ranges).
template <WeightType kType>
inline void prefetch(const void* next, int64_t c, int count) {
  constexpr int64_t kSize = kType == WeightType::kF32 ? 4 : 2;
  const char* row = static_cast<const char*>(next);
  const int64_t first = (c * kSize + 63) / 64 * 64;
  for (int64_t off = first; off < (c + count) * kSize; off += 64)
    _mm_prefetch(row + off, _MM_HINT_T2);
}

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// kRows rows of x against one weight row. Per row kChains accumulators take 16-lane blocks in turn
// (enough independent FMA chains to hide the FMA latency: with two, one row's dot product is capped
// near 21 GB/s of bf16 weights at 2.6 GHz), then blocks of 16 go to the first, the chains are
// summed pairwise, and the scalar tail follows. The same order for every kRows, so a row's result
// does not depend on its batch mates; kRows <= 2 keeps 4 x kRows accumulators in registers.
template <WeightType kType, int kRows>
void dots_n(const void* w, const void* next, const float* const* xs, int64_t d, float* out) {
  constexpr int kChains = 4;
  __m512 acc[kRows][kChains];
  for (int r = 0; r < kRows; ++r)
    for (int u = 0; u < kChains; ++u) acc[r][u] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 * kChains <= d; c += 16 * kChains) {
    if (next != nullptr) prefetch<kType>(next, c, 16 * kChains);
    for (int u = 0; u < kChains; ++u) {
      const __m512 wv = load16<kType>(w, c + 16 * u);
      for (int r = 0; r < kRows; ++r)
        acc[r][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs[r] + c + 16 * u), acc[r][u]);
    }
  }
  for (; c + 16 <= d; c += 16) {
    const __m512 wv = load16<kType>(w, c);
    for (int r = 0; r < kRows; ++r)
      acc[r][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs[r] + c), acc[r][0]);
  }
  for (int r = 0; r < kRows; ++r) {
    float s = hsum(
        _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));
    for (int64_t t = c; t < d; ++t) s = __builtin_fmaf(load1<kType>(w, t), xs[r][t], s);
    out[r] = s;
  }
}

template <WeightType kType>
void dots(const void* w, const void* next, const float* const* xs, int nrows, int64_t d,
          float* out) {
  if (nrows == 1) return dots_n<kType, 1>(w, next, xs, d, out);
  return dots_n<kType, 2>(w, next, xs, d, out);
}

template <WeightType kType, int kNw>
void axpys_n(const void* const* ws, const void* const* nexts, const float* const* coefs,
             const int32_t* rows, int nrows, float* buf, int64_t ldb, int64_t len) {
  for (int k = 0; k < nrows; ++k) {
    const int32_t b = rows[k];
    float* dst = buf + b * ldb;
    __m512 a[kNw];
    for (int i = 0; i < kNw; ++i) a[i] = _mm512_set1_ps(coefs[i][b]);
    const bool fetch = k == 0 && nexts != nullptr;  // the first pass streams from memory
    int64_t c = 0;
    for (; c + 32 <= len; c += 32) {
      if (fetch) {
        for (int i = 0; i < kNw; ++i) {
          if (nexts[i] != nullptr) prefetch<kType>(nexts[i], c, 32);
        }
      }
      __m512 acc0 = _mm512_loadu_ps(dst + c);
      __m512 acc1 = _mm512_loadu_ps(dst + c + 16);
      for (int i = 0; i < kNw; ++i) {
        acc0 = _mm512_fmadd_ps(a[i], load16<kType>(ws[i], c), acc0);
        acc1 = _mm512_fmadd_ps(a[i], load16<kType>(ws[i], c + 16), acc1);
      }
      _mm512_storeu_ps(dst + c, acc0);
      _mm512_storeu_ps(dst + c + 16, acc1);
    }
    for (; c + 16 <= len; c += 16) {
      __m512 acc0 = _mm512_loadu_ps(dst + c);
      for (int i = 0; i < kNw; ++i) acc0 = _mm512_fmadd_ps(a[i], load16<kType>(ws[i], c), acc0);
      _mm512_storeu_ps(dst + c, acc0);
    }
    for (; c < len; ++c) {
      float v = dst[c];
      for (int i = 0; i < kNw; ++i) v = __builtin_fmaf(coefs[i][b], load1<kType>(ws[i], c), v);
      dst[c] = v;
    }
  }
}

template <WeightType kType>
void axpys(const void* const* ws, int nw, const void* const* nexts, const float* const* coefs,
           const int32_t* rows, int nrows, float* buf, int64_t ldb, int64_t len) {
  switch (nw) {
    case 1:
      return axpys_n<kType, 1>(ws, nexts, coefs, rows, nrows, buf, ldb, len);
    case 2:
      return axpys_n<kType, 2>(ws, nexts, coefs, rows, nrows, buf, ldb, len);
    case 3:
      return axpys_n<kType, 3>(ws, nexts, coefs, rows, nrows, buf, ldb, len);
    default:
      return axpys_n<kType, 4>(ws, nexts, coefs, rows, nrows, buf, ldb, len);
  }
}

template <WeightType kType>
RowKernels make() {
  return RowKernels{&dots<kType>, &axpys<kType>};
}

}  // namespace

RowKernels avx512_row_kernels(WeightType type) {
  switch (type) {
    case WeightType::kF32:
      return make<WeightType::kF32>();
    case WeightType::kBF16:
      return make<WeightType::kBF16>();
    case WeightType::kF16:
      return make<WeightType::kF16>();
  }
  return make<WeightType::kF32>();
}

}  // namespace cpu
}  // namespace sparseinfer
