// Block-quantized weights with ggml's Q8_0 and Q4_0 layouts, byte for byte (so a GGUF file's
// tensors and ours compare weight for weight), and the inner loops over them, one implementation
// per instruction set (quant_kernels_*.cpp) behind plain function pointers. ATen-free for the same
// reason as row_kernels.h.
//
// A row of d weights (d a multiple of 32) is d / 32 blocks of 32 consecutive weights:
//   Q8_0 (34 bytes): fp16 d, then int8 q[32];                      w[i] = d * q[i]
//   Q4_0 (18 bytes): fp16 d, then 16 bytes qs;  w[i] = d * ((qs[i] & 15) - 8),
//                                               w[i + 16] = d * ((qs[i] >> 4) - 8)   (i < 16)
// Quantization follows ggml's reference rules (quantize_row_q8_0_ref / quantize_row_q4_0_ref).
//
// Interleaved rows (the "_i8" layouts, for dot products): the same blocks with each run of 8 blocks
// of a row stored as their 8 fp16 scales, then 32-byte chunks: chunk c holds bytes [4c, 4c + 4) of
// each of the 8 blocks' quants, block j at offset 4j (Q8_0: 8 chunks, Q4_0: 4). The blocks after
// the last full run of 8 stay as they are. Same bytes per row, and still one row per neuron (a
// sparse gather reads whole rows), but one 32-byte load now feeds the same 4 positions of 8 blocks,
// so a dot product sums 8 blocks in the 8 lanes of one register and converts scales 8 at a time:
// several times fewer instructions per block than the plain layout, which is what lets a 2-core CPU
// read Q4_0 rows at memory bandwidth (ggml repacks its weights for the same reason).
//
// Dot products take the activations quantized to Q8_0 too, as ggml does (the int8 x int8 products
// are exact; the float work is one multiply-add per block): `QuantizedRows` holds them with float
// scales, in the plain or the interleaved layout of the weights they meet. An axpy dequantizes a
// (plain) weight block and adds coef * w into an fp32 buffer.
#pragma once

#include <cstdint>
#include <vector>

namespace sparseinfer {
namespace cpu {

enum class QuantFormat : int { kQ8_0 = 0, kQ4_0 = 1 };

constexpr int kQK = 32;  // weights per block
constexpr int64_t block_bytes(QuantFormat f) { return f == QuantFormat::kQ8_0 ? 34 : 18; }

float fp16_to_float(uint16_t h);
uint16_t float_to_fp16(float f);  // round to nearest even, as numpy and F16C do

constexpr int kGroup = 8;  // blocks per interleaved run

// One row of d floats -> d / 32 blocks (ggml's reference quantizers), and back.
void quantize_row(QuantFormat f, const float* x, int64_t d, uint8_t* out);
void dequantize_row(QuantFormat f, const uint8_t* q, int64_t d, float* out);
// A row of nblk plain blocks <-> its interleaved layout (see above).
void interleave_row(QuantFormat f, const uint8_t* plain, int64_t nblk, uint8_t* out);
void deinterleave_row(QuantFormat f, const uint8_t* in, int64_t nblk, uint8_t* plain);

// One row of activations (nblk blocks) quantized to Q8_0 as ggml's quantize_row_q8_0 does at run
// time: q = round(x / (amax / 127)), ties to even; the int8 values plain or interleaved (as a Q8_0
// weight run's quants: value i of block j of run g at 256 g + 32 (i / 4) + 4 j + i % 4), and per
// block the scale (rounded through fp16, as stored) and the sum of the values.
using QuantizeRowFn = void (*)(const float* x, int64_t nblk, bool interleaved, int8_t* q,
                               float* scale, int32_t* sum);
void quantize_activations_scalar(const float* x, int64_t nblk, bool interleaved, int8_t* q,
                                 float* scale, int32_t* sum);

// Activations of B rows quantized to Q8_0 (see QuantizeRowFn), in block order.
struct QuantizedRows {
  int64_t rows = 0, nblk = 0;
  std::vector<int8_t> q;     // (rows, nblk * 32)
  std::vector<float> scale;  // (rows, nblk)
  std::vector<int32_t> sum;  // (rows, nblk)
  void quantize(const float* x, int64_t rows, int64_t d, bool interleaved,
                QuantizeRowFn fn);  // d % 32 == 0
  const int8_t* q_of(int64_t r) const { return q.data() + r * nblk * kQK; }
  const float* scale_of(int64_t r) const { return scale.data() + r * nblk; }
  const int32_t* sum_of(int64_t r) const { return sum.data() + r * nblk; }
};

constexpr int kMaxQDotRows = 4;
constexpr int kMaxGatherRows = 4;  // weight rows one gather_i8 call computes together

struct QuantKernels {
  // out[r] = sum over the nblk blocks of (d_w * xs[r]) * (w block . xq[r] block), r < nrows
  // (nrows <= kMaxQDotRows). The weight row is decoded once for all rows; blocks are summed in an
  // order that depends only on nblk, so a row's result never depends on its batch mates. `next`:
  // the weight row read after this one (or nullptr), prefetched meanwhile.
  void (*dots)(const uint8_t* w, const uint8_t* next, const int8_t* const* xq,
               const float* const* xs, int nrows, int64_t nblk, float* out);
  // The same over an interleaved weight row and interleaved activations; xsum[r]: the rows'
  // per-block sums of their values (Q4_0 stores q + 8: its dot is sum(nibble * x) - 8 * sum(x)).
  void (*dots_i8)(const uint8_t* w, const uint8_t* next, const int8_t* const* xq,
                  const float* const* xs, const int32_t* const* xsum, int nrows, int64_t nblk,
                  float* out);
  // buf[rows[k] * ldb + c] += sum_i coefs[i][rows[k]] * w_i[c] for the nblk blocks of each weight
  // pointer ws[i] (c < nblk * 32), k < nrows, i < nw (nw <= 4): each term a fused multiply-add in
  // ascending i. `nexts`: rows read after these (prefetched), or nullptr.
  void (*axpys)(const uint8_t* const* ws, int nw, const uint8_t* const* nexts,
                const float* const* coefs, const int32_t* rows, int nrows, float* buf, int64_t ldb,
                int64_t nblk);
  QuantizeRowFn quantize_x;  // the activations these kernels take
  // dots_i8 over nw consecutive weight rows (row_bytes apart), out[r * ldo + i] for row i and x row
  // r: a dense GEMV/GEMM in one call, so short rows (a predictor's) do not pay a dispatch each.
  void (*gemv_i8)(const uint8_t* w, int64_t row_bytes, int64_t nw, const int8_t* const* xq,
                  const float* const* xs, const int32_t* const* xsum, int nrows, int64_t nblk,
                  float* out, int64_t ldo);
  // dots_i8 of one x row (xq, xs, xsum: its blocks) with nw <= kMaxGatherRows scattered weight
  // rows ws[i] -> out[i], computed together run by run, so that a core has several rows' misses in
  // flight (a sparse gather at batch 1 that reads one row after another is latency-bound).
  // nexts[i]: a row read after these (prefetched), or nullptr. Bit-identical to dots_i8 over each
  // row alone.
  void (*gather_i8)(const uint8_t* const* ws, const uint8_t* const* nexts, int nw, const int8_t* xq,
                    const float* xs, const int32_t* xsum, int64_t nblk, float* out);
};

QuantKernels scalar_quant_kernels(QuantFormat f);
QuantKernels avx2_quant_kernels(QuantFormat f);
QuantKernels avx512_quant_kernels(QuantFormat f);  // AVX-512 VNNI int8 dot products (vpdpbusd)

}  // namespace cpu
}  // namespace sparseinfer
