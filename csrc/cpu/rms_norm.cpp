// RMSNorm on the CPU: one row per task, rows split across threads with at::parallel_for. Plain
// loops that the compiler vectorises; the op is memory-bound and a tiny share of a decode step.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>

namespace sparseinfer {
namespace {

void check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out) {
  TORCH_CHECK(x.dim() >= 1, "rms_norm: x must have at least one dimension");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight must have shape (", x.size(-1), "), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight dtype ",
              weight.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
              "rms_norm_out: out must match x in shape and dtype");
  TORCH_CHECK(out.is_contiguous(), "rms_norm_out: out must be contiguous");
}

template <typename scalar_t>
void rms_norm_rows(const scalar_t* x, const scalar_t* w, scalar_t* y, int64_t rows, int64_t d,
                   float eps) {
  at::parallel_for(0, rows, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * d;
      scalar_t* yr = y + r * d;
      float sum_sq = 0.f;
      for (int64_t i = 0; i < d; ++i) {
        const float v = static_cast<float>(xr[i]);
        sum_sq += v * v;
      }
      const float inv_rms = 1.f / std::sqrt(sum_sq / static_cast<float>(d) + eps);
      for (int64_t i = 0; i < d; ++i) {
        // Round to the input dtype before the weight multiply (Hugging Face's order).
        const scalar_t normed = static_cast<scalar_t>(static_cast<float>(xr[i]) * inv_rms);
        yr[i] = static_cast<scalar_t>(static_cast<float>(normed) * static_cast<float>(w[i]));
      }
    }
  });
}

void rms_norm_out_cpu(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  check_rms_norm_args(x, weight, out);
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && out.device().is_cpu(),
              "rms_norm: all tensors must be on the CPU");
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const int64_t d = x.size(-1);
  const int64_t rows = d == 0 ? 0 : x.numel() / d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_cpu", [&] {
    rms_norm_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
                            out.mutable_data_ptr<scalar_t>(), rows, d, static_cast<float>(eps));
  });
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  rms_norm_out_cpu(x, weight, eps, out);
  return out;
}

}  // namespace
}  // namespace sparseinfer

TORCH_LIBRARY_IMPL(sparseinfer, CPU, m) { m.impl("rms_norm", &sparseinfer::rms_norm_cpu); }
