// The SIMD kernels over Q8_0 / Q4_0 weights, written once over an int8 dot-product policy `P`
// (AVX2: vpmaddubsw + vpmaddwd; AVX-512 VNNI: vpdpbusd). Included by quant_avx2.cpp and
// quant_avx512.cpp AFTER their `#pragma GCC target`, inside an anonymous namespace (see
// row_kernels_simd.h for why).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "axpy_passes.h"
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

// The end of an interleaved dot product: the plain blocks after the last full run (qdots_n, added
// last) and the horizontal sum of each row's 8 run lanes `acc`.
template <class P, QuantFormat F, int kRows>
inline void finish_i8_rows(const uint8_t* w, const uint8_t* next, const int8_t* const* xq,
                           const float* const* xs, int64_t runs, int64_t nblk, const __m256* acc,
                           float* out) {
  float tail[kRows] = {};
  const int64_t done = runs * kGroup;
  if (done < nblk) {
    const int8_t* xt[kRows];
    const float* st[kRows];
    for (int r = 0; r < kRows; ++r) {
      xt[r] = xq[r] + done * kQK;
      st[r] = xs[r] + done;
    }
    qdots_n<P, F, kRows>(w + done * block_bytes(F), next, xt, st, nblk - done, tail);
  }
  for (int r = 0; r < kRows; ++r) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    out[r] = _mm_cvtss_f32(s) + tail[r];
  }
}

// Requests (into L2) the cache lines of run g of the interleaved row `next`.
template <QuantFormat F>
inline void prefetch_run(const uint8_t* next, int64_t g) {
  constexpr int64_t run_bytes = kGroup * block_bytes(F);
  for (int64_t off = 0; off < run_bytes; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(next + g * run_bytes + off), _MM_HINT_T2);
}

// One run (8 blocks) of an interleaved row against kRows x rows, added into their 8 run lanes.
template <class P, QuantFormat F, int kRows>
inline void run_i8(const uint8_t* run, int64_t g, const int8_t* const* xq, const float* const* xs,
                   const int32_t* const* xsum, __m256* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(run)));
  __m256i isum[kRows];
  for (int r = 0; r < kRows; ++r) isum[r] = _mm256_setzero_si256();
  if constexpr (F == QuantFormat::kQ4_0) {
    const __m256i m = _mm256_set1_epi8(15);
    // int16 lanes hold nibble * x pair sums (|.| <= 2 * 15 * 127 = 3810): the 8 of a run add up to
    // at most 30480, so they are summed in int16 and widened once per run.
    __m256i p16[kRows];
    for (int r = 0; r < kRows; ++r) p16[r] = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(run + 16 + 32 * c));
      const __m256i lo = _mm256_and_si256(wv, m),
                    hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m);
      for (int r = 0; r < kRows; ++r) {
        const int8_t* xr = xq[r] + g * kGroup * kQK;
        const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32 * c));
        const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32 * (c + 4)));
        p16[r] = _mm256_add_epi16(
            p16[r], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)));
      }
    }
    for (int r = 0; r < kRows; ++r) {
      const __m256i sx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xsum[r] + g * kGroup));
      isum[r] = _mm256_sub_epi32(_mm256_madd_epi16(p16[r], ones), _mm256_slli_epi32(sx, 3));
    }
  } else {
    for (int c = 0; c < 8; ++c) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(run + 16 + 32 * c));
      const __m256i aw = _mm256_sign_epi8(wv, wv);
      for (int r = 0; r < kRows; ++r) {
        const int8_t* xr = xq[r] + g * kGroup * kQK;
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32 * c));
        isum[r] = _mm256_add_epi32(isum[r], P::dot_u8s8(aw, _mm256_sign_epi8(xv, wv)));
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    const __m256 scale = _mm256_mul_ps(dw, _mm256_loadu_ps(xs[r] + g * kGroup));
    acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum[r]), acc[r]);
  }
}

// The interleaved layout (quant.h): per run of 8 blocks, lane j of each int32 vector collects block
// j's products, so the run's 8 block sums come out of one register and meet their 8 scales
// (converted at once) in one multiply-add. Q4_0 multiplies its unsigned nibbles (q + 8) and
// subtracts 8 * sum(x). Every row has its own accumulators and the same order, so its result does
// not depend on its batch mates; the plain tail blocks go through qdots_n, added last.
template <class P, QuantFormat F, int kRows>
void qdots_i8_n(const uint8_t* w, const uint8_t* next, const int8_t* const* xq,
                const float* const* xs, const int32_t* const* xsum, int64_t nblk, float* out) {
  constexpr int64_t run_bytes = kGroup * block_bytes(F);
  const int64_t runs = nblk / kGroup;
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < runs; ++g) {
    if (next != nullptr) prefetch_run<F>(next, g);
    run_i8<P, F, kRows>(w + g * run_bytes, g, xq, xs, xsum, acc);
  }
  finish_i8_rows<P, F, kRows>(w, next, xq, xs, runs, nblk, acc, out);
}

template <class P, QuantFormat F>
void qdots_i8(const uint8_t* w, const uint8_t* next, const int8_t* const* xq,
              const float* const* xs, const int32_t* const* xsum, int nrows, int64_t nblk,
              float* out) {
  switch (nrows) {
    case 1:
      return qdots_i8_n<P, F, 1>(w, next, xq, xs, xsum, nblk, out);
    case 2:
      return qdots_i8_n<P, F, 2>(w, next, xq, xs, xsum, nblk, out);
    case 3:
      return qdots_i8_n<P, F, 3>(w, next, xq, xs, xsum, nblk, out);
    default:
      return qdots_i8_n<P, F, 4>(w, next, xq, xs, xsum, nblk, out);
  }
}

// The batch-1 GEMV over kStreams streams: the call's rows split into kStreams equal parts, and row
// i of every part computed in one loop, so that each core keeps several far-apart streams of misses
// in flight instead of one. Measured on 2 Sapphire Rapids cores with the AVX-512 kernels, 4096 x
// 4096 / 11008 x 4096 / 32000 x 4096 rows, GB/s: Q4_0 25 / 26 / 27 with one stream, 30-31 / 32-34 /
// 32-35 with two, 30-33 / 31-35 / 30-37 with four (six and eight: no better); Q8_0 28 / 29 / 29 ->
// 27-31 / 30-31 / 30-32 with four. A plain read loop measures 32-34 GB/s on that machine. `Run`
// (one run of one row, run_i8 or an ISA's wider one) and `Single` (a whole row, for the last
// nw % kStreams rows) do each row's arithmetic in the same order as `Single` alone (which ends with
// finish_i8_rows<P, F, 1>): results are bit-identical to it, and so to the same row in any batch.
// kN weight rows against one x row, run by run (`Run`: run_i8 or an ISA's wider one), each row
// ending as qdots_i8_n<P, F, 1> does (finish_i8_rows): row s's result, out[s * stride], is
// bit-identical to that row's alone. nexts[s]: prefetched meanwhile, or nullptr.
template <class P, QuantFormat F, auto Run, int kN>
inline void rows_together(const uint8_t* const* ws, const uint8_t* const* nexts,
                          const int8_t* const* xq, const float* const* xs,
                          const int32_t* const* xsum, int64_t nblk, float* out, int64_t stride) {
  constexpr int64_t run_bytes = kGroup * block_bytes(F);
  const int64_t runs = nblk / kGroup;
  __m256 acc[kN][1];
  for (int s = 0; s < kN; ++s) acc[s][0] = _mm256_setzero_ps();
  for (int64_t g = 0; g < runs; ++g) {
    for (int s = 0; s < kN; ++s) {
      if (nexts[s] != nullptr) prefetch_run<F>(nexts[s], g);
    }
    for (int s = 0; s < kN; ++s) Run(ws[s] + g * run_bytes, g, xq, xs, xsum, acc[s]);
  }
  for (int s = 0; s < kN; ++s) {
    finish_i8_rows<P, F, 1>(ws[s], nexts[s], xq, xs, runs, nblk, acc[s], out + s * stride);
  }
}

template <class P, QuantFormat F, auto Run, auto Single>
void gemv1_streams(const uint8_t* w, int64_t row_bytes, int64_t nw, const int8_t* const* xq,
                   const float* const* xs, const int32_t* const* xsum, int64_t nblk, float* out) {
  constexpr int kStreams = 4;
  const int64_t part = nw / kStreams;
  for (int64_t i = 0; i < part; ++i) {
    const uint8_t* rows[kStreams];
    const uint8_t* nexts[kStreams];
    for (int s = 0; s < kStreams; ++s) {
      rows[s] = w + (s * part + i) * row_bytes;
      nexts[s] = i + 1 < part ? rows[s] + row_bytes : nullptr;
    }
    rows_together<P, F, Run, kStreams>(rows, nexts, xq, xs, xsum, nblk, out + i, part);
  }
  for (int64_t i = kStreams * part; i < nw; ++i) {  // the last nw % kStreams rows, one at a time
    Single(w + i * row_bytes, i + 1 < nw ? w + (i + 1) * row_bytes : nullptr, xq, xs, xsum, nblk,
           out + i);
  }
}

// A dense GEMV/GEMM over nw interleaved rows. `Dots`: the dot product over one row for several x
// rows (qdots_i8, or an ISA's own wider one); `Run` / `Single`: gemv1_streams' kernels at batch 1.
template <class P, QuantFormat F, auto Dots = &qdots_i8<P, F>, auto Run = &run_i8<P, F, 1>,
          auto Single = &qdots_i8_n<P, F, 1>>
void qgemv_i8(const uint8_t* w, int64_t row_bytes, int64_t nw, const int8_t* const* xq,
              const float* const* xs, const int32_t* const* xsum, int nrows, int64_t nblk,
              float* out, int64_t ldo) {
  if (nrows == 1)
    return gemv1_streams<P, F, Run, Single>(w, row_bytes, nw, xq, xs, xsum, nblk, out);
  float res[kMaxQDotRows];
  for (int64_t i = 0; i < nw; ++i) {
    const uint8_t* next = i + 1 < nw ? w + (i + 1) * row_bytes : nullptr;
    Dots(w + i * row_bytes, next, xq, xs, xsum, nrows, nblk, res);
    for (int r = 0; r < nrows; ++r) out[r * ldo + i] = res[r];
  }
}

// QuantKernels::gather_i8 over rows_together (`Run` as there).
template <class P, QuantFormat F, auto Run = &run_i8<P, F, 1>>
void qgather_i8(const uint8_t* const* ws, const uint8_t* const* nexts, int nw, const int8_t* xq,
                const float* xs, const int32_t* xsum, int64_t nblk, float* out) {
  const int8_t* const xqs[1] = {xq};
  const float* const xss[1] = {xs};
  const int32_t* const xsums[1] = {xsum};
  switch (nw) {
    case 1:
      return rows_together<P, F, Run, 1>(ws, nexts, xqs, xss, xsums, nblk, out, 1);
    case 2:
      return rows_together<P, F, Run, 2>(ws, nexts, xqs, xss, xsums, nblk, out, 1);
    case 3:
      return rows_together<P, F, Run, 3>(ws, nexts, xqs, xss, xsums, nblk, out, 1);
    default:
      return rows_together<P, F, Run, 4>(ws, nexts, xqs, xss, xsums, nblk, out, 1);
  }
}

// One pass of qaxpys_n over the weights for kRows batch rows (dst[k]: row k's output, coef[k]: its
// kNw coefficients). Per output block the kNw rows' terms go into four registers, loaded and
// stored once (in ascending i, each one fused multiply-add: the order of the scalar kernel); a
// block's weights are widened and converted once for all kRows rows. `nexts` (or nullptr) are
// prefetched.
template <QuantFormat F, int kNw, int kRows>
void qaxpys_pass(const uint8_t* const* ws, const uint8_t* const* nexts, float* const* dst,
                 const float (*coef)[kNw], int64_t nblk) {
  constexpr int64_t bb = block_bytes(F);
  for (int64_t b = 0; b < nblk; ++b) {
    __m256 w[kNw][4];
    float scale[kNw];
    for (int i = 0; i < kNw; ++i) {
      const uint8_t* blk = ws[i] + b * bb;
      if (nexts != nullptr && nexts[i] != nullptr) prefetch_block<F>(nexts[i], b);
      const __m256i q = block_q<F>(blk);
      const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
      const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
      for (int j = 0; j < 4; ++j) w[i][j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[j]));
      scale[i] = scale_of(blk);
    }
    for (int k = 0; k < kRows; ++k) {
      float* out = dst[k] + b * kQK;
      __m256 acc[4];
      for (int j = 0; j < 4; ++j) acc[j] = _mm256_loadu_ps(out + 8 * j);
      for (int i = 0; i < kNw; ++i) {
        const __m256 a = _mm256_set1_ps(coef[k][i] * scale[i]);
        for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(a, w[i][j], acc[j]);
      }
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + 8 * j, acc[j]);
    }
  }
}

template <QuantFormat F, int kNw>
void qaxpys_n(const uint8_t* const* ws, const uint8_t* const* nexts, const float* const* coefs,
              const int32_t* rows, int nrows, float* buf, int64_t ldb, int64_t nblk) {
  axpy_passes<kNw>(
      coefs, rows, nrows, buf, ldb, nexts,
      [&](auto kRows, const uint8_t* const* fetch, float* const* dst, const float (*coef)[kNw]) {
        qaxpys_pass<F, kNw, decltype(kRows)::value>(ws, fetch, dst, coef, nblk);
      });
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

// Activations to Q8_0 (QuantizeRowFn): per block, |x|max over four 8-lane loads, one multiply and a
// round to nearest even (vcvtps2dq) per lane, then packed to 32 int8 in order (the packs interleave
// 128-bit lanes; the permute restores them), as ggml's AVX2 quantize_row_q8_0 does.
inline void quantize_x(const float* x, int64_t nblk, bool interleaved, int8_t* q, float* scale,
                       int32_t* sum) {
  const int64_t runs = interleaved ? nblk / kGroup : 0;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < nblk; ++b) {
    const float* v = x + b * kQK;
    __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
           v3 = _mm256_loadu_ps(v + 24);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                             _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float step = _mm_cvtss_f32(h) / 127.f;
    const __m256 inv = _mm256_set1_ps(step != 0.f ? 1.f / step : 0.f);
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv));
    const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv));
    const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
    const __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    sum[b] = _mm_cvtsi128_si32(s4);
    scale[b] = _cvtsh_ss(_cvtss_sh(step, _MM_FROUND_TO_NEAREST_INT));
    const __m256i packed = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3)), order);
    if (b >= runs * kGroup) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kQK), packed);
      continue;
    }
    // Interleaved: int32 lane c holds values [4c, 4c + 4): it goes to chunk c, block slot b % 8.
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), packed);
    int8_t* run = q + (b / kGroup) * kGroup * kQK + 4 * (b % kGroup);
    for (int c = 0; c < 8; ++c) std::memcpy(run + 32 * c, &lanes[c], 4);
  }
}

template <class P>
QuantKernels simd_quant_kernels(QuantFormat f) {
  if (f == QuantFormat::kQ8_0) {
    return QuantKernels{&qdots<P, QuantFormat::kQ8_0>,    &qdots_i8<P, QuantFormat::kQ8_0>,
                        &qaxpys<QuantFormat::kQ8_0>,      &quantize_x,
                        &qgemv_i8<P, QuantFormat::kQ8_0>, &qgather_i8<P, QuantFormat::kQ8_0>};
  }
  return QuantKernels{&qdots<P, QuantFormat::kQ4_0>,    &qdots_i8<P, QuantFormat::kQ4_0>,
                      &qaxpys<QuantFormat::kQ4_0>,      &quantize_x,
                      &qgemv_i8<P, QuantFormat::kQ4_0>, &qgather_i8<P, QuantFormat::kQ4_0>};
}

}  // namespace
}  // namespace cpu
}  // namespace sparseinfer
