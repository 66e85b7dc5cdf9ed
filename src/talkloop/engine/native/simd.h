// AVX-512 helpers shared by the kernels, defined where the build has AVX-512 F, BW and VL
// (TALKLOOP_AVX512 is then 1).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define TALKLOOP_AVX512 1
#include <immintrin.h>

namespace talkloop {

// e^x for 16 lanes, ~2e-7 relative error: 2^n e^r with |r| <= ln2 / 2 and a degree-6
// polynomial. x <= -87 (and -inf) gives 0; x >= 88 gives +inf.
inline __m512 exp16(__m512 x) {
  const __m512 clamped = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)),
                                       _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(
      _mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), clamped);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  __m512 e = _mm512_scalef_ps(p, n);
  e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ),
                         _mm512_setzero_ps());
  return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.f), _CMP_GT_OQ),
                            _mm512_set1_ps(INFINITY));
}

// Lanes [0, left) of 16 (a row's tail).
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (left > 0 ? left : 0)) - 1);
}

// 16 elements <-> 16 floats (masked lanes read as 0 and are not written); bf16 is carried as
// its uint16_t bits and rounded to nearest even, as torch rounds.
inline __m512 load16(const float* p, __mmask16 m = 0xFFFF) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m = 0xFFFF) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
// x's bits rounded to nearest even at bf16 precision: the bf16 value is the top 16 bits.
inline __m512i round_bf16_bits(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
}
inline void store16(float* p, __m512 x, __mmask16 m = 0xFFFF) { _mm512_mask_storeu_ps(p, m, x); }
inline void store16(uint16_t* p, __m512 x, __mmask16 m = 0xFFFF) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bf16_bits(x), 16)));
}
// x rounded to bf16 precision (tag dispatch on the element type, as scalar.h's as_stored).
inline __m512 as_stored16(__m512 x, float) { return x; }
inline __m512 as_stored16(__m512 x, uint16_t) {
  return _mm512_castsi512_ps(_mm512_and_si512(round_bf16_bits(x), _mm512_set1_epi32(0xFFFF0000u)));
}

#ifdef __AVX512BF16__
// Same bits as a bf16 vector (GCC's vector casts), for `vdpbf16ps`.
inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }
#endif

}  // namespace talkloop
#endif
