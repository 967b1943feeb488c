// The SIMD kernels over Q8_0 / Q4_0 weights, written once over an int8 dot-product policy `P`
// (AVX2: vpmaddubsw + vpmaddwd; AVX-512 VNNI: vpdpbusd). Included by quant_avx2.cpp and
// quant_avx512.cpp AFTER their `#pragma GCC target`, inside an anonymous namespace (see
// row_kernels_simd.h for why).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "quant.h"

namespace sparseinfer {
namespace cpu {
namespace {

inline float scale_of(const uint8_t* blk) {
  uint16_t h;
  std::memcpy(&h, blk, 2);
  return _cvtsh_ss(h);
}

// The 32 signed weights of a block in one register (q - 8 for Q4_0).
template <QuantFormat F>
inline __m256i block_q(const uint8_t* blk) {
  if constexpr (F == QuantFormat::kQ8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
  } else {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
    const __m128i m = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(t, m);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(t, 4), m);
    return _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
  }
}

// Prefetch (into L2) the cache lines of block b of row `next`.
template <QuantFormat F>
inline void prefetch_block(const uint8_t* next, int64_t b) {
  constexpr int64_t bb = block_bytes(F);
  const int64_t first = (b * bb + 63) / 64 * 64;
  for (int64_t off = first; off < (b + 1) * bb; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(next + off), _MM_HINT_T2);
}

// Two accumulator chains per row (blocks alternate), the same for any number of rows, so that a
// row's sum never depends on its batch mates; kRows <= 4 keeps 2 x kRows accumulators in registers.
template <class P, QuantFormat F, int kRows>
void qdots_n(const uint8_t* w, const uint8_t* next, const int8_t* const* xq, const float* const* xs,
             int64_t nblk, float* out) {
  constexpr int64_t bb = block_bytes(F);
  __m256 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nblk; ++b) {
    const uint8_t* blk = w + b * bb;
    if (next != nullptr) prefetch_block<F>(next, b);
    const __m256i wq = block_q<F>(blk);
    const __m256i aw = _mm256_sign_epi8(wq, wq);  // |w| as unsigned bytes (|-128| = 128)
    const float dw = scale_of(blk);
    for (int r = 0; r < kRows; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[r] + b * kQK));
      const __m256i sx = _mm256_sign_epi8(xv, wq);  // x with w's sign: |w| * sx = w * x
      const __m256 p = _mm256_cvtepi32_ps(P::dot_u8s8(aw, sx));  // 8 partial sums
      acc[r][b & 1] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xs[r][b]), p, acc[r][b & 1]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    const __m256 v = _mm256_add_ps(acc[r][0], acc[r][1]);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    out[r] = _mm_cvtss_f32(s);
  }
}

template <class P, QuantFormat F>
void qdots(const uint8_t* w, const uint8_t* next, const int8_t* const* xq, const float* const* xs,
           int nrows, int64_t nblk, float* out) {
  switch (nrows) {
    case 1:
      return qdots_n<P, F, 1>(w, next, xq, xs, nblk, out);
    case 2:
      return qdots_n<P, F, 2>(w, next, xq, xs, nblk, out);
    case 3:
      return qdots_n<P, F, 3>(w, next, xq, xs, nblk, out);
    default:
      return qdots_n<P, F, 4>(w, next, xq, xs, nblk, out);
  }
}

// dst[0..32) += a * q (the block's 32 signed values), as four 8-lane fused multiply-adds.
inline void axpy_block(__m256i q, __m256 a, float* dst) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int j = 0; j < 4; ++j) {
    const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[j]));
    _mm256_storeu_ps(dst + 8 * j, _mm256_fmadd_ps(a, v, _mm256_loadu_ps(dst + 8 * j)));
  }
}

template <QuantFormat F, int kNw>
void qaxpys_n(const uint8_t* const* ws, const uint8_t* const* nexts, const float* const* coefs,
              const int32_t* rows, int nrows, float* buf, int64_t ldb, int64_t nblk) {
  constexpr int64_t bb = block_bytes(F);
  for (int k = 0; k < nrows; ++k) {
    const int32_t r = rows[k];
    float* dst = buf + r * ldb;
    const bool fetch = k == 0 && nexts != nullptr;  // the first pass streams from memory
    for (int64_t b = 0; b < nblk; ++b) {
      for (int i = 0; i < kNw; ++i) {
        const uint8_t* blk = ws[i] + b * bb;
        if (fetch && nexts[i] != nullptr) prefetch_block<F>(nexts[i], b);
        axpy_block(block_q<F>(blk), _mm256_set1_ps(coefs[i][r] * scale_of(blk)), dst + b * kQK);
      }
    }
  }
}

template <QuantFormat F>
void qaxpys(const uint8_t* const* ws, int nw, const uint8_t* const* nexts,
            const float* const* coefs, const int32_t* rows, int nrows, float* buf, int64_t ldb,
            int64_t nblk) {
  switch (nw) {
    case 1:
      return qaxpys_n<F, 1>(ws, nexts, coefs, rows, nrows, buf, ldb, nblk);
    case 2:
      return qaxpys_n<F, 2>(ws, nexts, coefs, rows, nrows, buf, ldb, nblk);
    case 3:
      return qaxpys_n<F, 3>(ws, nexts, coefs, rows, nrows, buf, ldb, nblk);
    default:
      return qaxpys_n<F, 4>(ws, nexts, coefs, rows, nrows, buf, ldb, nblk);
  }
}

template <class P>
QuantKernels simd_quant_kernels(QuantFormat f) {
  if (f == QuantFormat::kQ8_0)
    return QuantKernels{&qdots<P, QuantFormat::kQ8_0>, &qaxpys<QuantFormat::kQ8_0>};
  return QuantKernels{&qdots<P, QuantFormat::kQ4_0>, &qaxpys<QuantFormat::kQ4_0>};
}

}  // namespace
}  // namespace cpu
}  // namespace sparseinfer
