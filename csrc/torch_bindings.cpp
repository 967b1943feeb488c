// Every op schema of the extension, and nothing else. Kernels register per device under the same
// name (cpu/*.cpp, cuda/*.cu); the dispatcher picks one from the tensors' device.
#include <torch/library.h>

TORCH_LIBRARY(sparseinfer, m) {
  // y = weight * (x / sqrt(mean(x^2, -1) + eps)), over the last dim; fp32 accumulation. Rounds the
  // normalised x to x's dtype before the weight multiply, in Hugging Face LlamaRMSNorm's order
  // (the fp32 sum of squares may differ from torch's by an ulp: another summation order).
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");

  // Predictor scores (B, m) -> (row_mask bool (B, m), union int32 (n,) ascending unique: the
  // neurons active in at least one row). top_k > 0: each row keeps its top_k largest scores (ties
  // to the lower index); otherwise a neuron is active in a row when its score > threshold.
  m.def("select_active(Tensor scores, float threshold, int top_k) -> (Tensor, Tensor)");
  // down_proj(h * mask) over only the neurons in `active` (int32 (n,), indices into the weights'
  // rows): x (B, d); w_in (m, d) the projection the activation applies to; w_up (m, d) or None
  // (non-gated); w_out_t (m, d) = down_proj.weight.T, contiguous; row_mask None or bool (B, m)
  // zeroing h[b, i] where false; activation relu | relu2 | silu | fatrelu (z if z > threshold) |
  // drelu (relu on gate and up). weight_format: none (weights in x's dtype) | q8_0 | q4_0 (uint8
  // rows of ggml blocks, see quantize; x is then quantized to Q8_0 for the dot products). fp32
  // accumulation; returns (B, d) in x's dtype.
  m.def(
      "sparse_ffn(Tensor x, Tensor w_in, Tensor? w_up, Tensor w_out_t, Tensor active, "
      "Tensor? row_mask, str activation, float threshold, str weight_format=\"none\") -> Tensor");
  // y = x weightᵀ + bias: x (..., d), weight (k, d) contiguous in x's dtype, or uint8 (k, d / 32 *
  // block bytes) for weight_format q8_0 | q4_0; bias (k,) or None; fp32 accumulation, (..., k) in
  // x's dtype. The dense projections where torch's kernels are slower (or have no such format).
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, str weight_format=\"none\") -> Tensor");
  // w (rows, d), d % 32 == 0, any float dtype -> uint8 (rows, d / 32 * block bytes): ggml's Q8_0
  // (34-byte blocks) or Q4_0 (18-byte blocks) layout and reference rounding. dequantize: back to
  // fp32.
  m.def("quantize(Tensor w, str format) -> Tensor");
  // Reads every byte of buf once on all threads, returning a checksum: timed, the machine's read
  // bandwidth (the yardstick of the benchmarks).
  m.def("read_bytes(Tensor buf) -> int");
  m.def("dequantize(Tensor q, str format) -> Tensor");
  // One decode step's attention, one new token per row b. qkv (B, ..., (H + 2 KVH) hd): each row's
  // query heads, then its keys and values (the stacked q/k/v projection), before the rotary
  // embedding; cos / sin (P, hd) the rope tables; k_cache / v_cache (slots, KVH, max_seq, hd).
  // Rotates q and k at positions[b] (rotate-half, rounded as Hugging Face's apply_rotary_pos_emb in
  // the dtype), writes k and v into the caches at [slots[b], :, positions[b]], and returns
  // softmax(scale q Kᵀ) V over the slot's positions 0..positions[b], (B, ..., H hd); fp32 math,
  // GQA by head groups. slots and positions: int64 (B,), distinct slots.
  m.def(
      "decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) "
      "v_cache, "
      "Tensor slots, Tensor positions, int num_heads, float scale) -> Tensor");
}
