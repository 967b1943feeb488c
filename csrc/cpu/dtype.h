// fp32 <-> the CPU ops' element types (float, c10::BFloat16, c10::Half), for loops over whole rows.
// Widened on load, rounded to T (and kept as fp32) where torch would round, narrowed exactly on
// store. Per-element c10 conversions (a branch for NaN each) cost more than a short attention, so
// bf16 does both with integer arithmetic on the bits, in loops the compiler vectorises. Include it
// only from files built for baseline x86-64 (not under a `#pragma GCC target`), so that the linker
// never keeps an AVX-512 copy of these inline functions (see row_kernels.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace sparseinfer {
namespace cpu {

template <typename T>
struct Dtype;

template <>
struct Dtype<float> {
  static void load(const float* src, int64_t n, float* dst) { std::copy_n(src, n, dst); }
  static float round(float f) { return f; }
  static void store(const float* src, int64_t n, float* dst) { std::copy_n(src, n, dst); }
};

template <>
struct Dtype<c10::BFloat16> {
  // A bf16 is the top half of an fp32's bits.
  static void load(const c10::BFloat16* src, int64_t n, float* dst) {
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t u = static_cast<uint32_t>(src[i].x) << 16;
      std::memcpy(dst + i, &u, sizeof(u));
    }
  }
  // Round to nearest even, NaN to the quiet NaN 0x7FC0: c10::BFloat16's rule.
  static uint32_t round_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC00000u : r;
  }
  static float round(float f) {
    const uint32_t u = round_bits(f);
    std::memcpy(&f, &u, sizeof(u));
    return f;
  }
  static void store(const float* src, int64_t n, c10::BFloat16* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i].x = static_cast<uint16_t>(round_bits(src[i]) >> 16);
  }
};

template <>
struct Dtype<c10::Half> {
  static void load(const c10::Half* src, int64_t n, float* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
  static float round(float f) { return static_cast<float>(static_cast<c10::Half>(f)); }
  static void store(const float* src, int64_t n, c10::Half* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
  }
};

}  // namespace cpu
}  // namespace sparseinfer
