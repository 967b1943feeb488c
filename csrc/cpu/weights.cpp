#include "weights.h"

#include <string>
#include <vector>

#include "dtype.h"

namespace sparseinfer {
namespace cpu {

std::optional<WeightFormat> parse_weight_format(std::string_view name, const char* op) {
  if (name == "none") return std::nullopt;
  if (name == "q8_0") return WeightFormat{QuantFormat::kQ8_0, false};
  if (name == "q4_0") return WeightFormat{QuantFormat::kQ4_0, false};
  if (name == "q8_0_i8") return WeightFormat{QuantFormat::kQ8_0, true};
  if (name == "q4_0_i8") return WeightFormat{QuantFormat::kQ4_0, true};
  TORCH_CHECK(false, op, ": weight_format must be none, q8_0, q4_0, q8_0_i8 or q4_0_i8; got '",
              std::string(name), "'");
}

WeightType weight_type_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return WeightType::kF32;
    case at::kBFloat16:
      return WeightType::kBF16;
    case at::kHalf:
      return WeightType::kF16;
    default:
      TORCH_CHECK(false, "x must be float32, bfloat16 or float16, got ", t);
  }
}

const char* WeightMatrix::segment(const char* r, int64_t c0) const {
  if (!format.has_value()) return r + c0 * (row_bytes / std::max<int64_t>(cols, 1));
  TORCH_CHECK(!format->interleaved, "an interleaved row has no segments of whole blocks");
  return r + c0 / kQK * block_bytes(format->format);
}

WeightMatrix weight_matrix(const at::Tensor& w, std::optional<WeightFormat> format, int64_t rows,
                           int64_t cols, at::ScalarType x_type, const char* op, const char* name) {
  TORCH_CHECK(w.device().is_cpu(), op, ": ", name, " must be on the CPU");
  // Weights are never copied behind the caller's back: a hidden copy would cost more than the op.
  TORCH_CHECK(w.is_contiguous(), op, ": ", name, " must be contiguous");
  WeightMatrix m;
  m.data = static_cast<const char*>(w.const_data_ptr());
  m.rows = rows;
  m.cols = cols;
  m.format = format;
  if (format.has_value()) {
    TORCH_CHECK(cols % kQK == 0, op,
                ": quantized weights need rows of a multiple of 32 values, got ", cols);
    m.row_bytes = cols / kQK * block_bytes(format->format);
    TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.size(0) == rows &&
                    w.size(1) == m.row_bytes,
                op, ": ", name, " must be uint8 of shape (", rows, ", ", m.row_bytes, ") for ",
                format->format == QuantFormat::kQ8_0 ? "q8_0" : "q4_0", " rows of ", cols,
                " values, got ", w.scalar_type(), " ", w.sizes());
  } else {
    TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols, op, ": ", name,
                " must have shape (", rows, ", ", cols, "), got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == x_type, op, ": ", name, " dtype ", w.scalar_type(),
                " differs from x dtype ", x_type);
    m.row_bytes = cols * static_cast<int64_t>(w.element_size());
  }
  return m;
}

Activations::Activations(const at::Tensor& x, std::optional<WeightFormat> format)
    : d_(x.size(1)), rows_(x.size(0)), format_(format) {
  // x in fp32. A contiguous bf16 x is widened here, not by x.to(): a torch op costs tens of
  // microseconds when a weight stream has just evicted the dispatcher from the caches, and every
  // projection of a decode step starts that way (on the 2-core SPR after a 256 MB read, a 64-row
  // Q4_0 ops.linear took 149 us with x.to() and 110 us without).
  const int64_t n = rows_ * d_;
  if (x.scalar_type() == at::kFloat && x.is_contiguous()) {
    x32_ = x.const_data_ptr<float>();
  } else if (x.scalar_type() == at::kBFloat16 && x.is_contiguous()) {
    own_.resize(static_cast<size_t>(n));
    Dtype<c10::BFloat16>::load(static_cast<const c10::BFloat16*>(x.const_data_ptr()), n,
                               own_.data());
    x32_ = own_.data();
  } else {
    kept_ = x.to(at::kFloat).contiguous();
    x32_ = kept_.const_data_ptr<float>();
  }
  if (format_.has_value()) {
    qk_ = choose_quant_kernels(format_->format);
    xq_.quantize(x32_, rows_, d_, format_->interleaved, qk_.quantize_x);
  } else {
    rk_ = choose_row_kernels(weight_type_of(x.scalar_type()));
    if (rk_.dots_bf16 != nullptr && x.scalar_type() == at::kBFloat16) {
      if (!x.is_contiguous()) kept16_ = x.contiguous();
      x16_ = static_cast<const uint16_t*>(x.is_contiguous() ? x.const_data_ptr()
                                                            : kept16_.const_data_ptr());
    }
  }
}

void Activations::dots(const char* w_row, const char* next, const int32_t* rows, int count,
                       float* res) const {
  const auto* w = reinterpret_cast<const uint8_t*>(w_row);
  if (format_.has_value()) {
    const int8_t* xq[kMaxQDotRows];
    const float* xs[kMaxQDotRows];
    const int32_t* xsum[kMaxQDotRows];
    for (int r0 = 0; r0 < count; r0 += kMaxQDotRows) {
      const int nr = std::min(kMaxQDotRows, count - r0);
      for (int r = 0; r < nr; ++r) {
        xq[r] = xq_.q_of(rows[r0 + r]);
        xs[r] = xq_.scale_of(rows[r0 + r]);
        xsum[r] = xq_.sum_of(rows[r0 + r]);
      }
      const auto* nx = r0 + nr >= count ? reinterpret_cast<const uint8_t*>(next) : nullptr;
      if (format_->interleaved) {
        qk_.dots_i8(w, nx, xq, xs, xsum, nr, xq_.nblk, res + r0);
      } else {
        qk_.dots(w, nx, xq, xs, nr, xq_.nblk, res + r0);
      }
    }
    return;
  }
  if (x16_ != nullptr) {
    const uint16_t* xs[kMaxBf16DotRows];
    for (int r0 = 0; r0 < count; r0 += kMaxBf16DotRows) {
      const int nr = std::min(kMaxBf16DotRows, count - r0);
      for (int r = 0; r < nr; ++r) xs[r] = x16_ + rows[r0 + r] * d_;
      rk_.dots_bf16(w_row, r0 + nr >= count ? next : nullptr, xs, nr, d_, res + r0);
    }
    return;
  }
  const float* xp = x32_;
  const float* xs[kMaxDotRows];
  for (int r0 = 0; r0 < count; r0 += kMaxDotRows) {
    const int nr = std::min(kMaxDotRows, count - r0);
    for (int r = 0; r < nr; ++r) xs[r] = xp + rows[r0 + r] * d_;
    const bool last = r0 + nr >= count;
    rk_.dots(w_row, last ? next : nullptr, xs, nr, d_, res + r0);
  }
}

void Activations::gather(const char* const* ws, const char* const* nexts, int nw,
                         float* res) const {
  if (format_.has_value() && format_->interleaved) {
    qk_.gather_i8(reinterpret_cast<const uint8_t* const*>(ws),
                  reinterpret_cast<const uint8_t* const*>(nexts), nw, xq_.q_of(0), xq_.scale_of(0),
                  xq_.sum_of(0), xq_.nblk, res);
    return;
  }
  if (x16_ != nullptr && rk_.gather_bf16 != nullptr) {
    static_assert(kMaxGatherRows <= kMaxBf16DotRows, "a gather is one gather_bf16 call");
    rk_.gather_bf16(reinterpret_cast<const void* const*>(ws),
                    reinterpret_cast<const void* const*>(nexts), nw, x16_, d_, res);
    return;
  }
  const int32_t row0 = 0;
  for (int i = 0; i < nw; ++i) dots(ws[i], nexts[i], &row0, 1, res + i);
}

void Activations::gemv(const WeightMatrix& w, int64_t begin, int64_t end, float* out) const {
  const int64_t n = end - begin, B = rows_;
  if (format_.has_value() && format_->interleaved) {
    const int8_t* xq[kMaxQDotRows];
    const float* xs[kMaxQDotRows];
    const int32_t* xsum[kMaxQDotRows];
    for (int64_t r0 = 0; r0 < B; r0 += kMaxQDotRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kMaxQDotRows, B - r0));
      for (int r = 0; r < nr; ++r) {
        xq[r] = xq_.q_of(r0 + r);
        xs[r] = xq_.scale_of(r0 + r);
        xsum[r] = xq_.sum_of(r0 + r);
      }
      qk_.gemv_i8(reinterpret_cast<const uint8_t*>(w.row(begin)), w.row_bytes, n, xq, xs, xsum, nr,
                  xq_.nblk, out + r0 * n, n);
    }
    return;
  }
  // Up to 4 rows of x in bf16: one kernel call for the whole range (more rows take the per-row
  // loop below, which reads each weight row once for all of them).
  if (x16_ != nullptr && rk_.gemv_bf16 != nullptr && B <= kMaxBf16DotRows) {
    const uint16_t* xs[kMaxBf16DotRows];
    for (int64_t r = 0; r < B; ++r) xs[r] = x16_ + r * d_;
    rk_.gemv_bf16(w.row(begin), w.row_bytes, n, xs, static_cast<int>(B), d_, out, n);
    return;
  }
  std::vector<int32_t> all(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) all[b] = static_cast<int32_t>(b);
  std::vector<float> res(static_cast<size_t>(B));
  for (int64_t i = begin; i < end; ++i) {
    dots(w.row(i), i + 1 < end ? w.row(i + 1) : nullptr, all.data(), static_cast<int>(B),
         res.data());
    for (int64_t b = 0; b < B; ++b) out[b * n + i - begin] = res[b];
  }
}

void Activations::axpys(const char* const* ws, int nw, const char* const* nexts,
                        const float* const* coefs, const int32_t* rows, int nrows, float* buf,
                        int64_t ldb, int64_t len) const {
  if (format_.has_value()) {
    qk_.axpys(reinterpret_cast<const uint8_t* const*>(ws), nw,
              reinterpret_cast<const uint8_t* const*>(nexts), coefs, rows, nrows, buf, ldb,
              len / kQK);
  } else {
    rk_.axpys(reinterpret_cast<const void* const*>(ws), nw,
              reinterpret_cast<const void* const*>(nexts), coefs, rows, nrows, buf, ldb, len);
  }
}

}  // namespace cpu
}  // namespace sparseinfer
