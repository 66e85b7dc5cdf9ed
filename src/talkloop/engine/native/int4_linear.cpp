// Int4 linear for decode-sized batches (1 to 64 rows: decode, speculative verification,
// batched decode): y = x W^T (+ bias).
//
// Weights are group-wise asymmetric uint4 (GGUF Q4_1's form: w = q * scale + min per group of
// 32 input channels, scale and min in fp16, so a Q4_1 checkpoint keeps its exact values).
// Activations are quantized per group of 32 to int8 (Q8_1's form: one float scale per group)
// and the products summed in int32 with AVX-512 VNNI (`vpdpbusd`: 64 u8 x s8 products per
// instruction); each group's sum is scaled back in float:
//   sum_k x_k w_k = scale * dx * sum_k xq_k q_k + min * sum_k x_k.
// Decode is bound by memory bandwidth; this form reads 0.625 bytes per weight, and each tile
// of 16 output channels is read from memory once and stays in L1 while blocks of up to 8 rows
// run over it (torch's int4 kernel re-reads per row: 5 rows cost 3x one row on the 2-core
// EPYC measured here; this kernel's 5 rows cost 2.2x one, and at 32 rows it beats W8A8).
//
// Without VNNI (AVX2 CPUs: most laptops, AMD before Zen 4), the same products come from
// `vpmaddubsw` (32 u8 x s8 pairs into 16 int16 sums) and `vpmaddwd`: a weight is at most 15
// and an activation at most 127 in magnitude, so eight pair sums (30,480) fit in int16 and a
// group of 32 takes 8 `vpmaddubsw`, 7 adds and one `vpmaddwd` per 8 outputs. Same layout.
//
// Packed layout, per tile of 16 output channels and group of 32 input channels, 320 bytes:
//   256 weight bytes as 4 chunks of 64: chunk c, byte 4n + j (lane n = output channel, j < 4)
//   holds q[n][32g + 8c + j] in its low nibble and q[n][32g + 8c + 4 + j] in its high one
//   (so one 64-byte load gives the u8 operands of two vpdpbusd), then 16 fp16 scales and
//   16 fp16 mins. Tiles are contiguous over groups: a thread streams its tiles in order.

#include <ATen/Parallel.h>

#include "scalar.h"
#include "simd.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#if defined(TALKLOOP_AVX512) && defined(__AVX512VNNI__)
#define TALKLOOP_INT4_VNNI 1
#define TALKLOOP_INT4 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TALKLOOP_INT4_AVX2 1
#define TALKLOOP_INT4 1
#include <immintrin.h>
#else
#define TALKLOOP_INT4 0
#endif

namespace {

using talkloop::as_stored;
using talkloop::from_float;
using talkloop::to_float;

constexpr int64_t kGroup = 32;
constexpr int64_t kTile = 16;
constexpr int64_t kBlockBytes = 256 + 2 * kTile * 2;
#if TALKLOOP_INT4_VNNI
constexpr int64_t kRowBlock = 8;  // rows sharing one unpacking of a weight block
#else
constexpr int64_t kRowBlock = 4;  // (AVX2: 16 registers, 8 of them hold the unpacked block)
#endif

#if TALKLOOP_INT4_VNNI
// Per row and group of 32: the int8 values (symmetric, round half to even: MXCSR's rounding),
// their scale, and the group's float sum (for the min term); 2 x 16 lanes per group.
template <typename T>
void quantize_groups(const T* x, int64_t rows, int64_t cols, int8_t* xq, float* dx, float* xsum) {
  const int64_t groups = cols / kGroup;
  const __m512 low = _mm512_set1_ps(-127.f), high = _mm512_set1_ps(127.f);
  // Rows in parallel once there are enough of them to pay for waking the other threads.
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const T* src = x + r * cols + g * kGroup;
        const __m512 v0 = talkloop::load16(src), v1 = talkloop::load16(src + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        int8_t* dst = xq + r * cols + g * kGroup;
        for (int half = 0; half < 2; ++half) {
          const __m512 scaled = _mm512_mul_ps(half ? v1 : v0, inv);
          const __m512i q = _mm512_cvtps_epi32(_mm512_min_ps(high, _mm512_max_ps(low, scaled)));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16 * half), _mm512_cvtsepi32_epi8(q));
        }
        dx[r * groups + g] = amax / 127.f;
        xsum[r * groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
      }
    }
  });
}

// Rows [0, ROWS) of xq (already offset) against tile `tile` (its groups' blocks): 16 outputs
// per row added into y (already offset to the tile's first column).
template <int ROWS>
inline void tile_rows(const uint8_t* tile, const int8_t* xq, const float* dx, const float* xsum,
                      int64_t cols, float* y, int64_t out_features) {
  const int64_t groups = cols / kGroup;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
  const uint8_t* block = tile;
  for (int64_t g = 0; g < groups; ++g, block += kBlockBytes) {
    __m512i w[8];
    for (int c = 0; c < 4; ++c) {
      const __m512i bytes = _mm512_loadu_si512(block + 64 * c);
      w[2 * c] = _mm512_and_si512(bytes, low);
      w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
    }
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(block + 256)));
    const __m512 min = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(block + 288)));
    for (int r = 0; r < ROWS; ++r) {
      const int8_t* xg = xq + r * cols + g * kGroup;
      __m512i dot = _mm512_setzero_si512();
      for (int i = 0; i < 8; ++i) {
        int32_t four;
        std::memcpy(&four, xg + 4 * i, 4);
        dot = _mm512_dpbusd_epi32(dot, w[i], _mm512_set1_epi32(four));
      }
      const __m512 scaled = _mm512_mul_ps(scale, _mm512_set1_ps(dx[r * groups + g]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scaled, acc[r]);
      acc[r] = _mm512_fmadd_ps(min, _mm512_set1_ps(xsum[r * groups + g]), acc[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) _mm512_storeu_ps(y + r * out_features, acc[r]);
}

#elif TALKLOOP_INT4_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // bf16 bits -> float
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <typename T>
void quantize_groups(const T* x, int64_t rows, int64_t cols, int8_t* xq, float* dx, float* xsum) {
  const int64_t groups = cols / kGroup;
  const __m256 low = _mm256_set1_ps(-127.f), high = _mm256_set1_ps(127.f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  // packs_epi32 then packs_epi16 interleave the 128-bit lanes: dwords 0,4,1,5,... restore order
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const T* src = x + r * cols + g * kGroup;
        __m256 v[4];
        for (int i = 0; i < 4; ++i) v[i] = load8(src + 8 * i);
        const __m256 a01 = _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask));
        const __m256 a23 = _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask));
        const float amax = hmax8(_mm256_max_ps(a01, a23));
        const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        __m256i q[4];
        for (int i = 0; i < 4; ++i)
          q[i] = _mm256_cvtps_epi32(_mm256_min_ps(high, _mm256_max_ps(low, _mm256_mul_ps(v[i], inv))));
        const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                                  _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + r * cols + g * kGroup),
                            _mm256_permutevar8x32_epi32(packed, order));
        dx[r * groups + g] = amax / 127.f;
        xsum[r * groups + g] = hsum8(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
      }
    }
  });
}

// As the VNNI version, one half of the tile (8 outputs) at a time: its 8 unpacked weight
// vectors and ROWS accumulators fit AVX2's 16 registers.
template <int ROWS>
inline void tile_rows(const uint8_t* tile, const int8_t* xq, const float* dx, const float* xsum,
                      int64_t cols, float* y, int64_t out_features) {
  const int64_t groups = cols / kGroup;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int half = 0; half < 2; ++half) {
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
    const uint8_t* block = tile;
    for (int64_t g = 0; g < groups; ++g, block += kBlockBytes) {
      __m256i w[8];
      for (int c = 0; c < 4; ++c) {
        const __m256i bytes = _mm256_loadu_si256((const __m256i*)(block + 64 * c + 32 * half));
        w[2 * c] = _mm256_and_si256(bytes, low);
        w[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
      }
      const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(block + 256 + 16 * half)));
      const __m256 min = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(block + 288 + 16 * half)));
      for (int r = 0; r < ROWS; ++r) {
        const int8_t* xg = xq + r * cols + g * kGroup;
        __m256i sums = _mm256_setzero_si256();
        for (int i = 0; i < 8; ++i) {
          int32_t four;
          std::memcpy(&four, xg + 4 * i, 4);
          sums = _mm256_add_epi16(sums, _mm256_maddubs_epi16(w[i], _mm256_set1_epi32(four)));
        }
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums, ones));
        const __m256 scaled = _mm256_mul_ps(scale, _mm256_set1_ps(dx[r * groups + g]));
        acc[r] = _mm256_fmadd_ps(dot, scaled, acc[r]);
        acc[r] = _mm256_fmadd_ps(min, _mm256_set1_ps(xsum[r * groups + g]), acc[r]);
      }
    }
    for (int r = 0; r < ROWS; ++r) _mm256_storeu_ps(y + r * out_features + 8 * half, acc[r]);
  }
}
#endif

#if TALKLOOP_INT4
using TileRows = void (*)(const uint8_t*, const int8_t*, const float*, const float*, int64_t,
                          float*, int64_t);
template <size_t... R>
constexpr std::array<TileRows, sizeof...(R) + 1> tile_table(std::index_sequence<R...>) {
  return {nullptr, tile_rows<R + 1>...};
}
constexpr auto kTileRows = tile_table(std::make_index_sequence<kRowBlock>());  // [count]

// Each tile of 16 outputs is read from memory once: its blocks (K / 32 x 320 bytes) stay in
// L1 while every block of up to kRowBlock rows runs over them.
void run_tiles(const uint8_t* packed, const int8_t* xq, const float* dx, const float* xsum,
               int64_t rows, int64_t cols, int64_t out_features, float* y) {
  const int64_t groups = cols / kGroup, num_tiles = out_features / kTile;
  const int64_t num_blocks = (rows + kRowBlock - 1) / kRowBlock;
  const int64_t per_block = (rows + num_blocks - 1) / num_blocks;  // even blocks: 7 -> 4 + 3
  at::parallel_for(0, num_tiles, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* tile = packed + t * groups * kBlockBytes;
      for (int64_t r0 = 0; r0 < rows; r0 += per_block) {
        const int64_t count = std::min(per_block, rows - r0);
        kTileRows[count](tile, xq + r0 * cols, dx + r0 * groups, xsum + r0 * groups, cols,
                         y + r0 * out_features + t * kTile, out_features);
      }
    }
  });
}
#endif

template <typename T>
void linear(const T* x, int64_t rows, int64_t cols, const uint8_t* packed, int64_t out_features,
            const T* bias, T* out) {
#if TALKLOOP_INT4
  if (rows <= 0) return;  // (a step may turn no row into logits)
  const int64_t groups = cols / kGroup;
  std::vector<int8_t> xq(rows * cols);
  std::vector<float> dx(rows * groups), xsum(rows * groups);
  // Not zeroed: the tiles write every element (zeroing lm_head's 32-row output cost 2%).
  std::unique_ptr<float[]> y(new float[rows * out_features]);
  quantize_groups(x, rows, cols, xq.data(), dx.data(), xsum.data());
  run_tiles(packed, xq.data(), dx.data(), xsum.data(), rows, cols, out_features, y.get());
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / out_features), [&](int64_t begin,
                                                                            int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* dst = out + r * out_features;
      const float* src = y.get() + r * out_features;
      if (bias != nullptr) {  // rounded to T, then the bias added (and rounded): torch's order
#pragma omp simd
        for (int64_t n = 0; n < out_features; ++n)
          from_float(as_stored(src[n], T{}) + to_float(bias[n]), dst + n);
      } else {
#pragma omp simd
        for (int64_t n = 0; n < out_features; ++n) from_float(src[n], dst + n);
      }
    }
  });
#else
  (void)x, (void)rows, (void)cols, (void)packed, (void)out_features, (void)bias, (void)out;
#endif
}

}  // namespace

extern "C" {

// Whether this build has the kernel (AVX-512 VNNI or AVX2); without it callers keep torch's
// int4 path.
int talkloop_int4_supported() { return TALKLOOP_INT4; }

// x [rows, cols] (cols % 32 == 0), packed as above for [out_features % 16 == 0, cols],
// bias [out_features] or null -> out [rows, out_features]; x, bias and out of one dtype.
void talkloop_int4_linear_f32(const float* x, int64_t rows, int64_t cols, const uint8_t* packed,
                              int64_t out_features, const float* bias, float* out) {
  linear(x, rows, cols, packed, out_features, bias, out);
}
void talkloop_int4_linear_bf16(const uint16_t* x, int64_t rows, int64_t cols,
                               const uint8_t* packed, int64_t out_features, const uint16_t* bias,
                               uint16_t* out) {
  linear(x, rows, cols, packed, out_features, bias, out);
}

}  // extern "C"
