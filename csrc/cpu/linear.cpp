// y = x Wᵀ (+ b) on the CPU with the row kernels: one task per weight row, the row read once for
// all batch rows, fp32 accumulation. Weights in x's dtype, or block-quantized (ggml Q8_0 / Q4_0, x
// then quantized to Q8_0 as ggml does; see weights.h). It runs the dense projections where torch's
// kernels are slower: torch 2.13's CPU bf16 matrix-vector product on a CPU without AVX-512 BF16
// runs at a few percent of memory bandwidth, and torch has no kernel for ggml's block formats at
// all. Bit-identical for any thread count (each output is one row's dot product).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string_view>
#include <vector>

#include "weights.h"

namespace sparseinfer {
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

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, c10::string_view weight_format) {
  constexpr const char* kOp = "linear";
  const at::ScalarType type = x.scalar_type();
  cpu::weight_type_of(type);
  const auto format =
      cpu::parse_weight_format(std::string_view(weight_format.data(), weight_format.size()), kOp);
  TORCH_CHECK(weight.dim() == 2, "linear: weight must be 2-D, got ", weight.sizes());
  const int64_t B = x.size(0), d = x.size(1), k = weight.size(0);
  const cpu::WeightMatrix w = cpu::weight_matrix(weight, format, k, d, type, kOp, "weight");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == k &&
                    bias->scalar_type() == type,
                "linear: bias must be a CPU tensor of shape (", k, ") and x's dtype");
  }
  at::Tensor out = at::empty({B, k}, x.options());  // (B, k)
  if (B == 0 || k == 0) return out;
  const cpu::Activations xa(x, format);
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const void* bp = bias.has_value() ? bc.const_data_ptr() : nullptr;
  void* op = out.mutable_data_ptr();
  // Chunks of at least 64 rows and 256 KiB: measured at batch 1 on 2 cores, 16-row chunks streamed
  // 4096 x 4096 Q4_0 rows at 18 GB/s against 22 at 64 and more, and rows of a few hundred bytes (a
  // predictor's second layer) twice as fast in 256 KiB chunks; a quarter of the rows per thread at
  // most keeps the dynamic hand-out's balance.
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(
      1, std::min(std::max<int64_t>(64, (256 << 10) / std::max<int64_t>(w.row_bytes, 1)),
                  (k + 4 * threads - 1) / (4 * threads)));
  cpu::parallel_chunks(k, chunk, [&](int64_t begin, int64_t end) {
    const int64_t n = end - begin;
    std::vector<float> res(static_cast<size_t>(B * n));  // (B, n)
    xa.gemv(w, begin, end, res.data());
    for (int64_t r = 0; r < B; ++r) {
      for (int64_t i = begin; i < end; ++i) {
        const float b = bp == nullptr ? 0.f : load_as_float(bp, i, type);
        store_float(op, r * k + i, res[r * n + i - begin] + b, type);
      }
    }
  });
  return out;
}

// x (..., d) -> (..., k): the model's (B, T, d) activations go in as they are, so that a decode
// step pays no Python-side reshape per projection (each torch call costs microseconds there).
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, c10::string_view weight_format) {
  TORCH_CHECK(x.device().is_cpu(), "linear: x must be on the CPU");
  TORCH_CHECK(x.dim() >= 1, "linear: x must have shape (..., d), got a scalar");
  if (x.dim() == 2) return linear_rows(x, weight, bias, weight_format);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  const at::Tensor out = linear_rows(x.reshape({-1, shape.back()}), weight, bias, weight_format);
  shape.back() = out.size(1);
  return out.view(shape);
}

}  // namespace
}  // namespace sparseinfer

TORCH_LIBRARY_IMPL(sparseinfer, CPU, m) { m.impl("linear", &sparseinfer::linear_cpu); }
