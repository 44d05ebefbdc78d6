// AVX-512 helpers of the bfloat16 attention kernels (amx_matmul.cc's on AMX tiles, attention.cc's on AVX512-BF16):
// e^x, float32 <-> bfloat16, and the passes between their products over an item's rows (the loss kernel,
// pairwise.cc, shares the e^x polynomial).
//
//   SoftmaxRow:     P = softmax(S + bias) by rows, in bfloat16
//   OutGradRows:    rowsum(dO * O) and dO in bfloat16
//   ScoreGradRows:  dS = P * (dP - rowsum(dO * O)), in bfloat16
//
// Each row is any length (the last vector masked). Built into each kernel's library (native.py hashes this file
// with every source that includes it).

#ifndef JAXRM_KERNELS_AVX512_H_
#define JAXRM_KERNELS_AVX512_H_

#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace avx512 {

// Cephes' expf polynomial: with x = n ln2 + r (n an integer, |r| <= ln2 / 2), e^r, which the caller scales by 2^n
// (relative error ~1e-7). ln 2 is taken in two parts, the first exact in float32. Marked for AVX-512F itself so that
// pairwise.cc, built for any x86-64 CPU, can call it from its AVX-512 loops.
__attribute__((target("avx512f"), always_inline)) inline __m512 ExpOfReduced(__m512 x, __m512 n) {
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return y;
}

// e^x for x <= 0, exactly 0 below -87.
inline __m512 ExpNonPositive(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(ExpOfReduced(x, n), n));
}

// float32 -> bfloat16, rounding to nearest even (as XLA's convert), for the lanes in `lanes`.
inline void StoreBF16(uint16_t* out, __m512 x, __mmask16 lanes) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  _mm256_mask_storeu_epi16(out, lanes, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

inline __m512 LoadBF16(const uint16_t* in, __mmask16 lanes) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, in));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

inline __mmask16 Lanes(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1);
}

// p = softmax(s + bias) over n values, in bfloat16; s is overwritten.
inline void SoftmaxRow(float* s, const float* bias, int64_t n, uint16_t* p) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = Lanes(n - j);
    const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, s + j), _mm512_maskz_loadu_ps(lanes, bias + j));
    _mm512_mask_storeu_ps(s + j, lanes, x);
    top = _mm512_mask_max_ps(top, lanes, top, x);
  }
  const __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = Lanes(n - j);
    const __m512 e = ExpNonPositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, s + j), row_max));
    _mm512_mask_storeu_ps(s + j, lanes, e);
    total = _mm512_mask_add_ps(total, lanes, total, e);
  }
  const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = Lanes(n - j);
    StoreBF16(p + j, _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, s + j), inverse), lanes);
  }
}

// row_dot[r] = rowsum(dO * O) and dO in bfloat16, for out_grad dO and o O [rows, n] (float32).
inline void OutGradRows(const float* out_grad, const float* o, int64_t rows, int64_t n, uint16_t* dout,
                        float* row_dot) {
  for (int64_t r = 0; r < rows; ++r) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 lanes = Lanes(n - j);
      const __m512 g = _mm512_maskz_loadu_ps(lanes, out_grad + r * n + j);
      sum = _mm512_fmadd_ps(g, _mm512_maskz_loadu_ps(lanes, o + r * n + j), sum);
      StoreBF16(dout + r * n + j, g, lanes);
    }
    row_dot[r] = _mm512_reduce_add_ps(sum);
  }
}

// ds = p * (dp - row_dot[r]) in bfloat16 by rows, for p (bfloat16) and dp (float32) [rows, n].
inline void ScoreGradRows(const uint16_t* p, const float* dp, const float* row_dot, int64_t rows, int64_t n,
                          uint16_t* ds) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 dot = _mm512_set1_ps(row_dot[r]);
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 lanes = Lanes(n - j);
      const __m512 grad = _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, dp + r * n + j), dot);
      StoreBF16(ds + r * n + j, _mm512_mul_ps(LoadBF16(p + r * n + j, lanes), grad), lanes);
    }
  }
}

}  // namespace avx512

#endif  // JAXRM_KERNELS_AVX512_H_
