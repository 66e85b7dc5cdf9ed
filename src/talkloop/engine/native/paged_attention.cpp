// Decode attention straight from the paged KV cache, on the CPU.
//
// The PyTorch path gathers every sequence's blocks into a padded batch on each layer before
// two batched matmuls; that copy is most of a batched decode step's attention time. This
// kernel reads each sequence's blocks in place: one work item per (kv head, sequence), the
// G query heads of that kv head scored together, softmax in float32, then the value sum.
// Work items are ordered head-major, so sequences that share a persona prefix read the same
// blocks back to back (from cache, not memory). Threads: ATen's pool (at::parallel_for).
//
// With AVX-512 and head_dim 64 or 128, scores are computed for 16 keys at a time and summed
// across lanes together (`sum16`), and the value sum keeps its accumulators in registers; other
// shapes take the portable loops.
//
// Layouts (contiguous): q, out [B, Hkv * G, D]; caches [Hkv, num_blocks, block_size, D];
// block_tables [B, max_blocks] int64; context_lens [B] int64. dtype: float32 or bfloat16.

#include <ATen/Parallel.h>

#include "scalar.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef TALKLOOP_AVX512
#define TALKLOOP_ATTENTION_AVX512 1
#else
#define TALKLOOP_ATTENTION_AVX512 0
#endif
#if TALKLOOP_ATTENTION_AVX512 && defined(__AVX512BF16__)
#define TALKLOOP_ATTENTION_BF16 1
#else
#define TALKLOOP_ATTENTION_BF16 0
#endif

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

#if TALKLOOP_ATTENTION_AVX512

using talkloop::load16;  // 16 floats from 16 stored elements
using talkloop::tail_mask;

constexpr int64_t kMaxGroup = 16;  // query heads per kv head on the vectorized path

// v[0..15] (16 vectors, in memory) -> one vector of their horizontal sums, in order: four
// levels of pairwise shuffles and adds (45 instructions for 16 sums, where one horizontal
// sum per vector costs about 9).
inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // lane l of a[i]: v2i(0+2), v2i+1(0+2), v2i(1+3), v2i+1(1+3)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // lane l of b[i]: the lane's sums of v4i .. v4i+3
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // lanes: b2i (0+1), b2i (2+3), b2i+1 (0+1), b2i+1 (2+3)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88),
                       _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// Scores of one (kv head, sequence) item's G queries against its keys, 16 keys at a time:
// `dot(key, slot, partial)` writes each query's partial vector for `key` (a row of the cache)
// to partial[g][slot]; every 16 keys, each query's 16 partial vectors are summed across lanes
// (`sum16`), times `scale`, into scores [G, round_up(length, 16)].
template <typename T, typename Dot>
void score_keys(int64_t group, int64_t head_dim, float scale, const T* keys,
                const int64_t* table, int64_t length, int64_t block_size, float* scores,
                Dot dot) {
  const int64_t stride = (length + 15) / 16 * 16;
  alignas(64) __m512 partial[kMaxGroup][16];  // per query: one partial vector per key
  const __m512 scale16 = _mm512_set1_ps(scale);
  int64_t pos = 0;  // of the next key
  int filled = 0;
  auto flush = [&](int64_t first) {
    for (int i = filled; i < 16; ++i)
      for (int64_t g = 0; g < group; ++g) partial[g][i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < group; ++g) {
      alignas(64) float sums[16];
      _mm512_store_ps(sums, _mm512_mul_ps(sum16(partial[g]), scale16));
      std::memcpy(scores + g * stride + first, sums, filled * sizeof(float));
    }
    filled = 0;
  };
  for (int64_t blk = 0; pos < length; ++blk) {
    const T* k = keys + table[blk] * block_size * head_dim;
    const int64_t count = std::min(block_size, length - pos);
    for (int64_t t = 0; t < count; ++t, k += head_dim) {
      dot(k, filled, partial);
      if (++filled == 16) flush(pos + t + 1 - 16);
    }
    pos += count;
  }
  if (filled) flush(pos - filled);
}

// Float32 products: each key converted once for all G (already scaled) queries...
template <int D, typename T>
void scores_avx512(const float* query /* [G, D], scaled */, int64_t group, const T* keys,
                   const int64_t* table, int64_t length, int64_t block_size, float* scores) {
  constexpr int kChunks = D / 16;
  score_keys(group, D, 1.f, keys, table, length, block_size, scores,
             [&](const T* k, int slot, __m512 (*partial)[16]) {
               __m512 key[kChunks];
               for (int c = 0; c < kChunks; ++c) key[c] = load16(k + 16 * c);
               for (int64_t g = 0; g < group; ++g) {
                 const float* qg = query + g * D;
                 __m512 p = _mm512_mul_ps(_mm512_loadu_ps(qg), key[0]);
                 for (int c = 1; c < kChunks; ++c)
                   p = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * c), key[c], p);
                 partial[g][slot] = p;
               }
             });
}

// ... and the value sum, one 16-wide chunk of the output at a time with the G accumulators in
// registers.
template <int D, typename T>
void value_sum_avx512(const float* probs /* [G, stride] */, int64_t group, const T* values,
                      const int64_t* table, int64_t length, int64_t block_size, float* acc) {
  constexpr int kChunks = D / 16;
  const int64_t stride = (length + 15) / 16 * 16;
  for (int c = 0; c < kChunks; ++c) {
    __m512 sums[kMaxGroup];
    for (int64_t g = 0; g < group; ++g) sums[g] = _mm512_setzero_ps();
    int64_t pos = 0;
    for (int64_t blk = 0; pos < length; ++blk) {
      const T* v = values + table[blk] * block_size * D + 16 * c;
      const int64_t count = std::min(block_size, length - pos);
      for (int64_t t = 0; t < count; ++t, v += D) {
        const __m512 row = load16(v);
        for (int64_t g = 0; g < group; ++g)
          sums[g] = _mm512_fmadd_ps(_mm512_set1_ps(probs[g * stride + pos + t]), row, sums[g]);
      }
      pos += count;
    }
    for (int64_t g = 0; g < group; ++g) _mm512_storeu_ps(acc + g * D + 16 * c, sums[g]);
  }
}

#if TALKLOOP_ATTENTION_BF16
// bf16 caches with AVX-512 BF16: the same two passes on `vdpbf16ps` (32 bf16 products into 16
// float32 lanes), about twice the arithmetic rate of converting to float32 and FMAs, and no
// conversions. Scores: each key's D / 32 vectors times the query's, summed across lanes by
// `sum16`. Value sums: keys in pairs, each pair's rows interleaved channel by channel
// (unpacklo/hi), times the pair's probabilities, rounded to bf16 (as flash attention does).
constexpr int64_t kMaxGroupBf16 = 8;  // 2 x G accumulators per 32 channels stay in registers

using talkloop::as_bh;

template <int D>
void scores_bf16(const uint16_t* query /* [G, D] */, int64_t group, float scale,
                 const uint16_t* keys, const int64_t* table, int64_t length, int64_t block_size,
                 float* scores /* [G, round_up(length, 16)] */) {
  constexpr int kChunks = D / 32;
  __m512bh q[kMaxGroupBf16][kChunks];
  for (int64_t g = 0; g < group; ++g)
    for (int c = 0; c < kChunks; ++c) q[g][c] = as_bh(_mm512_loadu_si512(query + g * D + 32 * c));
  score_keys(group, D, scale, keys, table, length, block_size, scores,
             [&](const uint16_t* k, int slot, __m512 (*partial)[16]) {
               __m512bh key[kChunks];
               for (int c = 0; c < kChunks; ++c) key[c] = as_bh(_mm512_loadu_si512(k + 32 * c));
               for (int64_t g = 0; g < group; ++g) {
                 __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), key[0], q[g][0]);
                 for (int c = 1; c < kChunks; ++c) p = _mm512_dpbf16_ps(p, key[c], q[g][c]);
                 partial[g][slot] = p;
               }
             });
}

template <int D>
void value_sum_bf16(const float* probs /* [G, stride] */, int64_t group, const uint16_t* values,
                    const int64_t* table, int64_t length, int64_t block_size,
                    std::vector<uint16_t>& scratch, float* acc /* [G, D] */) {
  const int64_t stride = (length + 15) / 16 * 16;
  scratch.resize(group * stride);  // the probabilities in bf16, 0 past the length
  for (int64_t g = 0; g < group; ++g)
    for (int64_t pos = 0; pos < stride; pos += 16) {
      const __m512 p = load16(probs + g * stride + pos, tail_mask(length - pos));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(scratch.data() + g * stride + pos),
                          (__m256i)_mm512_cvtneps_pbh(p));
    }
  const uint32_t* pairs = reinterpret_cast<const uint32_t*>(scratch.data());  // [G, stride / 2]
  alignas(64) static const uint16_t zeros[D] = {};
  // After unpacking, lane 4L + e of `lo` holds channel 8L + e of the chunk, of `hi` 8L + 4 + e:
  // these indices put channels 0..15 and 16..31 back in order (lo is 0..15, hi 16..31).
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int c = 0; c < D / 32; ++c) {
    __m512 lo[kMaxGroupBf16], hi[kMaxGroupBf16];
    for (int64_t g = 0; g < group; ++g) lo[g] = hi[g] = _mm512_setzero_ps();
    for (int64_t k = 0; k < length; k += 2) {
      const uint16_t* a = values + (table[k / block_size] * block_size + k % block_size) * D;
      const uint16_t* b =
          k + 1 < length
              ? values + (table[(k + 1) / block_size] * block_size + (k + 1) % block_size) * D
              : zeros;
      const __m512i ra = _mm512_loadu_si512(a + 32 * c), rb = _mm512_loadu_si512(b + 32 * c);
      const __m512bh vlo = as_bh(_mm512_unpacklo_epi16(ra, rb));
      const __m512bh vhi = as_bh(_mm512_unpackhi_epi16(ra, rb));
      for (int64_t g = 0; g < group; ++g) {
        const __m512bh p = as_bh(_mm512_set1_epi32(pairs[g * (stride / 2) + k / 2]));
        lo[g] = _mm512_dpbf16_ps(lo[g], vlo, p);
        hi[g] = _mm512_dpbf16_ps(hi[g], vhi, p);
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      _mm512_storeu_ps(acc + g * D + 32 * c, _mm512_permutex2var_ps(lo[g], first, hi[g]));
      _mm512_storeu_ps(acc + g * D + 32 * c + 16, _mm512_permutex2var_ps(lo[g], second, hi[g]));
    }
  }
}
#endif
#endif

template <typename T, typename OutT>
void decode(OutT* out, float* lse, const T* q, const T* key_cache, const T* value_cache,
            const int64_t* block_tables, const int64_t* context_lens, int64_t batch,
            int64_t num_kv_heads, int64_t group, int64_t head_dim, int64_t num_blocks,
            int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t num_heads = num_kv_heads * group;
  const int64_t head_stride = num_blocks * block_size * head_dim;  // one kv head's pool
#if TALKLOOP_ATTENTION_AVX512
  const bool vectorized = (head_dim == 64 || head_dim == 128) && group <= kMaxGroup;
#else
  const bool vectorized = false;
#endif
#if TALKLOOP_ATTENTION_BF16
  const bool dot_bf16 = std::is_same_v<T, uint16_t> && vectorized && group <= kMaxGroupBf16;
#else
  const bool dot_bf16 = false;
#endif
  at::parallel_for(0, num_kv_heads * batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * head_dim), acc(group * head_dim), scores;
    std::vector<uint16_t> probs;  // scratch: bf16 probabilities for the bf16 value sum
    std::vector<float> peak(group), total(group);
    float row[kMaxHeadDim];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / batch, b = item % batch;
      const int64_t length = context_lens[b];
      const int64_t stride = (length + 15) / 16 * 16;  // of each query's scores
      const int64_t* table = block_tables + b * max_blocks;
      const T* keys = key_cache + h * head_stride;
      const T* values = value_cache + h * head_stride;
      for (int64_t g = 0; g < group && !dot_bf16; ++g) {  // (the bf16 path reads q as stored)
        const T* qrow = q + (b * num_heads + h * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) query[g * head_dim + d] = to_float(qrow[d]) * scale;
      }
      scores.resize(group * stride);
      const int64_t used_blocks = (length + block_size - 1) / block_size;
      if (dot_bf16) {
#if TALKLOOP_ATTENTION_BF16
        if constexpr (std::is_same_v<T, uint16_t>) {
          const uint16_t* rows = q + (b * num_heads + h * group) * head_dim;  // G rows
          if (head_dim == 64) {
            scores_bf16<64>(rows, group, scale, keys, table, length, block_size, scores.data());
          } else {
            scores_bf16<128>(rows, group, scale, keys, table, length, block_size, scores.data());
          }
        }
#endif
      } else if (vectorized) {
#if TALKLOOP_ATTENTION_AVX512
        if (head_dim == 64) {
          scores_avx512<64>(query.data(), group, keys, table, length, block_size, scores.data());
        } else {
          scores_avx512<128>(query.data(), group, keys, table, length, block_size, scores.data());
        }
#endif
      } else {
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
              scores[g * stride + first + t] = dot;
            }
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * stride;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t pos = 0; pos < length; ++pos) m = std::max(m, s[pos]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t pos = 0; pos < length; ++pos) {
          s[pos] = exp_nonpositive(s[pos] - m);
          sum += s[pos];
        }
        peak[g] = m;
        total[g] = sum;
      }
      if (dot_bf16) {
#if TALKLOOP_ATTENTION_BF16
        if constexpr (std::is_same_v<T, uint16_t>) {
          if (head_dim == 64) {
            value_sum_bf16<64>(scores.data(), group, values, table, length, block_size, probs,
                               acc.data());
          } else {
            value_sum_bf16<128>(scores.data(), group, values, table, length, block_size, probs,
                                acc.data());
          }
        }
#endif
      } else if (vectorized) {
#if TALKLOOP_ATTENTION_AVX512
        if (head_dim == 64) {
          value_sum_avx512<64>(scores.data(), group, values, table, length, block_size, acc.data());
        } else {
          value_sum_avx512<128>(scores.data(), group, values, table, length, block_size,
                                acc.data());
        }
#endif
      } else {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t blk = 0; blk < used_blocks; ++blk) {
          const T* v = values + table[blk] * block_size * head_dim;
          const int64_t first = blk * block_size, count = std::min(block_size, length - first);
          for (int64_t t = 0; t < count; ++t, v += head_dim) {
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) row[d] = to_float(v[d]);
            for (int64_t g = 0; g < group; ++g) {
              const float p = scores[g * stride + first + t];
              float* a = acc.data() + g * head_dim;
#pragma omp simd
              for (int64_t d = 0; d < head_dim; ++d) a[d] += p * row[d];
            }
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

int talkloop_abi_version() { return 7; }
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
