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

void QuantizedRows::quantize(const float* x, int64_t nrows, int64_t d) {
  rows = nrows;
  nblk = d / kQK;
  q.resize(static_cast<size_t>(rows * nblk * kQK));
  scale.resize(static_cast<size_t>(rows * nblk));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < nblk; ++b) {
      const float* v = x + r * d + b * kQK;
      float amax = 0.f;
      for (int i = 0; i < kQK; ++i) amax = std::max(amax, std::fabs(v[i]));
      // As ggml's quantize_row_q8_0 does: q = round(x / (amax / 127)), the scale kept as fp16.
      const float d = amax / 127.f;
      const float inv = d != 0.f ? 1.f / d : 0.f;
      const float s = fp16_to_float(float_to_fp16(d));
      int8_t* o = q.data() + (r * nblk + b) * kQK;
      for (int i = 0; i < kQK; ++i) o[i] = static_cast<int8_t>(std::roundf(v[i] * inv));
      scale[r * nblk + b] = s;
    }
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
    return QuantKernels{&dots<QuantFormat::kQ8_0>, &axpys<QuantFormat::kQ8_0>};
  return QuantKernels{&dots<QuantFormat::kQ4_0>, &axpys<QuantFormat::kQ4_0>};
}

}  // namespace cpu
}  // namespace sparseinfer
