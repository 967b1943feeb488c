// One decode step's attention on the CPU, for one new token per row: rotary embedding of q and k,
// the new key and value written into the row's cache slot, and softmax(scale q Kᵀ) V over the
// row's own positions, in one op.
//
// Why one op: at batch 1 the step's attention is ~15 small torch ops per layer (rope's slices, cat,
// multiplies and adds, two cache copies, SDPA with its blocking), each paying dispatch and a cold
// cache after the weight streams: ~260 us per layer in a q4_0 decode step on the 2-core SPR,
// against ~110 us for this op (benchmarks/results/README.md). Each row attends over exactly its
// positions 0..pos, so rows of different lengths need no mask.
//
// Work split: one task per (row, kv head). A task writes its kv head's new key and value, then
// computes every query head of that group (two at a time, reading each cached key once for both),
// so no task reads what another writes. The dot products and the value sums are the sparse FFN's
// row kernels (row_kernels.h, chosen per ISA), whose summation order depends only on head_dim:
// a row's result does not depend on its batch mates or the thread count.
//
// Rounding: the rotary embedding rounds as the unfused torch code does (x·cos and rotate(x)·sin
// each rounded to the dtype, then their sum), so the cached keys are bit-identical to it. This file
// is built for baseline x86-64 (no FMA), so the fp32 products are not contracted into an FMA
// either. Scores, softmax and the weighted sum of values are fp32, rounded once at the end.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "dtype.h"
#include "weights.h"

namespace sparseinfer {
namespace {

using cpu::Dtype;

constexpr int kHeadsPerPass = cpu::kMaxDotRows;  // query heads sharing one read of the keys
static_assert(kHeadsPerPass == 2, "attend's row list {0, 1} assumes two heads per pass");
constexpr int kValuesPerCall = cpu::kMaxAxpyWeights;

// out = x·cos + rotate_half(x)·sin for one head, rotate_half(x) = (-x[half:], x[:half]), each
// product and the sum rounded to T as torch's elementwise ops round them. All values fp32 (x, cos
// and sin hold T values).
template <typename T>
void rope_head(const float* x, const float* cos, const float* sin, int64_t hd, float* out) {
  using D = Dtype<T>;
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i)
    out[i] = D::round(D::round(x[i] * cos[i]) + D::round(-x[i + half] * sin[i]));
  for (int64_t i = half; i < hd; ++i)
    out[i] = D::round(D::round(x[i] * cos[i]) + D::round(x[i - half] * sin[i]));
}

struct Shape {
  int64_t B, H, KVH, hd, slots, max_seq, positions;
};

Shape check_args(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                 const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                 const at::Tensor& positions, int64_t H) {
  for (const at::Tensor* t : {&qkv, &cos, &sin, &k_cache, &v_cache, &slots, &positions})
    TORCH_CHECK(t->device().is_cpu(), "decode_attention: every tensor must be on the CPU");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1,
              "decode_attention: slots must be int64 (B,), got ", slots.scalar_type(), " ",
              slots.sizes());
  const int64_t B = slots.size(0);
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.sizes() == slots.sizes(),
              "decode_attention: positions must be int64 (B,) = (", B, "), got ",
              positions.scalar_type(), " ", positions.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "decode_attention: k_cache and v_cache must be (slots, KVH, max_seq, head_dim), got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "decode_attention: the caches must be contiguous");
  const int64_t KVH = k_cache.size(1), hd = k_cache.size(3);
  TORCH_CHECK(H > 0 && KVH > 0 && H % KVH == 0, "decode_attention: ", H,
              " query heads are not a multiple of ", KVH, " kv heads");
  TORCH_CHECK(hd % 2 == 0, "decode_attention: head_dim must be even, got ", hd);
  const int64_t width = (H + 2 * KVH) * hd;
  TORCH_CHECK(qkv.dim() >= 1 && qkv.size(-1) == width && qkv.numel() == B * width,
              "decode_attention: qkv must be (B, ..., (H + 2 KVH) head_dim) = (", B, ", ..., ",
              width, ") for ", H, " query heads, ", KVH, " kv heads of ", hd, ", got ",
              qkv.sizes());
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == hd && cos.sizes() == sin.sizes(),
              "decode_attention: cos and sin must be (positions, ", hd, "), got ", cos.sizes(),
              " and ", sin.sizes());
  const at::ScalarType type = qkv.scalar_type();
  for (const at::Tensor* t : {&cos, &sin, &k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == type, "decode_attention: cos, sin and the caches must be in ",
                "qkv's dtype ", type, ", got ", t->scalar_type());
  cpu::weight_type_of(type);  // a dtype the row kernels read
  return Shape{B, H, KVH, hd, k_cache.size(0), k_cache.size(2), cos.size(0)};
}

template <typename T>
void attend(const Shape& s, const T* qkv, const T* cos, const T* sin, T* k_cache, T* v_cache,
            const int64_t* slots, const int64_t* positions, float scale, T* out) {
  const cpu::RowKernels rk =
      cpu::choose_row_kernels(cpu::weight_type_of(c10::CppTypeToScalarType<T>::value));
  const int64_t group = s.H / s.KVH, hd = s.hd, width = (s.H + 2 * s.KVH) * hd;
  at::parallel_for(0, s.B * s.KVH, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    using D = Dtype<T>;
    std::vector<float> in(hd), rot(hd), cf(hd), sf(hd), probs;
    std::vector<float> qf(kHeadsPerPass * hd), acc(kHeadsPerPass * hd);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.KVH, kvh = task % s.KVH;
      const int64_t pos = positions[b], n = pos + 1;
      D::load(cos + pos * hd, hd, cf.data());
      D::load(sin + pos * hd, hd, sf.data());
      T* keys = k_cache + (slots[b] * s.KVH + kvh) * s.max_seq * hd;  // (max_seq, hd)
      T* values = v_cache + (slots[b] * s.KVH + kvh) * s.max_seq * hd;
      const T* q = qkv + b * width;  // row b: H query heads, then KVH keys, then KVH values
      const T* k = q + s.H * hd;
      const T* v = k + s.KVH * hd;
      D::load(k + kvh * hd, hd, in.data());
      rope_head<T>(in.data(), cf.data(), sf.data(), hd, rot.data());
      D::store(rot.data(), hd, keys + pos * hd);
      std::copy_n(v + kvh * hd, hd, values + pos * hd);
      probs.resize(static_cast<size_t>(n * kHeadsPerPass));
      for (int64_t h0 = kvh * group; h0 < (kvh + 1) * group; h0 += kHeadsPerPass) {
        const int rows = static_cast<int>(std::min<int64_t>(kHeadsPerPass, (kvh + 1) * group - h0));
        const float* xs[kHeadsPerPass];
        for (int r = 0; r < rows; ++r) {
          D::load(q + (h0 + r) * hd, hd, in.data());
          rope_head<T>(in.data(), cf.data(), sf.data(), hd, qf.data() + r * hd);
          xs[r] = qf.data() + r * hd;
        }
        // probs[j * kHeadsPerPass + r]: head r's score of key j, then its exp (the layout the value
        // sums take their coefficients in).
        float score[kHeadsPerPass];
        for (int64_t j = 0; j < n; ++j) {
          rk.dots(keys + j * hd, nullptr, xs, rows, hd, score);
          for (int r = 0; r < rows; ++r) probs[j * kHeadsPerPass + r] = score[r] * scale;
        }
        float inv_sum[kHeadsPerPass];
        for (int r = 0; r < rows; ++r) {
          float top = -INFINITY;
          for (int64_t j = 0; j < n; ++j) top = std::max(top, probs[j * kHeadsPerPass + r]);
          float sum = 0.f;
          for (int64_t j = 0; j < n; ++j) {
            const float e = std::exp(probs[j * kHeadsPerPass + r] - top);
            probs[j * kHeadsPerPass + r] = e;
            sum += e;
          }
          inv_sum[r] = 1.f / sum;
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        static constexpr int32_t kRows[kHeadsPerPass] = {0, 1};
        for (int64_t j = 0; j < n; j += kValuesPerCall) {
          const int nw = static_cast<int>(std::min<int64_t>(kValuesPerCall, n - j));
          const void* ws[kValuesPerCall];
          const float* coefs[kValuesPerCall];
          for (int i = 0; i < nw; ++i) {
            ws[i] = values + (j + i) * hd;
            coefs[i] = probs.data() + (j + i) * kHeadsPerPass;
          }
          rk.axpys(ws, nw, nullptr, coefs, kRows, rows, acc.data(), hd, hd);
        }
        for (int r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < hd; ++c) acc[r * hd + c] *= inv_sum[r];
          D::store(acc.data() + r * hd, hd, out + (b * s.H + h0 + r) * hd);
        }
      }
    }
  });
}

at::Tensor decode_attention_cpu(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
                                const at::Tensor& positions, int64_t num_heads, double scale) {
  const Shape s = check_args(qkv, cos, sin, k_cache, v_cache, slots, positions, num_heads);
  const at::Tensor slots_c = slots.contiguous(), positions_c = positions.contiguous();
  const int64_t* slot = slots_c.const_data_ptr<int64_t>();
  const int64_t* pos = positions_c.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < s.B; ++b) {
    TORCH_CHECK(slot[b] >= 0 && slot[b] < s.slots, "decode_attention: slots[", b, "] = ", slot[b],
                " is out of range [0, ", s.slots, ")");
    TORCH_CHECK(pos[b] >= 0 && pos[b] < std::min(s.max_seq, s.positions),
                "decode_attention: positions[", b, "] = ", pos[b], " is out of range [0, ",
                std::min(s.max_seq, s.positions), ") (the cache length and the rope tables)");
    for (int64_t c = 0; c < b; ++c)  // two rows writing one slot would race
      TORCH_CHECK(slot[c] != slot[b], "decode_attention: slots[", c, "] and slots[", b,
                  "] are both ", slot[b]);
  }
  std::vector<int64_t> shape(qkv.sizes().begin(), qkv.sizes().end());
  shape.back() = s.H * s.hd;
  at::Tensor out = at::empty(shape, qkv.options().memory_format(at::MemoryFormat::Contiguous));
  if (s.B == 0) return out;
  const at::Tensor xc = qkv.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  const float scale_f = static_cast<float>(scale);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    attend<T>(s, xc.const_data_ptr<T>(), cc.const_data_ptr<T>(), sc.const_data_ptr<T>(),
              k_cache.mutable_data_ptr<T>(), v_cache.mutable_data_ptr<T>(), slot, pos, scale_f,
              out.mutable_data_ptr<T>());
  };
  switch (qkv.scalar_type()) {
    case at::kBFloat16:
      run(c10::BFloat16{});
      break;
    case at::kHalf:
      run(c10::Half{});
      break;
    default:
      run(float{});
  }
  return out;
}

}  // namespace
}  // namespace sparseinfer

TORCH_LIBRARY_IMPL(sparseinfer, CPU, m) {
  m.impl("decode_attention", &sparseinfer::decode_attention_cpu);
}
