// Predictor scores -> active neurons on the GPU, on the current stream: the row mask (a threshold
// kernel, or torch's top-k scattered into the mask), then a kernel marking the columns active in
// any row, compacted with nonzero (which has to synchronise: the union's length sizes the output).
// Not yet run on hardware (the development machine has no GPU); CI compiles it.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

namespace sparseinfer {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void threshold_kernel(const scalar_t* __restrict__ s, bool* __restrict__ mask,
                                 int64_t count, float threshold) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) mask[i] = static_cast<float>(s[i]) > threshold;
}

__global__ void any_rows_kernel(const bool* __restrict__ mask, bool* __restrict__ any, int64_t B,
                                int64_t m) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= m) return;
  bool on = false;
  for (int64_t b = 0; b < B && !on; ++b) on = mask[b * m + i];
  any[i] = on;
}

unsigned blocks_for(int64_t count) {
  return static_cast<unsigned>((count + kThreads - 1) / kThreads);
}

std::tuple<at::Tensor, at::Tensor> select_active_cuda(const at::Tensor& scores, double threshold,
                                                      int64_t top_k) {
  TORCH_CHECK(scores.is_cuda(), "select_active: scores must be a CUDA tensor");
  TORCH_CHECK(scores.dim() == 2, "select_active: scores must have shape (B, m), got ",
              scores.sizes());
  const auto type = scores.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf,
              "select_active: scores must be float32, bfloat16 or float16, got ", type);
  TORCH_CHECK(top_k >= 0, "select_active: top_k must be >= 0, got ", top_k);
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor sc = scores.contiguous();
  const int64_t B = sc.size(0), m = sc.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor mask;  // (B, m)
  if (top_k > 0) {
    mask = at::zeros({B, m}, sc.options().dtype(at::kBool));
    const int64_t k = std::min(top_k, m);
    if (k > 0 && B > 0) {
      // Ties may resolve differently from the CPU kernel (which keeps the lower index).
      const at::Tensor idx = std::get<1>(at::topk(sc.to(at::kFloat), k, 1, true, false));
      mask.scatter_(1, idx, true);
    }
  } else {
    mask = at::empty({B, m}, sc.options().dtype(at::kBool));
    if (B * m > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, "select_active_cuda", [&] {
        threshold_kernel<scalar_t><<<blocks_for(B * m), kThreads, 0, stream>>>(
            sc.const_data_ptr<scalar_t>(), mask.mutable_data_ptr<bool>(), B * m,
            static_cast<float>(threshold));
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  at::Tensor any = at::zeros({m}, sc.options().dtype(at::kBool));  // (m,)
  if (B > 0 && m > 0) {
    any_rows_kernel<<<blocks_for(m), kThreads, 0, stream>>>(mask.const_data_ptr<bool>(),
                                                            any.mutable_data_ptr<bool>(), B, m);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor uni = at::nonzero(any).flatten().to(at::kInt);  // (n,) ascending
  return {mask, uni};
}

}  // namespace
}  // namespace sparseinfer

TORCH_LIBRARY_IMPL(sparseinfer, CUDA, m) {
  m.impl("select_active", &sparseinfer::select_active_cuda);
}
