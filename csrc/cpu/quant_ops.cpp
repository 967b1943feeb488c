// quantize / dequantize: weights to and from ggml's Q8_0 and Q4_0 block layouts (quant.h), on the
// CPU, one row per task. The engine quantizes a checkpoint's weights at load with these; tests and
// the reference read them back.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string_view>
#include <vector>

#include "weights.h"

namespace sparseinfer {
namespace {

cpu::WeightFormat format_of(c10::string_view name, const char* op) {
  const auto f = cpu::parse_weight_format(std::string_view(name.data(), name.size()), op);
  TORCH_CHECK(f.has_value(), op, ": format must be q8_0, q4_0, q8_0_i8 or q4_0_i8");
  return *f;
}

at::Tensor quantize_cpu(const at::Tensor& w, c10::string_view format) {
  const cpu::WeightFormat wf = format_of(format, "quantize");
  const cpu::QuantFormat f = wf.format;
  TORCH_CHECK(w.device().is_cpu(), "quantize: w must be on the CPU");
  TORCH_CHECK(w.dim() == 2 && w.size(1) % cpu::kQK == 0,
              "quantize: w must be 2-D with rows of a multiple of 32 values, got ", w.sizes());
  TORCH_CHECK(w.is_floating_point(), "quantize: w must be a floating-point tensor, got ",
              w.scalar_type());
  const int64_t rows = w.size(0), d = w.size(1), row_bytes = d / cpu::kQK * cpu::block_bytes(f);
  at::Tensor out = at::empty({rows, row_bytes}, w.options().dtype(at::kByte));
  uint8_t* op = out.mutable_data_ptr<uint8_t>();
  cpu::parallel_chunks(rows, /*chunk=*/64, [&](int64_t begin, int64_t end) {
    const at::Tensor part = w.slice(0, begin, end).to(at::kFloat).contiguous();  // (end - begin, d)
    const float* p = part.const_data_ptr<float>();
    std::vector<uint8_t> plain(static_cast<size_t>(row_bytes));
    for (int64_t r = begin; r < end; ++r) {
      uint8_t* dst = wf.interleaved ? plain.data() : op + r * row_bytes;
      cpu::quantize_row(f, p + (r - begin) * d, d, dst);
      if (wf.interleaved) cpu::interleave_row(f, plain.data(), d / cpu::kQK, op + r * row_bytes);
    }
  });
  return out;
}

at::Tensor dequantize_cpu(const at::Tensor& q, c10::string_view format) {
  const cpu::WeightFormat wf = format_of(format, "dequantize");
  const cpu::QuantFormat f = wf.format;
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kByte && q.dim() == 2 &&
                  q.size(1) % cpu::block_bytes(f) == 0,
              "dequantize: q must be uint8 (rows, blocks * ", cpu::block_bytes(f),
              ") on the CPU, got ", q.scalar_type(), " ", q.sizes());
  const at::Tensor qc = q.contiguous();
  const int64_t rows = q.size(0), row_bytes = q.size(1),
                d = row_bytes / cpu::block_bytes(f) * cpu::kQK;
  at::Tensor out = at::empty({rows, d}, q.options().dtype(at::kFloat));
  const uint8_t* qp = qc.const_data_ptr<uint8_t>();
  float* op = out.mutable_data_ptr<float>();
  cpu::parallel_chunks(rows, /*chunk=*/64, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> plain(static_cast<size_t>(row_bytes));
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* row = qp + r * row_bytes;
      if (wf.interleaved) {
        cpu::deinterleave_row(f, row, d / cpu::kQK, plain.data());
        row = plain.data();
      }
      cpu::dequantize_row(f, row, d, op + r * d);
    }
  });
  return out;
}

}  // namespace
}  // namespace sparseinfer

TORCH_LIBRARY_IMPL(sparseinfer, CPU, m) {
  m.impl("quantize", &sparseinfer::quantize_cpu);
  m.impl("dequantize", &sparseinfer::dequantize_cpu);
}
