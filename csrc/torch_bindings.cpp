// Every op schema of the extension, and nothing else. Kernels register per device under the same
// name (cpu/*.cpp, cuda/*.cu); the dispatcher picks one from the tensors' device.
#include <torch/library.h>

TORCH_LIBRARY(sparseinfer, m) {
  // y = weight * (x / sqrt(mean(x^2, -1) + eps)), over the last dim; fp32 accumulation. Rounds the
  // normalised x to x's dtype before the weight multiply, in Hugging Face LlamaRMSNorm's order
  // (the fp32 sum of squares may differ from torch's by an ulp: another summation order).
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rms_norm_out(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");

  // Predictor scores (B, m) -> (row_mask bool (B, m), union int32 (n,) ascending unique: the
  // neurons active in at least one row). top_k > 0: each row keeps its top_k largest scores (ties
  // to the lower index); otherwise a neuron is active in a row when its score > threshold.
  m.def("select_active(Tensor scores, float threshold, int top_k) -> (Tensor, Tensor)");
  // down_proj(h * mask) over only the neurons in `active` (int32 (n,), indices into the weights'
  // rows): x (B, d); w_in (m, d) the projection the activation applies to; w_up (m, d) or None
  // (non-gated); w_out_t (m, d) = down_proj.weight.T, contiguous; row_mask None or bool (B, m)
  // zeroing h[b, i] where false; activation relu | relu2 | silu | fatrelu (z if z > threshold) |
  // drelu (relu on gate and up). fp32 accumulation; returns (B, d) in x's dtype.
  m.def(
      "sparse_ffn(Tensor x, Tensor w_in, Tensor? w_up, Tensor w_out_t, Tensor active, "
      "Tensor? row_mask, str activation, float threshold) -> Tensor");
  m.def(
      "sparse_ffn_out(Tensor x, Tensor w_in, Tensor? w_up, Tensor w_out_t, Tensor active, "
      "Tensor? row_mask, str activation, float threshold, Tensor(a!) out) -> ()");
  // y = x weightᵀ + bias: x (B, d), weight (k, d) contiguous, bias (k,) or None; fp32 accumulation,
  // (B, k) in x's dtype. For the predictors' small projections (torch's CPU bf16 GEMV is slow).
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}
