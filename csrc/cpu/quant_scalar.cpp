// The portable half of the quantized formats: fp16 conversion, ggml's reference quantizers, the
// activation quantizer, and plain-loop kernels (the fallback, and SPARSEINFER_CPU_ISA=scalar).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "quant.h"

namespace sparseinfer {
namespace cpu {

float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    exp = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

uint16_t float_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u)
    return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504: inf
  if (abs < 0x38800000u) {  // below the smallest normal half: a subnormal (or zero), rounded
    const float scaled = std::fabs(f) * 16777216.0f;  // * 2^24: the subnormal unit becomes 1
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)));
  }
  const uint32_t mant_odd = (abs >> 13) & 1u;
  const uint32_t rounded = abs + 0xfffu + mant_odd;  // round to nearest, ties to even
  return static_cast<uint16_t>(sign | (((rounded >> 23) - 112u) << 10) |
                               ((rounded >> 13) & 0x3ffu));
}

void quantize_row(QuantFormat f, const float* x, int64_t d, uint8_t* out) {
  const int64_t bb = block_bytes(f);
  for (int64_t b = 0; b < d / kQK; ++b) {
    const float* v = x + b * kQK;
    uint8_t* o = out + b * bb;
    if (f == QuantFormat::kQ8_0) {
      float amax = 0.f;
      for (int i = 0; i < kQK; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float scale = amax / 127.f;
      const float inv = scale != 0.f ? 1.f / scale : 0.f;
      const uint16_t h = float_to_fp16(scale);
      std::memcpy(o, &h, 2);
      for (int i = 0; i < kQK; ++i)
        o[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(std::roundf(v[i] * inv)));
    } else {
      float amax = 0.f, max = 0.f;  // the value of largest magnitude, with its sign (the first one)
      for (int i = 0; i < kQK; ++i) {
        if (amax < std::fabs(v[i])) {
          amax = std::fabs(v[i]);
          max = v[i];
        }
      }
      const float scale = max / -8.f;
      const float inv = scale != 0.f ? 1.f / scale : 0.f;
      const uint16_t h = float_to_fp16(scale);
      std::memcpy(o, &h, 2);
      for (int i = 0; i < kQK / 2; ++i) {
        const int lo = std::min(15, static_cast<int>(static_cast<int8_t>(v[i] * inv + 8.5f)));
        const int hi = std::min(15, static_cast<int>(static_cast<int8_t>(v[i + 16] * inv + 8.5f)));
        o[2 + i] = static_cast<uint8_t>(lo | (hi << 4));
      }
    }
  }
}

void dequantize_row(QuantFormat f, const uint8_t* q, int64_t d, float* out) {
  const int64_t bb = block_bytes(f);
  for (int64_t b = 0; b < d / kQK; ++b) {
    const uint8_t* blk = q + b * bb;
    uint16_t h;
    std::memcpy(&h, blk, 2);
    const float scale = fp16_to_float(h);
    float* o = out + b * kQK;
    if (f == QuantFormat::kQ8_0) {
      for (int i = 0; i < kQK; ++i)
        o[i] = scale * static_cast<float>(static_cast<int8_t>(blk[2 + i]));
    } else {
      for (int i = 0; i < kQK / 2; ++i) {
        o[i] = scale * static_cast<float>((blk[2 + i] & 15) - 8);
        o[i + 16] = scale * static_cast<float>((blk[2 + i] >> 4) - 8);
      }
    }
  }
}

namespace {

// Where byte i of the quants of block j of a run lands in the interleaved run (after its 16-byte
// scale header): chunk i / 4, block j's 4 bytes of it.
inline int64_t interleaved_offset(int64_t j, int64_t i) { return 32 * (i / 4) + 4 * j + (i % 4); }

}  // namespace

void interleave_row(QuantFormat f, const uint8_t* plain, int64_t nblk, uint8_t* out) {
  const int64_t bb = block_bytes(f), qbytes = bb - 2, runs = nblk / kGroup;
  for (int64_t g = 0; g < runs; ++g) {
    const uint8_t* src = plain + g * kGroup * bb;
    uint8_t* dst = out + g * kGroup * bb;
    for (int64_t j = 0; j < kGroup; ++j) {
      std::memcpy(dst + 2 * j, src + j * bb, 2);
      for (int64_t i = 0; i < qbytes; ++i) dst[16 + interleaved_offset(j, i)] = src[j * bb + 2 + i];
    }
  }
  std::memcpy(out + runs * kGroup * bb, plain + runs * kGroup * bb, (nblk - runs * kGroup) * bb);
}

void deinterleave_row(QuantFormat f, const uint8_t* in, int64_t nblk, uint8_t* plain) {
  const int64_t bb = block_bytes(f), qbytes = bb - 2, runs = nblk / kGroup;
  for (int64_t g = 0; g < runs; ++g) {
    const uint8_t* src = in + g * kGroup * bb;
    uint8_t* dst = plain + g * kGroup * bb;
    for (int64_t j = 0; j < kGroup; ++j) {
      std::memcpy(dst + j * bb, src + 2 * j, 2);
      for (int64_t i = 0; i < qbytes; ++i) dst[j * bb + 2 + i] = src[16 + interleaved_offset(j, i)];
    }
  }
  std::memcpy(plain + runs * kGroup * bb, in + runs * kGroup * bb, (nblk - runs * kGroup) * bb);
}

void quantize_activations_scalar(const float* x, int64_t nblk, bool interleaved, int8_t* q,
                                 float* scale, int32_t* sum) {
  const int64_t runs = interleaved ? nblk / kGroup : 0;
  for (int64_t b = 0; b < nblk; ++b) {
    const float* v = x + b * kQK;
    float amax = 0.f;
    for (int i = 0; i < kQK; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float step = amax / 127.f;
    const float inv = step != 0.f ? 1.f / step : 0.f;
    int32_t total = 0;
    for (int i = 0; i < kQK; ++i) {
      const auto value = static_cast<int8_t>(std::nearbyint(v[i] * inv));  // ties to even
      total += value;
      const int64_t at = b < runs * kGroup
                             ? (b / kGroup) * kGroup * kQK + interleaved_offset(b % kGroup, i)
                             : b * kQK + i;
      q[at] = value;
    }
    scale[b] = fp16_to_float(float_to_fp16(step));
    sum[b] = total;
  }
}

void QuantizedRows::quantize(const float* x, int64_t nrows, int64_t d, bool interleaved,
                             QuantizeRowFn fn) {
  rows = nrows;
  nblk = d / kQK;
  q.resize(static_cast<size_t>(rows * nblk * kQK));
  scale.resize(static_cast<size_t>(rows * nblk));
  sum.resize(static_cast<size_t>(rows * nblk));
  for (int64_t r = 0; r < rows; ++r) {
    fn(x + r * d, nblk, interleaved, q.data() + r * nblk * kQK, scale.data() + r * nblk,
       sum.data() + r * nblk);
  }
}

namespace {

// The 32 int8 values of weight block `blk` (q - 8 for Q4_0).
template <QuantFormat F>
inline void block_values(const uint8_t* blk, int8_t* out) {
  if constexpr (F == QuantFormat::kQ8_0) {
    std::memcpy(out, blk + 2, kQK);
  } else {
    for (int i = 0; i < kQK / 2; ++i) {
      out[i] = static_cast<int8_t>((blk[2 + i] & 15) - 8);
      out[i + 16] = static_cast<int8_t>((blk[2 + i] >> 4) - 8);
    }
  }
}

inline float block_scale(const uint8_t* blk) {
  uint16_t h;
  std::memcpy(&h, blk, 2);
  return fp16_to_float(h);
}

template <QuantFormat F>
void dots(const uint8_t* w, const uint8_t*, const int8_t* const* xq, const float* const* xs,
          int nrows, int64_t nblk, float* out) {
  constexpr int64_t bb = block_bytes(F);
  float acc[kMaxQDotRows][2] = {};
  int8_t v[kQK];
  for (int64_t b = 0; b < nblk; ++b) {
    const uint8_t* blk = w + b * bb;
    block_values<F>(blk, v);
    const float dw = block_scale(blk);
    for (int r = 0; r < nrows; ++r) {
      const int8_t* xb = xq[r] + b * kQK;
      int32_t s = 0;
      for (int i = 0; i < kQK; ++i) s += static_cast<int32_t>(v[i]) * xb[i];
      acc[r][b & 1] = __builtin_fmaf(dw * xs[r][b], static_cast<float>(s), acc[r][b & 1]);
    }
  }
  for (int r = 0; r < nrows; ++r) out[r] = acc[r][0] + acc[r][1];
}

// The interleaved layout, value by value (the portable reference of quant_simd.h's kernel).
template <QuantFormat F>
void dots_i8(const uint8_t* w, const uint8_t* next, const int8_t* const* xq, const float* const* xs,
             const int32_t* const*, int nrows, int64_t nblk, float* out) {
  constexpr int64_t bb = block_bytes(F);
  const int64_t runs = nblk / kGroup;
  float acc[kMaxQDotRows] = {};
  for (int64_t g = 0; g < runs; ++g) {
    const uint8_t* run = w + g * kGroup * bb;
    for (int64_t j = 0; j < kGroup; ++j) {
      uint16_t h;
      std::memcpy(&h, run + 2 * j, 2);
      const float dw = fp16_to_float(h);
      for (int r = 0; r < nrows; ++r) {
        const int8_t* xr = xq[r] + g * kGroup * kQK;
        int32_t s = 0;
        for (int i = 0; i < kQK; ++i) {
          int wv;
          if constexpr (F == QuantFormat::kQ8_0) {
            wv = static_cast<int8_t>(run[16 + interleaved_offset(j, i)]);
          } else {
            const uint8_t byte = run[16 + interleaved_offset(j, i % 16)];
            wv = (i < 16 ? byte & 15 : byte >> 4) - 8;
          }
          s += wv * xr[interleaved_offset(j, i)];
        }
        acc[r] = __builtin_fmaf(dw * xs[r][g * kGroup + j], static_cast<float>(s), acc[r]);
      }
    }
  }
  if (runs * kGroup < nblk) {  // the plain tail
    const int64_t done = runs * kGroup;
    const int8_t* xt[kMaxQDotRows];
    const float* st[kMaxQDotRows];
    for (int r = 0; r < nrows; ++r) {
      xt[r] = xq[r] + done * kQK;
      st[r] = xs[r] + done;
    }
    float tail[kMaxQDotRows];
    dots<F>(w + done * bb, next, xt, st, nrows, nblk - done, tail);
    for (int r = 0; r < nrows; ++r) acc[r] += tail[r];
  }
  for (int r = 0; r < nrows; ++r) out[r] = acc[r];
}

template <QuantFormat F>
void gemv_i8(const uint8_t* w, int64_t row_bytes, int64_t nw, const int8_t* const* xq,
             const float* const* xs, const int32_t* const* xsum, int nrows, int64_t nblk,
             float* out, int64_t ldo) {
  float res[kMaxQDotRows];
  for (int64_t i = 0; i < nw; ++i) {
    dots_i8<F>(w + i * row_bytes, nullptr, xq, xs, xsum, nrows, nblk, res);
    for (int r = 0; r < nrows; ++r) out[r * ldo + i] = res[r];
  }
}

template <QuantFormat F>
void gather_i8(const uint8_t* const* ws, const uint8_t* const*, int nw, const int8_t* xq,
               const float* xs, const int32_t* xsum, int64_t nblk, float* out) {
  for (int i = 0; i < nw; ++i) dots_i8<F>(ws[i], nullptr, &xq, &xs, &xsum, 1, nblk, out + i);
}

template <QuantFormat F>
void axpys(const uint8_t* const* ws, int nw, const uint8_t* const*, const float* const* coefs,
           const int32_t* rows, int nrows, float* buf, int64_t ldb, int64_t nblk) {
  constexpr int64_t bb = block_bytes(F);
  int8_t v[kQK];
  for (int k = 0; k < nrows; ++k) {
    const int32_t r = rows[k];
    float* dst = buf + r * ldb;
    for (int64_t b = 0; b < nblk; ++b) {
      for (int i = 0; i < nw; ++i) {
        const uint8_t* blk = ws[i] + b * bb;
        block_values<F>(blk, v);
        const float a = coefs[i][r] * block_scale(blk);
        for (int t = 0; t < kQK; ++t) {
          dst[b * kQK + t] = __builtin_fmaf(a, static_cast<float>(v[t]), dst[b * kQK + t]);
        }
      }
    }
  }
}

}  // namespace

QuantKernels scalar_quant_kernels(QuantFormat f) {
  if (f == QuantFormat::kQ8_0)
    return QuantKernels{&dots<QuantFormat::kQ8_0>,    &dots_i8<QuantFormat::kQ8_0>,
                        &axpys<QuantFormat::kQ8_0>,   &quantize_activations_scalar,
                        &gemv_i8<QuantFormat::kQ8_0>, &gather_i8<QuantFormat::kQ8_0>};
  return QuantKernels{&dots<QuantFormat::kQ4_0>,    &dots_i8<QuantFormat::kQ4_0>,
                      &axpys<QuantFormat::kQ4_0>,   &quantize_activations_scalar,
                      &gemv_i8<QuantFormat::kQ4_0>, &gather_i8<QuantFormat::kQ4_0>};
}

}  // namespace cpu
}  // namespace sparseinfer
