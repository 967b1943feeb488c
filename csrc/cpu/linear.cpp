// y = x Wᵀ (+ b) on the CPU with the sparse FFN's row kernels: one task per weight row, the row
// read once for all batch rows, fp32 accumulation. It exists for the small dense projections on the
// sparse path (the low-rank predictors): torch 2.13's CPU bf16 matrix-vector product on a CPU
// without AVX-512 BF16 runs at a few percent of memory bandwidth, which would cost more than the
// sparse FFN it guards. Bit-identical for any thread count (each output is one row's dot product).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "row_kernels.h"

namespace sparseinfer {
namespace cpu {
RowKernels choose_row_kernels(WeightType type);  // sparse_ffn.cpp
WeightType weight_type_of(at::ScalarType type);  // sparse_ffn.cpp
}  // namespace cpu

namespace {

float load_as_float(const void* p, int64_t i, at::ScalarType type) {
  if (type == at::kFloat) return static_cast<const float*>(p)[i];
  if (type == at::kBFloat16) return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
  return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
}

void store_float(void* p, int64_t i, float v, at::ScalarType type) {
  if (type == at::kFloat) {
    static_cast<float*>(p)[i] = v;
  } else if (type == at::kBFloat16) {
    static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(v);
  } else {
    static_cast<c10::Half*>(p)[i] = c10::Half(v);
  }
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "linear: tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2, "linear: x must have shape (B, d), got ", x.sizes());
  const at::ScalarType type = x.scalar_type();
  const cpu::WeightType wtype = cpu::weight_type_of(type);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "linear: weight must have shape (k, d) with d = ", x.size(1), ", got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == type, "linear: weight dtype ", weight.scalar_type(),
              " differs from x dtype ", type);
  TORCH_CHECK(weight.is_contiguous(), "linear: weight must be contiguous");
  const int64_t B = x.size(0), d = x.size(1), k = weight.size(0);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == k &&
                    bias->scalar_type() == type,
                "linear: bias must be a CPU tensor of shape (", k, ") and x's dtype");
  }
  at::Tensor out = at::empty({B, k}, x.options());  // (B, k)
  if (B == 0 || k == 0) return out;
  const at::Tensor x32 = x.to(at::kFloat).contiguous();  // (B, d)
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const void* bp = bias.has_value() ? bc.const_data_ptr() : nullptr;
  const cpu::RowKernels kern = cpu::choose_row_kernels(wtype);
  const float* xp = x32.const_data_ptr<float>();
  const auto* wp = static_cast<const char*>(weight.const_data_ptr());
  const int64_t row_bytes = d * static_cast<int64_t>(weight.element_size());
  void* op = out.mutable_data_ptr();
  at::parallel_for(0, k, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
    const float* xs[cpu::kMaxDotRows];
    float res[cpu::kMaxDotRows];
    for (int64_t i = begin; i < end; ++i) {
      const float b = bp == nullptr ? 0.f : load_as_float(bp, i, type);
      const char* next = i + 1 < end ? wp + (i + 1) * row_bytes : nullptr;
      for (int64_t b0 = 0; b0 < B; b0 += cpu::kMaxDotRows) {
        const int nr = static_cast<int>(std::min<int64_t>(cpu::kMaxDotRows, B - b0));
        for (int r = 0; r < nr; ++r) xs[r] = xp + (b0 + r) * d;
        kern.dots(wp + i * row_bytes, b0 + nr >= B ? next : nullptr, xs, nr, d, res);
        for (int r = 0; r < nr; ++r) store_float(op, (b0 + r) * k + i, res[r] + b, type);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace sparseinfer

TORCH_LIBRARY_IMPL(sparseinfer, CPU, m) { m.impl("linear", &sparseinfer::linear_cpu); }
