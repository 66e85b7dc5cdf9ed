// Decode attention straight from the paged KV cache, on the CPU.
//
// The PyTorch path gathers every sequence's blocks into a padded batch on each layer before
// two batched matmuls; that copy is most of a batched decode step's attention time. This
// kernel reads each sequence's blocks in place: one work item per (kv head, sequence), the
// G query heads of that kv head scored together, softmax in float32, then the value sum.
// Work items are ordered head-major, so sequences that share a persona prefix read the same
// blocks back to back (from cache, not memory). Threads: ATen's pool (at::parallel_for).
//
// Layouts (contiguous): q, out [B, Hkv * G, D]; caches [Hkv, num_blocks, block_size, D];
// block_tables [B, max_blocks] int64; context_lens [B] int64. dtype: float32 or bfloat16.

#include <ATen/Parallel.h>

#include "scalar.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using talkloop::from_float;
using talkloop::to_float;

// e^x for x <= 0 (scores less their maximum), ~2e-7 relative error, and vectorizable:
// x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial, 2^n from bits.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  const float p =
      1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r / 720)))));
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);  // (memcpy here would stop vectorization)
}

constexpr int64_t kMaxHeadDim = 512;

template <typename T, typename OutT>
void decode(OutT* out, float* lse, const T* q, const T* key_cache, const T* value_cache,
            const int64_t* block_tables, const int64_t* context_lens, int64_t batch,
            int64_t num_kv_heads, int64_t group, int64_t head_dim, int64_t num_blocks,
            int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t num_heads = num_kv_heads * group;
  const int64_t head_stride = num_blocks * block_size * head_dim;  // one kv head's pool
  at::parallel_for(0, num_kv_heads * batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * head_dim), acc(group * head_dim), scores;
    std::vector<float> peak(group), total(group);
    float row[kMaxHeadDim];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / batch, b = item % batch;
      const int64_t length = context_lens[b];
      const int64_t* table = block_tables + b * max_blocks;
      const T* keys = key_cache + h * head_stride;
      const T* values = value_cache + h * head_stride;
      for (int64_t g = 0; g < group; ++g) {
        const T* qrow = q + (b * num_heads + h * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) query[g * head_dim + d] = to_float(qrow[d]) * scale;
      }
      scores.resize(group * length);
      std::fill(peak.begin(), peak.end(), -INFINITY);
      const int64_t used_blocks = (length + block_size - 1) / block_size;
      for (int64_t blk = 0; blk < used_blocks; ++blk) {  // whole blocks: no division per token
        const T* k = keys + table[blk] * block_size * head_dim;
        const int64_t first = blk * block_size, count = std::min(block_size, length - first);
        for (int64_t t = 0; t < count; ++t, k += head_dim) {
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) row[d] = to_float(k[d]);
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = query.data() + g * head_dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * row[d];
            scores[g * length + first + t] = dot;
            peak[g] = std::max(peak[g], dot);
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * length;
        const float m = peak[g];
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t pos = 0; pos < length; ++pos) {
          s[pos] = exp_nonpositive(s[pos] - m);
          sum += s[pos];
        }
        total[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t blk = 0; blk < used_blocks; ++blk) {
        const T* v = values + table[blk] * block_size * head_dim;
        const int64_t first = blk * block_size, count = std::min(block_size, length - first);
        for (int64_t t = 0; t < count; ++t, v += head_dim) {
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) row[d] = to_float(v[d]);
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * length + first + t];
            float* a = acc.data() + g * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) a[d] += p * row[d];
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        OutT* o = out + (b * num_heads + h * group + g) * head_dim;
        const float inv = 1.f / total[g];
        for (int64_t d = 0; d < head_dim; ++d) from_float(acc[g * head_dim + d] * inv, o + d);
        if (lse != nullptr) lse[b * num_heads + h * group + g] = peak[g] + std::log(total[g]);
      }
    }
  });
}

}  // namespace

extern "C" {

int talkloop_abi_version() { return 5; }
int64_t talkloop_max_head_dim() { return kMaxHeadDim; }

// out (q's dtype) = softmax(q K^T * scale) V over each row's first context_lens[b] positions.
// The *_lse variants write float32 out and each (row, head)'s log-sum-exp of the scaled scores,
// for merging with attention over other keys (shared-prefix groups).
#define TALKLOOP_DECODE(NAME, T, OutT, LSE)                                                     \
  void NAME(OutT* out, float* lse, const T* q, const T* key_cache, const T* value_cache,         \
            const int64_t* block_tables, const int64_t* context_lens, int64_t batch,             \
            int64_t num_kv_heads, int64_t group, int64_t head_dim, int64_t num_blocks,           \
            int64_t block_size, int64_t max_blocks, float scale) {                               \
    decode<T, OutT>(out, LSE ? lse : nullptr, q, key_cache, value_cache, block_tables,           \
                    context_lens, batch, num_kv_heads, group, head_dim, num_blocks, block_size,  \
                    max_blocks, scale);                                                          \
  }

TALKLOOP_DECODE(talkloop_decode_attention_f32, float, float, false)
TALKLOOP_DECODE(talkloop_decode_attention_bf16, uint16_t, uint16_t, false)
TALKLOOP_DECODE(talkloop_decode_attention_lse_f32, float, float, true)
TALKLOOP_DECODE(talkloop_decode_attention_lse_bf16, uint16_t, float, true)

}  // extern "C"
