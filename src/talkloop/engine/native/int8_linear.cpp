// The two passes around an int8 x int8 GEMM (W8A8 linears for prefill and batched decode).
//
// torch._int_mm multiplies int8 matrices on oneDNN's VNNI kernels, several times faster than
// a bf16 GEMM on CPUs without AMX, but leaves the quantization of the activations and the
// scaling of the int32 result to the caller; in PyTorch ops those take five passes over the
// data and cost more than the GEMM. Here each is one pass: activations are quantized per row
// (symmetric, scale = max |x| / 127), and the int32 accumulators are scaled by their row's and
// column's scales, with an optional bias, straight into the output dtype.
//
// Outlier channels: a few input channels of some layers carry values tens of times larger
// than the rest (massive activations), and one shared row scale would then leave the other
// channels a handful of int8 levels. The layer names those channels (found once at load on a
// calibration text); they are zeroed in the int8 copy, kept in float32, and their product with
// the matching weight columns is added in the scaling pass (LLM.int8()'s decomposition, with
// a static channel set so that a row's result never depends on the rest of the batch).
//
// Layouts (contiguous): x [rows, cols] float32 or bfloat16; q int8 [rows, cols]; scales
// float32; acc int32 [rows, cols]; bias and out in out's dtype.

#include <ATen/Parallel.h>

#include "scalar.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef TALKLOOP_AVX512
#define TALKLOOP_INT8_AVX512 1
#endif

namespace {

using talkloop::from_float;
using talkloop::to_float;

#ifdef TALKLOOP_INT8_AVX512
using talkloop::load16;  // 16 lanes at a time; a mask (`tail_mask`) covers the row's tail
using talkloop::store16;
using talkloop::tail_mask;

template <typename T>
float row_amax(const T* row, int64_t cols, const uint8_t* keep) {
  __m512 best = _mm512_setzero_ps();
  for (int64_t c = 0; c < cols; c += 16) {
    const __mmask16 m = tail_mask(cols - c);
    __m512 v = _mm512_abs_ps(load16(row + c, m));
    if (keep != nullptr) {
      const __m128i k = _mm_maskz_loadu_epi8(m, keep + c);
      v = _mm512_maskz_mov_ps(_mm_test_epi8_mask(k, k), v);
    }
    best = _mm512_max_ps(best, v);
  }
  return _mm512_reduce_max_ps(best);
}

template <typename T>
void quantize_row(const T* row, int64_t cols, float inv, int8_t* out) {
  const __m512 scale = _mm512_set1_ps(inv), low = _mm512_set1_ps(-127.f);
  const __m512 high = _mm512_set1_ps(127.f);
  for (int64_t c = 0; c < cols; c += 16) {
    const __mmask16 m = tail_mask(cols - c);
    const __m512 v = _mm512_min_ps(high, _mm512_max_ps(low, _mm512_mul_ps(load16(row + c, m), scale)));
    // cvtps rounds to nearest even (the default MXCSR mode), as torch.round does.
    _mm_mask_storeu_epi8(out + c, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
  }
}

// ROWS rows of the scaling pass, 64 columns (4 registers per row) at a time so that the
// outlier terms accumulate in registers, each outlier weight vector loaded once for all ROWS
// rows (the weights of a wide layer's outliers live in L2, whose bandwidth bound the pass at
// one row per load): out = acc * (row_scale * col_scale) + x_out . w_out + bias.
template <int ROWS, typename OutT>
void dequantize_rows(const int32_t* in, int64_t cols, const float* row_scales,
                     const float* col_scales, const OutT* bias, const float* outlier_x,
                     const float* outlier_w, int64_t num_outliers, OutT* dst) {
  for (int64_t c0 = 0; c0 < cols; c0 += 64) {
    __m512 sum[ROWS][4];
    __mmask16 m[4];
    for (int u = 0; u < 4; ++u) {
      const int64_t c = c0 + 16 * u;
      m[u] = tail_mask(cols - c);
      const __m512 col = _mm512_maskz_loadu_ps(m[u], col_scales + c);
      for (int r = 0; r < ROWS; ++r) {
        const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(row_scales[r]), col);
        const __m512i values = _mm512_maskz_loadu_epi32(m[u], in + r * cols + c);
        sum[r][u] = _mm512_mul_ps(_mm512_cvtepi32_ps(values), scale);
      }
    }
    for (int64_t j = 0; j < num_outliers; ++j) {
      const float* w = outlier_w + j * cols + c0;
      __m512 weights[4];
      for (int u = 0; u < 4; ++u) weights[u] = _mm512_maskz_loadu_ps(m[u], w + 16 * u);
      for (int r = 0; r < ROWS; ++r) {
        const __m512 x = _mm512_set1_ps(outlier_x[r * num_outliers + j]);
        for (int u = 0; u < 4; ++u) sum[r][u] = _mm512_fmadd_ps(x, weights[u], sum[r][u]);
      }
    }
    for (int u = 0; u < 4; ++u) {
      const int64_t c = c0 + 16 * u;
      const __m512 b = bias != nullptr ? load16(bias + c, m[u]) : _mm512_setzero_ps();
      for (int r = 0; r < ROWS; ++r) store16(dst + r * cols + c, _mm512_add_ps(sum[r][u], b), m[u]);
    }
  }
}
#endif  // TALKLOOP_INT8_AVX512

// Rows per task: enough elements that a thread's share outweighs the cost of waking it.
inline int64_t grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// Quantizes each row's kept columns (keep[c] != 0, or all when keep is null); the others are
// written as 0 and copied, as float, to outliers [rows, num_outliers] (columns outlier_idx).
template <typename T>
void quantize_rows(const T* x, int64_t rows, int64_t cols, const uint8_t* keep,
                   const int64_t* outlier_idx, int64_t num_outliers, float* outliers, int8_t* q,
                   float* scales) {
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * cols;
      int8_t* out = q + r * cols;
#ifdef TALKLOOP_INT8_AVX512
      const float amax = row_amax(row, cols, keep);
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      quantize_row(row, cols, inv, out);
#else
      float amax = 0.f;
      if (keep == nullptr) {
        for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(to_float(row[c])));
      } else {
        for (int64_t c = 0; c < cols; ++c)
          amax = std::max(amax, keep[c] ? std::fabs(to_float(row[c])) : 0.f);
      }
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t c = 0; c < cols; ++c) {
        // |x * inv| <= 127 (up to rounding): the clamp only guards the last ulp.
        const float v = std::min(127.f, std::max(-127.f, to_float(row[c]) * inv));
        out[c] = static_cast<int8_t>(__builtin_roundevenf(v));
      }
#endif
      scales[r] = amax / 127.f;
      for (int64_t j = 0; j < num_outliers; ++j) {
        outliers[r * num_outliers + j] = to_float(row[outlier_idx[j]]);
        out[outlier_idx[j]] = 0;
      }
    }
  });
}

// out = acc * row_scales[r] * col_scales[c] + outlier_x[r] . outlier_w[:, c] + bias[c]
template <typename OutT>
void dequantize(const int32_t* acc, int64_t rows, int64_t cols, const float* row_scales,
                const float* col_scales, const OutT* bias, const float* outlier_x,
                const float* outlier_w, int64_t num_outliers, OutT* out) {
  constexpr int64_t kTile = 256;  // columns per pass: the partial sums stay in L1
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
#ifdef TALKLOOP_INT8_AVX512
    constexpr int64_t kRows = 4;
    int64_t r = begin;
    for (; r + kRows <= end; r += kRows)
      dequantize_rows<kRows>(acc + r * cols, cols, row_scales + r, col_scales, bias,
                             outlier_x + r * num_outliers, outlier_w, num_outliers,
                             out + r * cols);
    for (; r < end; ++r)
      dequantize_rows<1>(acc + r * cols, cols, row_scales + r, col_scales, bias,
                         outlier_x + r * num_outliers, outlier_w, num_outliers, out + r * cols);
#else
    float buf[kTile];
    for (int64_t r = begin; r < end; ++r) {
      const int32_t* in = acc + r * cols;
      OutT* dst = out + r * cols;
      const float row_scale = row_scales[r];
      for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
        const int64_t n = std::min(kTile, cols - c0);
        for (int64_t c = 0; c < n; ++c)
          buf[c] = static_cast<float>(in[c0 + c]) * row_scale * col_scales[c0 + c];
        for (int64_t j = 0; j < num_outliers; ++j) {
          const float xv = outlier_x[r * num_outliers + j];
          const float* w = outlier_w + j * cols + c0;
          for (int64_t c = 0; c < n; ++c) buf[c] += xv * w[c];
        }
        if (bias != nullptr)
          for (int64_t c = 0; c < n; ++c) buf[c] += to_float(bias[c0 + c]);
        for (int64_t c = 0; c < n; ++c) from_float(buf[c], dst + c0 + c);
      }
    }
#endif
  });
}

}  // namespace

extern "C" {

#define TALKLOOP_QUANTIZE(NAME, T)                                                            \
  void NAME(const T* x, int64_t rows, int64_t cols, const uint8_t* keep,                      \
            const int64_t* outlier_idx, int64_t num_outliers, float* outliers, int8_t* q,     \
            float* scales) {                                                                  \
    quantize_rows(x, rows, cols, keep, outlier_idx, num_outliers, outliers, q, scales);       \
  }
#define TALKLOOP_DEQUANTIZE(NAME, OutT)                                                       \
  void NAME(const int32_t* acc, int64_t rows, int64_t cols, const float* row_scales,          \
            const float* col_scales, const OutT* bias, const float* outlier_x,                \
            const float* outlier_w, int64_t num_outliers, OutT* out) {                        \
    dequantize(acc, rows, cols, row_scales, col_scales, bias, outlier_x, outlier_w,           \
               num_outliers, out);                                                            \
  }

TALKLOOP_QUANTIZE(talkloop_quantize_rows_f32, float)
TALKLOOP_QUANTIZE(talkloop_quantize_rows_bf16, uint16_t)
TALKLOOP_DEQUANTIZE(talkloop_dequantize_f32, float)
TALKLOOP_DEQUANTIZE(talkloop_dequantize_bf16, uint16_t)

}  // extern "C"
