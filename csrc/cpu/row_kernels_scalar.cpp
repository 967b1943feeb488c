// Portable row kernels: plain loops (the compiler may use the baseline SSE2). The fallback for CPUs
// without AVX2, and the path SPARSEINFER_CPU_ISA=scalar forces for testing.
#include <cstring>

#include "row_kernels.h"

namespace sparseinfer {
namespace cpu {
namespace {

inline float load_one(const float* p) { return *p; }

inline float load_one(const uint16_t* p, WeightType type) {
  if (type == WeightType::kBF16) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;  // bf16 is the top half of an fp32
    float v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  }
  // IEEE half -> float, handling subnormals, infinities and NaN.
  const uint32_t h = *p;
  const uint32_t sign = (h & 0x8000u) << 16;
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

template <WeightType kType>
inline float weight_at(const void* w, int64_t c) {
  if constexpr (kType == WeightType::kF32) {
    return load_one(static_cast<const float*>(w) + c);
  } else {
    return load_one(static_cast<const uint16_t*>(w) + c, kType);
  }
}

template <WeightType kType>
void dots(const void* w, const void* /*next*/, const float* const* xs, int nrows, int64_t d,
          float* out) {
  for (int r = 0; r < nrows; ++r) {
    float acc = 0.f;
    for (int64_t c = 0; c < d; ++c) acc += weight_at<kType>(w, c) * xs[r][c];
    out[r] = acc;
  }
}

template <WeightType kType>
void axpys(const void* const* ws, int nw, const void* const* /*nexts*/, const float* const* coefs,
           const int32_t* rows, int nrows, float* buf, int64_t ldb, int64_t len) {
  for (int k = 0; k < nrows; ++k) {
    float* dst = buf + rows[k] * ldb;
    for (int i = 0; i < nw; ++i) {
      const float a = coefs[i][rows[k]];
      for (int64_t c = 0; c < len; ++c) dst[c] += a * weight_at<kType>(ws[i], c);
    }
  }
}

template <WeightType kType>
RowKernels make() {
  return RowKernels{&dots<kType>, &axpys<kType>};
}

}  // namespace

RowKernels scalar_row_kernels(WeightType type) {
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
