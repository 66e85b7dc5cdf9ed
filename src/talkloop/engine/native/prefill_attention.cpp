// Causal prefill attention straight from the paged KV cache, in bf16 with float32 accumulation.
//
// The PyTorch path gathers a chunk's blocks, casts queries, keys and values to float32 and
// runs SDPA's flash kernel: on a 1,024-token prompt that is half of prefill. This kernel is a
// flash-attention loop built on AVX-512 BF16's `vdpbf16ps` (32 bf16 products summed into 16
// float32 lanes per instruction, twice the float32 FMA rate):
//
//   1. Pack, once per call: each kv head's keys and values into tiles of kKeys = 32 keys, in
//      the order the dot products read them: keys as (d, d + 1) pairs of 16 keys side by side,
//      values as (key, key + 1) pairs of 16 channels side by side. Positions past the context
//      are zero. The pack is the gather: blocks are read in place from the pool.
//   2. One work item per (kv head, block of kQueries query positions): its G query heads x
//      kQueries positions = M rows share every key tile. Per tile, scores S = Q K^T for 8 rows
//      at a time (32 keys in two accumulators per row), the causal mask on diagonal tiles, the
//      online softmax (running maximum and sum per row, float32), probabilities rounded to bf16
//      and O += P V for 8 rows x 32 channels at a time. Tiles above the diagonal are skipped.
//
// Items are ordered so that each half of the list (a thread's share with two threads) holds as
// much causal work as the other: block b beside block n - 1 - b.
//
// Probabilities are rounded to bf16 before the value sum (as flash attention does on GPUs):
// outputs differ from float32 attention by about 1e-2 relative to their scale, the order of a
// bf16 rounding of the output itself.
//
// Layouts: q rows [n] of q_stride elements, heads at D apart (a slice of the fused q/k
// tensor); out [n, Hkv * G, D] contiguous; caches [Hkv, num_blocks, block_size, D]; table
// [ceil(context_len / block_size)] int64. Query i is at position context_len - n + i.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

#if defined(TALKLOOP_AVX512) && defined(__AVX512BF16__)
#define TALKLOOP_PREFILL_BF16 1
#else
#define TALKLOOP_PREFILL_BF16 0
#endif

namespace {

#if TALKLOOP_PREFILL_BF16

constexpr int64_t kKeys = 32;     // keys per tile: two vectors of 16
constexpr int64_t kQueries = 16;  // query positions per work item (rows = 16 * G, a multiple of 8)
constexpr int kRows = 8;          // rows per register block

// Same bits, other vector type (GCC's vector casts).
using talkloop::as_bh;
inline __m512i as_int(__m512bh x) { return (__m512i)x; }
inline __m256i as_int(__m256bh x) { return (__m256i)x; }

using talkloop::exp16;

// Keys [D / 2][2][16] pairs (as uint32) and values [16 key pairs][D / 16][16][2] of one tile.
template <int D>
void pack_tile(const uint16_t* keys, const uint16_t* values, const int64_t* table,
               int64_t block_size, int64_t first, int64_t context_len, uint32_t* key_tile,
               uint16_t* value_tile) {
  std::memset(key_tile, 0, kKeys * D * sizeof(uint16_t));
  std::memset(value_tile, 0, kKeys * D * sizeof(uint16_t));
  const int64_t count = std::min(kKeys, context_len - first);
  for (int64_t k = 0; k < count; ++k) {
    const int64_t pos = first + k;
    const int64_t offset = (table[pos / block_size] * block_size + pos % block_size) * D;
    uint32_t key_pairs[D / 2];
    std::memcpy(key_pairs, keys + offset, D * sizeof(uint16_t));
    for (int p = 0; p < D / 2; ++p) key_tile[(p * 2 + k / 16) * 16 + k % 16] = key_pairs[p];
    const uint16_t* v = values + offset;
    uint16_t* dst = value_tile + (k / 2) * D * 2 + (k % 2);
    for (int d = 0; d < D; ++d) dst[(d / 16) * 32 + (d % 16) * 2] = v[d];
  }
}

template <int D>
void prefill(uint16_t* out, const uint16_t* q, int64_t q_stride, const uint16_t* key_cache,
             const uint16_t* value_cache, const int64_t* table, int64_t num_tokens,
             int64_t context_len, int64_t num_kv_heads, int64_t group, int64_t num_blocks,
             int64_t block_size, float scale) {
  static_assert(D % 32 == 0, "head_dim must be a multiple of 32");
  const int64_t num_heads = num_kv_heads * group;
  const int64_t head_stride = num_blocks * block_size * D;
  const int64_t tiles = (context_len + kKeys - 1) / kKeys;
  const int64_t tile_elems = kKeys * D;  // bf16 elements per packed tile (keys or values)
  std::vector<uint16_t> packed_keys(num_kv_heads * tiles * tile_elems);
  std::vector<uint16_t> packed_values(num_kv_heads * tiles * tile_elems);
  at::parallel_for(0, num_kv_heads * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / tiles, t = item % tiles;
      pack_tile<D>(key_cache + h * head_stride, value_cache + h * head_stride, table, block_size,
                   t * kKeys, context_len,
                   reinterpret_cast<uint32_t*>(packed_keys.data() + item * tile_elems),
                   packed_values.data() + item * tile_elems);
    }
  });

  const int64_t cached = context_len - num_tokens;
  const int64_t blocks = (num_tokens + kQueries - 1) / kQueries;
  const int64_t rows = kQueries * group;  // row r: position r / group, head r % group
  at::parallel_for(0, num_kv_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> query(rows * D);  // bf16, pairs read as uint32
    std::vector<float> acc(rows * D), scores(rows * kKeys), peak(rows), total(rows);
    std::vector<uint16_t> probs(rows * kKeys);
    std::vector<int64_t> last(rows);  // each row's last visible key
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / blocks, i = item % blocks;
      const int64_t block = i % 2 == 0 ? i / 2 : blocks - 1 - i / 2;  // light and heavy in turn
      const int64_t first_query = block * kQueries;
      const int64_t count = std::min(kQueries, num_tokens - first_query);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t position = r / group, g = r % group;
        uint16_t* dst = query.data() + r * D;
        if (position < count) {
          std::memcpy(dst, q + (first_query + position) * q_stride + (h * group + g) * D,
                      D * sizeof(uint16_t));
        } else {
          std::memset(dst, 0, D * sizeof(uint16_t));  // padding rows: computed, not written
        }
        last[r] = cached + first_query + std::min(position, count - 1);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(peak.begin(), peak.end(), -INFINITY);
      std::fill(total.begin(), total.end(), 0.f);
      const int64_t used_tiles = std::min(tiles, (last[rows - 1] + kKeys) / kKeys);
      const uint32_t* query_pairs = reinterpret_cast<const uint32_t*>(query.data());
      const uint32_t* prob_pairs = reinterpret_cast<const uint32_t*>(probs.data());
      const __m512 key_index = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      for (int64_t t = 0; t < used_tiles; ++t) {
        const uint16_t* key_tile = packed_keys.data() + (h * tiles + t) * tile_elems;
        const uint16_t* value_tile = packed_values.data() + (h * tiles + t) * tile_elems;
        // S = Q K^T, 8 rows x 32 keys at a time.
        for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
          __m512 s[kRows][2];
          for (int r = 0; r < kRows; ++r) s[r][0] = s[r][1] = _mm512_setzero_ps();
          for (int p = 0; p < D / 2; ++p) {
            const __m512bh k0 = as_bh(_mm512_loadu_si512(key_tile + (p * 2) * 32));
            const __m512bh k1 = as_bh(_mm512_loadu_si512(key_tile + (p * 2 + 1) * 32));
            for (int r = 0; r < kRows; ++r) {
              const __m512bh qp = as_bh(_mm512_set1_epi32(query_pairs[(r0 + r) * (D / 2) + p]));
              s[r][0] = _mm512_dpbf16_ps(s[r][0], k0, qp);
              s[r][1] = _mm512_dpbf16_ps(s[r][1], k1, qp);
            }
          }
          for (int r = 0; r < kRows; ++r) {
            _mm512_storeu_ps(scores.data() + (r0 + r) * kKeys, s[r][0]);
            _mm512_storeu_ps(scores.data() + (r0 + r) * kKeys + 16, s[r][1]);
          }
        }
        // Online softmax per row; keys past the row's position are masked on diagonal tiles.
        const int64_t tile_first = t * kKeys;
        const __m512 scale16 = _mm512_set1_ps(scale);
        for (int64_t r = 0; r < rows; ++r) {
          __m512 s0 = _mm512_mul_ps(_mm512_loadu_ps(scores.data() + r * kKeys), scale16);
          __m512 s1 = _mm512_mul_ps(_mm512_loadu_ps(scores.data() + r * kKeys + 16), scale16);
          const int64_t visible = last[r] - tile_first;  // keys 0..visible of the tile
          if (visible < kKeys - 1) {
            const __m512 limit = _mm512_set1_ps(static_cast<float>(visible));
            const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
            s0 = _mm512_mask_mov_ps(s0, _mm512_cmp_ps_mask(key_index, limit, _CMP_GT_OQ), minus_inf);
            const __m512 upper = _mm512_add_ps(key_index, _mm512_set1_ps(16.f));
            s1 = _mm512_mask_mov_ps(s1, _mm512_cmp_ps_mask(upper, limit, _CMP_GT_OQ), minus_inf);
          }
          const float tile_max = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
          // Finite from the first tile on: every row sees key 0.
          const float new_peak = std::max(peak[r], tile_max);
          const __m512 m = _mm512_set1_ps(new_peak);
          const __m512 p0 = exp16(_mm512_sub_ps(s0, m));
          const __m512 p1 = exp16(_mm512_sub_ps(s1, m));
          if (new_peak > peak[r]) {
            const float alpha = std::exp(peak[r] - new_peak);  // 0 on the first tile
            total[r] *= alpha;
            const __m512 a = _mm512_set1_ps(alpha);
            float* o = acc.data() + r * D;
            for (int c = 0; c < D / 16; ++c)
              _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(o + 16 * c), a));
            peak[r] = new_peak;
          }
          total[r] += _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
          _mm512_storeu_si512(probs.data() + r * kKeys,
                              as_int(_mm512_cvtne2ps_pbh(p1, p0)));
        }
        // O += P V, 8 rows x 32 channels at a time.
        for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
          for (int c = 0; c < D / 16; c += 2) {
            __m512 o[kRows][2];
            for (int r = 0; r < kRows; ++r) {
              o[r][0] = _mm512_loadu_ps(acc.data() + (r0 + r) * D + 16 * c);
              o[r][1] = _mm512_loadu_ps(acc.data() + (r0 + r) * D + 16 * c + 16);
            }
            for (int j = 0; j < kKeys / 2; ++j) {
              const __m512bh v0 = as_bh(_mm512_loadu_si512(value_tile + (j * (D / 16) + c) * 32));
              const __m512bh v1 =
                  as_bh(_mm512_loadu_si512(value_tile + (j * (D / 16) + c + 1) * 32));
              for (int r = 0; r < kRows; ++r) {
                const __m512bh pp = as_bh(_mm512_set1_epi32(prob_pairs[(r0 + r) * (kKeys / 2) + j]));
                o[r][0] = _mm512_dpbf16_ps(o[r][0], v0, pp);
                o[r][1] = _mm512_dpbf16_ps(o[r][1], v1, pp);
              }
            }
            for (int r = 0; r < kRows; ++r) {
              _mm512_storeu_ps(acc.data() + (r0 + r) * D + 16 * c, o[r][0]);
              _mm512_storeu_ps(acc.data() + (r0 + r) * D + 16 * c + 16, o[r][1]);
            }
          }
        }
      }
      for (int64_t r = 0; r < count * group; ++r) {
        const int64_t position = r / group, g = r % group;
        uint16_t* o = out + ((first_query + position) * num_heads + h * group + g) * D;
        const __m512 inv = _mm512_set1_ps(1.f / total[r]);
        for (int c = 0; c < D / 16; ++c) {
          const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(acc.data() + r * D + 16 * c), inv);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * c),
                              as_int(_mm512_cvtneps_pbh(x)));
        }
      }
    }
  });
}

#endif

}  // namespace

extern "C" {

int talkloop_prefill_attention_supported(int64_t head_dim) {
#if TALKLOOP_PREFILL_BF16
  return head_dim == 64 || head_dim == 128;
#else
  (void)head_dim;
  return 0;
#endif
}

// out = causal softmax(q K^T * scale) V for a chunk of num_tokens new queries after
// context_len - num_tokens cached ones; bf16 q, caches and out (see the layouts above).
void talkloop_prefill_attention_bf16(uint16_t* out, const uint16_t* q, int64_t q_stride,
                                     const uint16_t* key_cache, const uint16_t* value_cache,
                                     const int64_t* table, int64_t num_tokens,
                                     int64_t context_len, int64_t num_kv_heads, int64_t group,
                                     int64_t head_dim, int64_t num_blocks, int64_t block_size,
                                     float scale) {
#if TALKLOOP_PREFILL_BF16
  if (head_dim == 64) {
    prefill<64>(out, q, q_stride, key_cache, value_cache, table, num_tokens, context_len,
                num_kv_heads, group, num_blocks, block_size, scale);
  } else if (head_dim == 128) {
    prefill<128>(out, q, q_stride, key_cache, value_cache, table, num_tokens, context_len,
                 num_kv_heads, group, num_blocks, block_size, scale);
  }
#else
  (void)out, (void)q, (void)q_stride, (void)key_cache, (void)value_cache, (void)table;
  (void)num_tokens, (void)context_len, (void)num_kv_heads, (void)group, (void)head_dim;
  (void)num_blocks, (void)block_size, (void)scale;
#endif
}

}  // extern "C"
