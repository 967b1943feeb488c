// Predictor scores -> active neurons on the CPU: a per-row mask (threshold or top-k) and the
// ascending union over the batch, the index list the sparse FFN runs over.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <tuple>
#include <vector>

namespace sparseinfer {
namespace {

template <typename scalar_t>
void row_masks(const scalar_t* s, bool* mask, int64_t B, int64_t m, float threshold, int64_t k) {
  at::parallel_for(0, B, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> order;
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = s + b * m;
      bool* mrow = mask + b * m;
      if (k <= 0) {
        for (int64_t i = 0; i < m; ++i) mrow[i] = static_cast<float>(row[i]) > threshold;
        continue;
      }
      std::fill(mrow, mrow + m, false);
      order.resize(static_cast<size_t>(m));
      std::iota(order.begin(), order.end(), 0);
      // Larger score first; ties go to the lower index; NaN counts as the largest (torch.topk's
      // rule).
      auto before = [row](int32_t i, int32_t j) {
        const float a = static_cast<float>(row[i]), b = static_cast<float>(row[j]);
        const bool na = a != a, nb = b != b;
        if (na || nb) return na && (!nb || i < j);
        return a > b || (a == b && i < j);
      };
      std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), before);
      for (int64_t i = 0; i < k; ++i) mrow[order[i]] = true;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> select_active_cpu(const at::Tensor& scores, double threshold,
                                                     int64_t top_k) {
  TORCH_CHECK(scores.device().is_cpu(), "select_active: scores must be on the CPU");
  TORCH_CHECK(scores.dim() == 2, "select_active: scores must have shape (B, m), got ",
              scores.sizes());
  const auto type = scores.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf,
              "select_active: scores must be float32, bfloat16 or float16, got ", type);
  TORCH_CHECK(top_k >= 0, "select_active: top_k must be >= 0, got ", top_k);
  const at::Tensor sc = scores.contiguous();
  const int64_t B = sc.size(0), m = sc.size(1);
  const int64_t k = std::min(top_k, m);
  at::Tensor mask = at::empty({B, m}, sc.options().dtype(at::kBool));  // (B, m)
  bool* mp = mask.mutable_data_ptr<bool>();
  const float thr = static_cast<float>(threshold);
  if (top_k > 0 && k == 0) {
    mask.zero_();
  } else if (type == at::kFloat) {
    row_masks(sc.const_data_ptr<float>(), mp, B, m, thr, top_k > 0 ? k : 0);
  } else if (type == at::kBFloat16) {
    row_masks(sc.const_data_ptr<c10::BFloat16>(), mp, B, m, thr, top_k > 0 ? k : 0);
  } else {
    row_masks(sc.const_data_ptr<c10::Half>(), mp, B, m, thr, top_k > 0 ? k : 0);
  }
  // Union, ascending by construction.
  std::vector<int32_t> ids;
  ids.reserve(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t b = 0; b < B; ++b) {
      if (mp[b * m + i]) {
        ids.push_back(static_cast<int32_t>(i));
        break;
      }
    }
  }
  at::Tensor uni = at::empty({static_cast<int64_t>(ids.size())}, sc.options().dtype(at::kInt));
  std::copy(ids.begin(), ids.end(), uni.mutable_data_ptr<int32_t>());
  return {mask, uni};
}

}  // namespace
}  // namespace sparseinfer

TORCH_LIBRARY_IMPL(sparseinfer, CPU, m) {
  m.impl("select_active", &sparseinfer::select_active_cpu);
}
