// RMSNorm in one pass per row, in transformers' order of operations: normalise in float32,
// round to the activations' dtype, then scale by the weight (rounding again). In PyTorch ops
// that is four to six kernels per call; a decode step calls it twice per layer on one row,
// where each kernel's fixed cost is most of the time.
//
// The decode step's variant first adds a layer's output into the residual stream (x += y,
// rounded, as the PyTorch add rounds), in the same pass.
//
// Layouts (contiguous): x, y, out [rows, cols]; weight [cols]; dtype float32 or bfloat16.

#include <ATen/Parallel.h>

#include "scalar.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

using talkloop::as_stored;
using talkloop::from_float;
using talkloop::to_float;

// out = RMSNorm(x) * weight; with `add`, x += add first (x is then written).
template <typename T>
void rms_norm(T* x, const T* add, const T* weight, int64_t rows, int64_t cols, float eps,
              T* out) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = x + r * cols;
      if (add != nullptr) {
        const T* y = add + r * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) from_float(to_float(row[c]) + to_float(y[c]), row + c);
      }
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t c = 0; c < cols; ++c) squares += to_float(row[c]) * to_float(row[c]);
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(cols) + eps);
      T* dst = out + r * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c)
        from_float(as_stored(to_float(row[c]) * inv, T{}) * to_float(weight[c]), dst + c);
    }
  });
}

}  // namespace

extern "C" {

void talkloop_rms_norm_f32(const float* x, const float* weight, int64_t rows, int64_t cols,
                           float eps, float* out) {
  rms_norm(const_cast<float*>(x), static_cast<const float*>(nullptr), weight, rows, cols, eps,
           out);
}
void talkloop_rms_norm_bf16(const uint16_t* x, const uint16_t* weight, int64_t rows,
                            int64_t cols, float eps, uint16_t* out) {
  rms_norm(const_cast<uint16_t*>(x), static_cast<const uint16_t*>(nullptr), weight, rows, cols,
           eps, out);
}
// x += y, then out = RMSNorm(x) * weight.
void talkloop_add_rms_norm_f32(float* x, const float* y, const float* weight, int64_t rows,
                               int64_t cols, float eps, float* out) {
  rms_norm(x, y, weight, rows, cols, eps, out);
}
void talkloop_add_rms_norm_bf16(uint16_t* x, const uint16_t* y, const uint16_t* weight,
                                int64_t rows, int64_t cols, float eps, uint16_t* out) {
  rms_norm(x, y, weight, rows, cols, eps, out);
}

}  // extern "C"
