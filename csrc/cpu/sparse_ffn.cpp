// The sparse FFN on the CPU: down_proj(σ(x W_in[a]ᵀ) ⊙ (x W_up[a]ᵀ) ⊙ mask) over only the neurons a
// in `active`, reading one contiguous row of W_in, W_up and W_outᵀ per active neuron: decode is
// weight-bandwidth bound, so the bytes read (not the flops) set the speed.
//
// Two phases, each parallel and free of shared writes, so that the result is bit-identical for any
// thread count:
//   1. h (n, B): each active neuron's W_in / W_up rows are read once for all batch rows (the rows
//      stay in L1 between batch rows); at batch 1 four neurons' rows at a time, so that a core
//      keeps several rows' misses in flight (gather_h). Rows whose gate is exactly zero (ReLU
//      family) or that the row mask switches off skip the up projection; if none is left the
//      neuron's W_up row is not read.
//   2. y (B, d): the output columns are split into blocks (two per thread, handed out from a shared
//      counter, see parallel_chunks); each block accumulates
//      h[j, b] * W_outᵀ[a_j, block] over j in ascending order in an fp32 buffer. Neurons whose h is
//      0 for every batch row are skipped, so their W_outᵀ row is never read.
// Weights are in x's dtype (the row kernels of row_kernels_{scalar,avx2,avx512}.cpp) or
// block-quantized, ggml Q8_0 / Q4_0 (quant_{scalar,avx2,avx512}.cpp, x quantized to Q8_0 for the
// dot products); the kernels are chosen per call from the CPU's features, or forced with
// SPARSEINFER_CPU_ISA (how tests cover every path). See weights.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string_view>
#include <vector>

#include "../activation.h"
#include "dtype.h"
#include "weights.h"

namespace sparseinfer {
namespace {

// σ applied to the gate (or, non-gated, the whole) projection.
inline float activate(Activation act, float z, float threshold) {
  switch (act) {
    case Activation::kRelu:
    case Activation::kDRelu:
      return z > 0.f ? z : 0.f;
    case Activation::kRelu2:
      return z > 0.f ? z * z : 0.f;
    case Activation::kSilu:
      return z / (1.f + std::exp(-z));
    case Activation::kFatRelu:
      return z > threshold ? z : 0.f;
  }
  return 0.f;
}

// h of a gated neuron from its activated gate and its up projection (dReLU activates up too).
inline float gated_h(Activation act, float gate, float up) {
  return gate * (act == Activation::kDRelu ? (up > 0.f ? up : 0.f) : up);
}

// fp32 (len,) -> the caller's dtype.
void store_row(const float* src, int64_t len, at::ScalarType type, void* dst) {
  if (type == at::kFloat) {
    cpu::Dtype<float>::store(src, len, static_cast<float*>(dst));
  } else if (type == at::kBFloat16) {
    cpu::Dtype<c10::BFloat16>::store(src, len, static_cast<c10::BFloat16*>(dst));
  } else {
    cpu::Dtype<c10::Half>::store(src, len, static_cast<c10::Half*>(dst));
  }
}

// Phase 1 for one row (decode at batch 1): h[j] for the n neurons idx[j] (mask: (m,) or nullptr).
// The neurons go in groups of kMaxGatherRows: a group's gate rows are computed together (one
// gather call), then the up rows of those whose gate is nonzero, so that a core has several rows'
// misses in flight where one row after another left it waiting on memory. While a group's gate
// rows stream its up rows are prefetched (unless most gates so far were zero), and while the up
// rows stream the next group's gate rows.
void gather_h(const cpu::Activations& xa, const cpu::WeightMatrix& w_in,
              const std::optional<cpu::WeightMatrix>& w_up, const int32_t* idx, int64_t n,
              const bool* mask, Activation act, float thr, float* h) {
  constexpr int kG = cpu::kMaxGatherRows;
  cpu::parallel_chunks(n, /*chunk=*/32, [&](int64_t begin, int64_t end) {
    int64_t j = begin;
    // The next (up to) kG neurons the row uses, into js; the ones the mask switches off keep h 0.
    auto take = [&](int64_t* js) {
      int c = 0;
      for (; c < kG && j < end; ++j) {
        h[j] = 0.f;
        if (mask == nullptr || mask[idx[j]]) js[c++] = j;
      }
      return c;
    };
    int64_t cur[kG], nxt[kG], kept_j[kG];
    const char* ws[kG];
    const char* nexts[kG];
    float z[kG], up[kG];
    int nc = take(cur);
    for (int i = 0; i < nc; ++i) cpu::prefetch_row(w_in.row(idx[cur[i]]), w_in.row_bytes);
    int seen = 0, passed = 0;  // gates computed so far in this chunk, and those that were nonzero
    while (nc > 0) {
      const int nn = take(nxt);
      // The up rows are fetched ahead with the gates while most gates pass (a predicted set). Where
      // most are exactly zero (a ReLU-family layer over all its rows) that would read nearly every
      // up row for nothing, so the next gate rows are fetched instead.
      const bool ahead_up = w_up.has_value() && (seen < 2 * kG || 2 * passed >= seen);
      for (int i = 0; i < nc; ++i) {
        ws[i] = w_in.row(idx[cur[i]]);
        nexts[i] = ahead_up ? w_up->row(idx[cur[i]]) : (i < nn ? w_in.row(idx[nxt[i]]) : nullptr);
      }
      xa.gather(ws, nexts, nc, z);
      int kept = 0;
      for (int i = 0; i < nc; ++i) {
        const float g = activate(act, z[i], thr);
        if (!w_up.has_value()) {
          h[cur[i]] = g;
        } else if (g != 0.f) {  // an exact zero gate makes h zero whatever up is
          z[kept] = g;
          kept_j[kept++] = cur[i];
        }
      }
      seen += nc;
      passed += kept;
      int fetched = ahead_up ? 0 : std::min(nc, nn);  // next gate rows requested so far
      if (kept > 0) {
        for (int i = 0; i < kept; ++i) {
          ws[i] = w_up->row(idx[kept_j[i]]);
          nexts[i] = i < nn ? w_in.row(idx[nxt[i]]) : nullptr;
        }
        fetched = std::min(kept, nn);
        xa.gather(ws, nexts, kept, up);
        for (int i = 0; i < kept; ++i) h[kept_j[i]] = gated_h(act, z[i], up[i]);
      }
      for (int i = fetched; i < nn; ++i) cpu::prefetch_row(w_in.row(idx[nxt[i]]), w_in.row_bytes);
      std::copy(nxt, nxt + nn, cur);
      nc = nn;
    }
  });
}

// Phase 1 for B > 1 rows: h[j * B + b], one neuron at a time, its W_in / W_up rows read once for
// all the rows it serves (the rows stay in L1 between batch rows).
void batch_h(const cpu::Activations& xa, const cpu::WeightMatrix& w_in,
             const std::optional<cpu::WeightMatrix>& w_up, const int32_t* idx, int64_t n, int64_t B,
             const bool* mask, int64_t m, Activation act, float thr, float* h) {
  constexpr int64_t kLookahead = 2;
  cpu::parallel_chunks(n, /*chunk=*/16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < std::min(end, begin + kLookahead); ++j) {
      cpu::prefetch_row(w_in.row(idx[j]), w_in.row_bytes);
      if (w_up.has_value()) cpu::prefetch_row(w_up->row(idx[j]), w_up->row_bytes);
    }
    std::vector<int32_t> rows(B);
    std::vector<float> z(B), up(B);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t a = idx[j];
      float* hj = h + j * B;
      int nrows = 0;  // the batch rows this neuron serves
      for (int64_t b = 0; b < B; ++b) {
        hj[b] = 0.f;
        if (mask == nullptr || mask[b * m + a]) rows[nrows++] = static_cast<int32_t>(b);
      }
      // Scattered rows: the rows of the neuron kLookahead places on are requested now, so that they
      // are on their way while this one computes (one row ahead was not enough to hide the
      // latency).
      if (j + kLookahead < end) {
        const int64_t ahead = idx[j + kLookahead];
        cpu::prefetch_row(w_in.row(ahead), w_in.row_bytes);
        if (w_up.has_value()) cpu::prefetch_row(w_up->row(ahead), w_up->row_bytes);
      }
      xa.dots(w_in.row(a), nullptr, rows.data(), nrows, z.data());
      int kept = 0;
      for (int r = 0; r < nrows; ++r) {
        const float g = activate(act, z[r], thr);
        if (!w_up.has_value()) {
          hj[rows[r]] = g;
        } else if (g != 0.f) {  // an exact zero gate makes h zero whatever up is
          z[kept] = g;
          rows[kept++] = rows[r];
        }
      }
      if (!w_up.has_value() || kept == 0) continue;
      xa.dots(w_up->row(a), nullptr, rows.data(), kept, up.data());
      for (int r = 0; r < kept; ++r) hj[rows[r]] = gated_h(act, z[r], up[r]);
    }
  });
}

at::Tensor sparse_ffn_cpu(const at::Tensor& x, const at::Tensor& w_in_t,
                          const std::optional<at::Tensor>& w_up_t, const at::Tensor& w_out_tt,
                          const at::Tensor& active, const std::optional<at::Tensor>& row_mask,
                          c10::string_view activation, double threshold,
                          c10::string_view weight_format) {
  constexpr const char* kOp = "sparse_ffn";
  TORCH_CHECK(x.device().is_cpu(), "sparse_ffn: x must be on the CPU");
  TORCH_CHECK(x.dim() == 2, "sparse_ffn: x must have shape (B, d), got ", x.sizes());
  cpu::weight_type_of(x.scalar_type());
  const auto format =
      cpu::parse_weight_format(std::string_view(weight_format.data(), weight_format.size()), kOp);
  const int64_t B = x.size(0), d = x.size(1), m = w_in_t.dim() == 2 ? w_in_t.size(0) : -1;
  const cpu::WeightMatrix w_in =
      cpu::weight_matrix(w_in_t, format, m, d, x.scalar_type(), kOp, "w_in");
  const std::optional<cpu::WeightMatrix> w_up =
      w_up_t.has_value() ? std::optional<cpu::WeightMatrix>(cpu::weight_matrix(
                               *w_up_t, format, m, d, x.scalar_type(), kOp, "w_up"))
                         : std::nullopt;
  // W_outᵀ rows are summed block by block (an axpy), so they stay plain whatever w_in's layout.
  const auto out_format =
      format.has_value() ? std::optional<cpu::WeightFormat>(format->plain()) : std::nullopt;
  const cpu::WeightMatrix w_out =
      cpu::weight_matrix(w_out_tt, out_format, m, d, x.scalar_type(), kOp, "w_out_t");
  TORCH_CHECK(active.device().is_cpu(), "sparse_ffn: active must be on the CPU");
  TORCH_CHECK(active.dim() == 1 && active.scalar_type() == at::kInt,
              "sparse_ffn: active must be a 1-D int32 tensor, got ", active.scalar_type(), " ",
              active.sizes());
  if (row_mask.has_value()) {
    TORCH_CHECK(row_mask->device().is_cpu(), "sparse_ffn: row_mask must be on the CPU");
    TORCH_CHECK(row_mask->scalar_type() == at::kBool && row_mask->dim() == 2 &&
                    row_mask->size(0) == B && row_mask->size(1) == m,
                "sparse_ffn: row_mask must be bool of shape (B, m) = (", B, ", ", m, "), got ",
                row_mask->scalar_type(), " ", row_mask->sizes());
  }
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  const float thr = static_cast<float>(threshold);
  const at::Tensor act_c = active.contiguous();
  const int32_t* idx = act_c.const_data_ptr<int32_t>();
  const int64_t n = act_c.numel();
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK(idx[j] >= 0 && idx[j] < m, "sparse_ffn: active[", j, "] = ", idx[j],
                " is out of range [0, ", m, ")");
  }
  at::Tensor out = at::empty({B, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || d == 0) return out;
  if (n == 0) return out.zero_();
  const cpu::Activations xa(x, format);
  const at::Tensor mask_c = row_mask.has_value() ? row_mask->contiguous() : at::Tensor();
  const bool* mask = row_mask.has_value() ? mask_c.const_data_ptr<bool>() : nullptr;
  std::vector<float> h(static_cast<size_t>(n * B));  // (n, B): one neuron's batch values together

  // Phase 1: h.
  if (B == 1) {
    gather_h(xa, w_in, w_up, idx, n, mask, act, thr, h.data());
  } else {
    batch_h(xa, w_in, w_up, idx, n, B, mask, m, act, thr, h.data());
  }

  // Phase 2: y. Blocks are multiples of 64 columns, so every column has the same position in its
  // block's vector loop whatever the thread count (and quantized blocks of 32 are never split).
  // Two blocks per thread (for the dynamic hand-out above), but at least 512 columns each: every
  // block reads a segment of each active W_out^T row, and short segments stream poorly.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t blk = std::max<int64_t>(512, (d + 2 * threads - 1) / (2 * threads) + 63) / 64 * 64;
  const int64_t nblk = (d + blk - 1) / blk;
  const at::ScalarType out_type = out.scalar_type();
  const int64_t esize = static_cast<int64_t>(out.element_size());
  char* out_p = static_cast<char*>(out.mutable_data_ptr());
  // Neurons with h != 0 in some row: the others' W_outᵀ rows are never read.
  std::vector<int64_t> live;
  live.reserve(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    const float* hj = h.data() + j * B;
    if (std::any_of(hj, hj + B, [](float v) { return v != 0.f; })) live.push_back(j);
  }
  const int64_t n_live = static_cast<int64_t>(live.size());
  constexpr int kGroup = cpu::kMaxAxpyWeights;
  cpu::parallel_chunks(nblk, /*chunk=*/1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> rows(B);
    const char* ws[kGroup];
    const char* nexts[kGroup];
    const float* coefs[kGroup];
    for (int64_t blk_i = begin; blk_i < end; ++blk_i) {
      const int64_t c0 = blk_i * blk;
      const int64_t len = std::min(blk, d - c0);
      std::vector<float> acc(static_cast<size_t>(B * len), 0.f);  // (B, len)
      auto row_of = [&](int64_t l) { return w_out.segment(w_out.row(idx[live[l]]), c0); };
      for (int64_t g0 = 0; g0 < n_live; g0 += kGroup) {
        const int nw = static_cast<int>(std::min<int64_t>(kGroup, n_live - g0));
        for (int i = 0; i < nw; ++i) {
          ws[i] = row_of(g0 + i);
          coefs[i] = h.data() + live[g0 + i] * B;
          nexts[i] = g0 + 2 * kGroup + i < n_live ? row_of(g0 + 2 * kGroup + i) : nullptr;
        }
        int nz = 0;  // batch rows with a nonzero coefficient in this group
        for (int64_t b = 0; b < B; ++b) {
          bool any = false;
          for (int i = 0; i < nw; ++i) any = any || coefs[i][b] != 0.f;
          if (any) rows[nz++] = static_cast<int32_t>(b);
        }
        xa.axpys(ws, nw, nexts, coefs, rows.data(), nz, acc.data(), len, len);
      }
      for (int64_t b = 0; b < B; ++b) {
        store_row(acc.data() + b * len, len, out_type, out_p + (b * d + c0) * esize);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace sparseinfer

TORCH_LIBRARY_IMPL(sparseinfer, CPU, m) { m.impl("sparse_ffn", &sparseinfer::sparse_ffn_cpu); }
