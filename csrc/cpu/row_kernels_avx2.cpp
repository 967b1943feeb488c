// AVX2 + FMA (+ F16C for fp16) row kernels. Compiled for those extensions by the pragma below and
// only called after the dispatcher (sparse_ffn.cpp) has checked that the CPU has them, so the
// extension still loads and runs on a CPU without AVX2. Weights are widened to fp32 in registers
// (bf16: a 16-bit shift; fp16: vcvtph2ps) and every product accumulates in fp32 with FMA.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "row_kernels.h"

#pragma GCC target("avx2,fma,f16c")

namespace sparseinfer {
namespace cpu {
namespace {

template <WeightType kType>
inline __m256 load8(const void* w, int64_t c) {
  if constexpr (kType == WeightType::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(w) + c);
  } else {
    const __m128i h = _mm_loadu_si128(
        reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + c));  // 8 x 16 bit
    if constexpr (kType == WeightType::kBF16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      return _mm256_cvtph_ps(h);
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

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// kRows rows of x against one weight row. Per row kChains accumulators take 8-lane blocks in turn
// (enough independent FMA chains to hide the FMA latency: with two, one row's dot product is capped
// near 21 GB/s of bf16 weights at 2.6 GHz), then blocks of 8 go to the first, the chains are summed
// pairwise, and the scalar tail follows. The same order for every kRows, so a row's result does not
// depend on its batch mates; kRows <= 2 keeps 4 x kRows accumulators in registers.
template <WeightType kType, int kRows>
void dots_n(const void* w, const void* next, const float* const* xs, int64_t d, float* out) {
  constexpr int kChains = 4;
  __m256 acc[kRows][kChains];
  for (int r = 0; r < kRows; ++r)
    for (int u = 0; u < kChains; ++u) acc[r][u] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 * kChains <= d; c += 8 * kChains) {
    if (next != nullptr) prefetch<kType>(next, c, 8 * kChains);
    for (int u = 0; u < kChains; ++u) {
      const __m256 wv = load8<kType>(w, c + 8 * u);
      for (int r = 0; r < kRows; ++r)
        acc[r][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[r] + c + 8 * u), acc[r][u]);
    }
  }
  for (; c + 8 <= d; c += 8) {
    const __m256 wv = load8<kType>(w, c);
    for (int r = 0; r < kRows; ++r)
      acc[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[r] + c), acc[r][0]);
  }
  for (int r = 0; r < kRows; ++r) {
    float s = hsum(
        _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])));
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
    __m256 a[kNw];
    for (int i = 0; i < kNw; ++i) a[i] = _mm256_set1_ps(coefs[i][b]);
    const bool fetch = k == 0 && nexts != nullptr;  // the first pass streams from memory
    int64_t c = 0;
    for (; c + 16 <= len; c += 16) {
      if (fetch) {
        for (int i = 0; i < kNw; ++i) {
          if (nexts[i] != nullptr) prefetch<kType>(nexts[i], c, 16);
        }
      }
      __m256 acc0 = _mm256_loadu_ps(dst + c);
      __m256 acc1 = _mm256_loadu_ps(dst + c + 8);
      for (int i = 0; i < kNw; ++i) {
        acc0 = _mm256_fmadd_ps(a[i], load8<kType>(ws[i], c), acc0);
        acc1 = _mm256_fmadd_ps(a[i], load8<kType>(ws[i], c + 8), acc1);
      }
      _mm256_storeu_ps(dst + c, acc0);
      _mm256_storeu_ps(dst + c + 8, acc1);
    }
    for (; c + 8 <= len; c += 8) {
      __m256 acc0 = _mm256_loadu_ps(dst + c);
      for (int i = 0; i < kNw; ++i) acc0 = _mm256_fmadd_ps(a[i], load8<kType>(ws[i], c), acc0);
      _mm256_storeu_ps(dst + c, acc0);
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

RowKernels avx2_row_kernels(WeightType type) {
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
