// The Bradley-Terry loss and its derivatives in one pass over the pairs, as XLA FFI custom calls:
//
//   jaxrm_bradley_terry:  loss[i] = -log sigma(d[i]),  d[i] = chosen[i] - rejected[i] - margin[i / run],
//                         and its derivatives  d_chosen[i] = d loss[i] / d chosen[i] = -sigma(-d[i]),
//                         d_rejected[i] = d loss[i] / d rejected[i] = d loss[i] / d margin = sigma(-d[i])
//
//   jaxrm_bradley_terry_sum:  total[j] = s sum_i loss[i] over row j's pairs (no loss written), and both derivatives
//                             times s, where s = 1, or 1 / (pairs in a row) with the attribute mean: the gradient of
//                             the sum or the mean in the same pass, each derivative written once
//   jaxrm_bradley_terry_loss, jaxrm_bradley_terry_sum_loss:  the loss, or its totals, alone (forward passes)
//
// float32 buffers of any shape, read as flat arrays; margin has any count of elements that divides the pairs'
// count, run = pairs / margins consecutive pairs sharing each (one margin for all; one per pair; one per row
// of a vmapped batch), and so has total, whose rows are pairs / totals consecutive pairs (one total for a call, or
// one per row of a vmapped batch). With a = |d| and e = exp(-a), one exponential serves every output:
//
//   loss       = max(-d, 0) + log1p(e)                    (no overflow for any d)
//   sigma(-d)  = d >= 0 ? e / (1 + e) : 1 / (1 + e)       (both branches give 1/2 at d = 0)
//
// and log1p(e) = 2 atanh(e / (2 + e)), an odd polynomial (the AVX-512 loop shares its quotient's division with
// sigma's).
//
// XLA:CPU (jax 0.10) runs the loss and its gradient as five passes over the pairs, with a single-threaded reduction
// carrying the exp and log1p; here each pair is read once and each output written once. The loops are plain C++
// written to vectorise: exp is Cephes' single-precision polynomial and atanh a fitted one (relative error
// <= 2.2e-7 in all); on x86-64 Linux the compiler emits AVX-512, AVX2 and baseline versions of them (target_clones)
// and the loader picks the widest this CPU runs. They run in two passes over blocks of pairs that stay in L1 (see
// kBlock), and stream large outputs past the cache. On a CPU with AVX-512F the same formulas run from intrinsics
// instead (BradleyTerryPairs16; JAXRM_LOSS_KERNEL=portable keeps the plain loops).
//
// Work runs on the calling thread and on XLA's intra-op thread pool, in chunks claimed one at a time.

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <immintrin.h>

#include "avx512.h"
#endif

namespace ffi = xla::ffi;

namespace {

#if defined(__x86_64__) && defined(__linux__)
#define JAXRM_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define JAXRM_VECTOR_CLONES
#endif
// Inlined into each clone, so that it is compiled for that clone's instructions.
#define JAXRM_INLINE inline __attribute__((always_inline))

constexpr int64_t kChunk = 1 << 15;  // pairs per claim: 128 KiB of each array

JAXRM_INLINE float FloatFromBits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

JAXRM_INLINE uint32_t BitsOfFloat(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

// e^x for -87.3 < x <= 0 (Cephes' expf): x = n ln2 + r with |r| <= ln2 / 2, a degree-7 polynomial in r, times 2^n.
// n is rounded by adding 1.5 * 2^23, which leaves it in the low bits of t: 2^n's bits are (bits(t) + 127) << 23
// in unsigned arithmetic (the 1.5 * 2^23 shifts out), with no float-to-int conversion (undefined for NaN in C++).
// The polynomial is Cephes' p(r) r^2 + r + 1, with p of degree 5 evaluated in Estrin's scheme (three independent
// pairs of terms, then r^2 and r^4), whose dependency chain is half that of Horner's rule.
JAXRM_INLINE float ExpNonPositive(float x) {
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  float r = x - n * 0.693359375f;  // ln2 in two parts, the first exact in float32
  r = r - n * -2.12194440e-4f;
  const float r2 = r * r;
  const float p = (1.9875691500e-4f * r + 1.3981999507e-3f) * (r2 * r2) +
                  ((8.3334519073e-3f * r + 4.1665795894e-2f) * r2 + (1.6666665459e-1f * r + 5.0000001201e-1f));
  return (p * r2 + (r + 1.0f)) * FloatFromBits((BitsOfFloat(t) + 127u) << 23);
}

// e^-|d|, and 0 where |d| >= 87 (e^-87 is near float32's smallest normal number); NaN for a NaN d, whose
// comparison is false.
JAXRM_INLINE float ExpOfMinusAbs(float d) {
  const float a = std::fabs(d);
  return a >= 87.0f ? 0.0f : ExpNonPositive(-a);
}

// 2 atanh(h / 2) = log((2 + h) / (2 - h)) for 0 <= h <= 2/3: h + h^3 Q(h^2), Q of degree 3 fitted to relative error
// 4.5e-9 (iteratively reweighted least squares on Chebyshev nodes), evaluated in Estrin's scheme. With
// h = 2e / (2 + e), it is log(1 + e) for 0 <= e <= 1, and small e keeps its relative precision (no 1 + e is
// rounded before the logarithm; and h, unlike e / (2 + e), is a normal number for every e >= e^-87, where XLA's
// threads flush subnormals to zero).
JAXRM_INLINE float TwiceAtanhOfHalf(float h) {
  const float z = h * h;
  const float q = (5.471105e-4f * z + 2.1876397e-3f) * (z * z) + (1.2506728e-2f * z + 8.333302e-2f);
  return h + h * z * q;
}

// The portable loops run in blocks of kBlock pairs, in two passes through scratch arrays in L1: the differences d
// and e = e^-|d| first, then the outputs from them. One loop doing both is bound by its dependency chain, about a
// hundred cycles from the loads to the loss, of which the out-of-order core holds only a few iterations at once:
// on an AMD EPYC Zen 3 (AVX2, one thread, data in L1) it took 11.0-13.1 ns per eight pairs with the loss and both
// derivatives, where the two passes take 6.5-8.5 (the loss alone: 7.4-9.4 against 5.4-7.5), and 10^7 pairs in
// cache on both cores 8.8 against 6.2 ms. Estrin's scheme in both polynomials and two divisions in place of one
// shared one (each on its own chain) shorten the chain further.
constexpr int64_t kBlock = 256;

// Pass one: d and e^-|d| of n pairs. With kOneMargin, margin[0] serves them all.
template <bool kOneMargin>
JAXRM_VECTOR_CLONES void DifferencesAndExponentials(const float* __restrict chosen, const float* __restrict rejected,
                                                    const float* __restrict margin, float* __restrict d,
                                                    float* __restrict e, int64_t n) {
  const float one_margin = margin[0];
  for (int64_t i = 0; i < n; ++i) {
    d[i] = chosen[i] - rejected[i] - (kOneMargin ? one_margin : margin[i]);
    e[i] = ExpOfMinusAbs(d[i]);
  }
}

// Pass two: the loss and both derivatives of n pairs from d and e,
//   loss = max(-d, 0) + 2 atanh(e / (2 + e)),   sigma(-d) = (d >= 0 ? e : 1) / (1 + e),
// within 2.2e-7 relative of float64 at every d (a dense sweep over [-100, 100]). Every value is computed for every
// pair and the conditions are selects between values, which -fno-trapping-math lets the compiler vectorise without
// masks (masked stores are microcoded on AMD); each select puts NaN on the side a false comparison takes, so a
// NaN d gives NaN in every output.
JAXRM_INLINE float LossFrom(float d, float e) {
  return std::max(-d, 0.0f) + TwiceAtanhOfHalf((e + e) / (2.0f + e));  // std::max(NaN, 0) is NaN
}

// The derivatives are scaled by scale (1, or the 1 / N of a mean).
JAXRM_VECTOR_CLONES void LossAndDerivatives(const float* __restrict d, const float* __restrict e,
                                            float* __restrict loss, float* __restrict d_chosen,
                                            float* __restrict d_rejected, float scale, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float sigma = scale * ((d[i] >= 0.0f ? e[i] : 1.0f) / (1.0f + e[i]));
    loss[i] = LossFrom(d[i], e[i]);
    d_chosen[i] = -sigma;
    d_rejected[i] = sigma;
  }
}

// Pass two of a forward pass: the loss alone.
JAXRM_VECTOR_CLONES void LossOnly(const float* __restrict d, const float* __restrict e, float* __restrict loss,
                                  int64_t n) {
  for (int64_t i = 0; i < n; ++i) loss[i] = LossFrom(d[i], e[i]);
}

// The sum of n floats (a block's losses) in float64. Sixteen float32 lanes first, each of which adds every
// sixteenth value (kBlock / 16 of them): a loop the compiler vectorises without reassociating anything, where one
// float64 accumulator would be one scalar chain of additions.
JAXRM_VECTOR_CLONES double SumOf(const float* __restrict x, int64_t n) {
  float lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) lanes[k] += x[i + k];
  double total = 0.0;
  for (int k = 0; k < 16; ++k) total += lanes[k];
  for (; i < n; ++i) total += x[i];
  return total;
}

// Copies n floats with non-temporal stores (x86-64's SSE ones, 16-byte aligned, scalar at either end), which write
// the lines without reading them into the cache first; a plain copy elsewhere.
void StreamCopy(float* __restrict to, const float* __restrict from, int64_t n) {
#if defined(__x86_64__)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(to + i) & 15); ++i) to[i] = from[i];
  for (; i + 4 <= n; i += 4) _mm_stream_ps(to + i, _mm_loadu_ps(from + i));
  for (; i < n; ++i) to[i] = from[i];
#else
  std::memcpy(to, from, n * sizeof(float));
#endif
}

// Makes streamed stores visible to the thread that sees the chunk done.
void FenceStreams() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// Pairs [begin, end) in blocks of kBlock: pass one into scratch, then pass_two(d, e, to, n) writing the kOutputs
// outputs' block to `to`: the outputs themselves, or scratch streamed out to them after it.
template <bool kOneMargin, size_t kOutputs, typename PassTwo>
void ForEachBlock(const float* chosen, const float* rejected, const float* margin,
                  const std::array<float*, kOutputs>& outputs, int64_t begin, int64_t end, bool stream,
                  PassTwo pass_two) {
  alignas(64) float d[kBlock], e[kBlock], scratch[std::max<size_t>(kOutputs, 1)][kBlock];
  for (int64_t i = begin; i < end; i += kBlock) {
    const int64_t n = std::min(kBlock, end - i);
    DifferencesAndExponentials<kOneMargin>(chosen + i, rejected + i, kOneMargin ? margin : margin + i, d, e, n);
    std::array<float*, kOutputs> to;
    for (size_t k = 0; k < kOutputs; ++k) to[k] = stream ? scratch[k] : outputs[k] + i;
    pass_two(d, e, to, n);
    if (stream)
      for (size_t k = 0; k < kOutputs; ++k) StreamCopy(outputs[k] + i, scratch[k], n);
  }
  if (stream) FenceStreams();
}

// Pairs [begin, end): both derivatives and the loss, written to loss; or with kSum, the derivatives times scale and
// the losses' sum, returned (loss is not written). Without kSum the result is 0.
template <bool kOneMargin, bool kSum>
double BradleyTerryPairs(const float* chosen, const float* rejected, const float* margin, float* loss,
                         float* d_chosen, float* d_rejected, float scale, int64_t begin, int64_t end, bool stream) {
  if constexpr (kSum) {
    alignas(64) float block_loss[kBlock];
    double total = 0.0;
    ForEachBlock<kOneMargin, 2>(chosen, rejected, margin, {d_chosen, d_rejected}, begin, end, stream,
                                [&](const float* d, const float* e, const std::array<float*, 2>& to, int64_t n) {
                                  LossAndDerivatives(d, e, block_loss, to[0], to[1], scale, n);
                                  total += SumOf(block_loss, n);
                                });
    return total;
  } else {
    ForEachBlock<kOneMargin, 3>(chosen, rejected, margin, {loss, d_chosen, d_rejected}, begin, end, stream,
                                [](const float* d, const float* e, const std::array<float*, 3>& to, int64_t n) {
                                  LossAndDerivatives(d, e, to[0], to[1], to[2], 1.0f, n);
                                });
    return 0.0;
  }
}

// Pairs [begin, end): the loss alone, written to loss; or with kSum, its sum returned (nothing written).
template <bool kOneMargin, bool kSum>
double BradleyTerryLossPairs(const float* chosen, const float* rejected, const float* margin, float* loss,
                             int64_t begin, int64_t end, bool stream) {
  if constexpr (kSum) {
    alignas(64) float block_loss[kBlock];
    double total = 0.0;
    ForEachBlock<kOneMargin, 0>(chosen, rejected, margin, {}, begin, end, false,
                                [&](const float* d, const float* e, const std::array<float*, 0>&, int64_t n) {
                                  LossOnly(d, e, block_loss, n);
                                  total += SumOf(block_loss, n);
                                });
    return total;
  } else {
    ForEachBlock<kOneMargin, 1>(chosen, rejected, margin, {loss}, begin, end, stream,
                                [](const float* d, const float* e, const std::array<float*, 1>& to, int64_t n) {
                                  LossOnly(d, e, to[0], n);
                                });
    return 0.0;
  }
}

#if defined(__x86_64__)
// The same formulas with AVX-512 intrinsics, sixteen pairs at a time in the same two passes over blocks (one division
// shared by the loss and sigma, Horner's rule: the form measured on Zen 4), writing the outputs from kStreamPairs on
// straight from the registers with non-temporal stores, which skip the read-for-ownership of every output line (120 MB at
// 10^7 pairs) that a plain store costs. Measured on an AMD EPYC Zen 4
// (two cores), value_and_grad of the sum: 9.0 -> 7.7 ms at 10^7 pairs, 2.3 -> 1.5 ms at 2 * 10^6; below ~10^6
// pairs the outputs stay in cache for whatever reads them next, and plain stores are faster (0.67 against 0.77 ms).
#define JAXRM_AVX512_CODE __attribute__((target("avx512f"), always_inline))
#define JAXRM_AVX512 JAXRM_AVX512_CODE inline

// ExpOfMinusAbs: e^-|d|, 0 where |d| >= 87, NaN for NaN (the comparison "not >= 87" holds for NaN).
JAXRM_AVX512 __m512 ExpOfMinusAbs16(__m512 d) {
  const __m512 x = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(d), _mm512_set1_epi32(INT32_MIN)));  // -|d|
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(12582912.0f));
  const __m512 n = _mm512_sub_ps(t, _mm512_set1_ps(12582912.0f));
  const __mmask16 in_range = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLE_UQ);
  return _mm512_maskz_scalef_ps(in_range, avx512::ExpOfReduced(x, n), n);  // e^r 2^n
}

JAXRM_AVX512 __m512 TwiceAtanhOfHalf16(__m512 h) {
  const __m512 z = _mm512_mul_ps(h, h);
  __m512 q = _mm512_set1_ps(5.471105e-4f);
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(2.1876397e-3f));
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(1.2506728e-2f));
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(8.333302e-2f));
  return _mm512_fmadd_ps(_mm512_mul_ps(h, z), q, h);
}

// max(-d, 0): vmaxps returns its second operand when either is NaN, so -d goes second.
JAXRM_AVX512 __m512 PositivePart16(__m512 minus_d) { return _mm512_max_ps(_mm512_setzero_ps(), minus_d); }

// d for the sixteen pairs from i (those of mask), with the margin broadcast under kOneMargin.
template <bool kOneMargin>
JAXRM_AVX512 __m512 Differences16(const float* chosen, const float* rejected, const float* margin, int64_t i,
                                  __mmask16 mask) {
  const __m512 m = kOneMargin ? _mm512_set1_ps(margin[0]) : _mm512_maskz_loadu_ps(mask, margin + i);
  return _mm512_sub_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, chosen + i), _mm512_maskz_loadu_ps(mask, rejected + i)),
                       m);
}

// Stores sixteen lanes at to + i: streamed when whole and asked for (to + i is then 64-byte aligned), else masked.
JAXRM_AVX512 void Store16(float* to, int64_t i, __m512 value, __mmask16 mask, bool stream) {
  if (stream) _mm512_stream_ps(to + i, value);
  else _mm512_mask_storeu_ps(to + i, mask, value);
}

// Runs outputs(i, d, e, mask, stream) over the pairs [begin, end) sixteen at a time, given their d and e = e^-|d|:
// in blocks of kBlock pairs, pass one writing the block's d and e to L1, then pass two handing them over, as the
// portable loops do (one pass per sixteen pairs is one dependency chain from the loads to the outputs, which the core
// overlaps across too few iterations: on an AMD EPYC Zen 4, one thread, data in L1, 1.1-1.3 ns per pair for the loss
// and both derivatives where the two passes take 0.56-0.74). With stream, a masked head up to the 64-byte boundary of
// aligned_to, streamed whole vectors, and a masked tail (then a store fence, so that the pairs are visible to the
// thread that sees this chunk done). Whole vectors go through with the mask a constant, so that their loads and
// (unstreamed) stores compile to plain ones.
template <bool kOneMargin, typename Outputs>
JAXRM_AVX512 void ForEach16(const float* aligned_to, const float* chosen, const float* rejected, const float* margin,
                            int64_t begin, int64_t end, bool stream, Outputs outputs) {
  alignas(64) float d[kBlock], e[kBlock];
  const auto pass_one = [&](int64_t b, int64_t j, __mmask16 mask) JAXRM_AVX512_CODE {
    const __m512 dj = Differences16<kOneMargin>(chosen, rejected, margin, b + j, mask);
    _mm512_store_ps(d + j, dj);
    _mm512_store_ps(e + j, ExpOfMinusAbs16(dj));
  };
  const int64_t head =
      stream ? std::min<int64_t>(end - begin, (-(reinterpret_cast<uintptr_t>(aligned_to + begin)) & 63) / 4) : 0;
  for (int64_t b = begin, stop; b < end; b = stop) {
    stop = b == begin && head ? begin + head : std::min(end, b + kBlock);
    const int64_t n = stop - b, whole = n & ~int64_t{15};
    const __mmask16 all = 0xffff, tail = static_cast<__mmask16>((1u << (n - whole)) - 1);
    for (int64_t j = 0; j < whole; j += 16) pass_one(b, j, all);
    if (tail) pass_one(b, whole, tail);
    for (int64_t j = 0; j < whole; j += 16) outputs(b + j, _mm512_load_ps(d + j), _mm512_load_ps(e + j), all, stream);
    if (tail) outputs(b + whole, _mm512_load_ps(d + whole), _mm512_load_ps(e + whole), tail, false);
  }
  if (stream) _mm_sfence();
}

// A sum of vectors' lanes in float64, as SumOf: each lane adds sixteen values in float32 (one masked addition per
// vector), then goes into two float64 vectors of eight.
struct Sum16 {
  __m512 part;
  __m512d low, high;
  int pending = 0;

  JAXRM_AVX512 Sum16() : part(_mm512_setzero_ps()), low(_mm512_setzero_pd()), high(_mm512_setzero_pd()) {}
  JAXRM_AVX512 void Add(__m512 value, __mmask16 mask) {
    part = _mm512_mask_add_ps(part, mask, part, value);
    if (++pending == 16) Flush();
  }
  JAXRM_AVX512 void Flush() {
    low = _mm512_add_pd(low, _mm512_cvtps_pd(_mm512_castps512_ps256(part)));
    high = _mm512_add_pd(high, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(part), 1))));
    part = _mm512_setzero_ps();
    pending = 0;
  }
  JAXRM_AVX512 double Total() {
    Flush();
    return _mm512_reduce_add_pd(_mm512_add_pd(low, high));
  }
};

// BradleyTerryPairs with AVX-512 (the same outputs and result).
template <bool kOneMargin, bool kSum>
__attribute__((target("avx512f"))) double BradleyTerryPairs16(const float* chosen, const float* rejected,
                                                              const float* margin, float* loss, float* d_chosen,
                                                              float* d_rejected, float scale, int64_t begin,
                                                              int64_t end, bool stream) {
  Sum16 total;
  const __m512 scale16 = _mm512_set1_ps(scale);
  ForEach16<kOneMargin>(d_chosen, chosen, rejected, margin, begin, end, stream,
                        [&](int64_t i, __m512 d, __m512 e, __mmask16 mask, bool whole) JAXRM_AVX512_CODE {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 one_plus_e = _mm512_add_ps(one, e), two_plus_e = _mm512_add_ps(_mm512_set1_ps(2.0f), e);
    const __m512 w = _mm512_div_ps(one, _mm512_mul_ps(one_plus_e, two_plus_e));
    __m512 reciprocal = _mm512_mul_ps(two_plus_e, w);
    reciprocal = _mm512_fmadd_ps(reciprocal, _mm512_fnmadd_ps(one_plus_e, reciprocal, one), reciprocal);
    const __mmask16 non_negative = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_GE_OQ);
    __m512 sigma = _mm512_mul_ps(_mm512_mask_blend_ps(non_negative, one, e), reciprocal);
    const __m512 h = _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(e, e), one_plus_e), w);
    const __m512 minus_d = _mm512_sub_ps(_mm512_setzero_ps(), d);
    const __m512 value = _mm512_add_ps(PositivePart16(minus_d), TwiceAtanhOfHalf16(h));
    if constexpr (kSum) {
      total.Add(value, mask);
      sigma = _mm512_mul_ps(sigma, scale16);
    } else {
      Store16(loss, i, value, mask, whole);
    }
    Store16(d_chosen, i, _mm512_sub_ps(_mm512_setzero_ps(), sigma), mask, whole);
    Store16(d_rejected, i, sigma, mask, whole);
  });
  return kSum ? total.Total() : 0.0;
}

// BradleyTerryLossPairs with AVX-512.
template <bool kOneMargin, bool kSum>
__attribute__((target("avx512f"))) double BradleyTerryLossPairs16(const float* chosen, const float* rejected,
                                                                  const float* margin, float* loss, int64_t begin,
                                                                  int64_t end, bool stream) {
  Sum16 total;
  ForEach16<kOneMargin>(kSum ? chosen : loss, chosen, rejected, margin, begin, end, stream && !kSum,
                        [&](int64_t i, __m512 d, __m512 e, __mmask16 mask, bool whole) JAXRM_AVX512_CODE {
              const __m512 h = _mm512_div_ps(_mm512_add_ps(e, e), _mm512_add_ps(_mm512_set1_ps(2.0f), e));
              const __m512 value =
                  _mm512_add_ps(PositivePart16(_mm512_sub_ps(_mm512_setzero_ps(), d)), TwiceAtanhOfHalf16(h));
              if constexpr (kSum) total.Add(value, mask);
              else Store16(loss, i, value, mask, whole);
            });
  return kSum ? total.Total() : 0.0;
}
#endif

// Whether the AVX-512 loops run: on a CPU with AVX-512F, unless JAXRM_LOSS_KERNEL=portable (read on every call, so
// that tests can compare both on one machine).
bool UseAvx512() {
#if defined(__x86_64__)
  static const bool supported = __builtin_cpu_supports("avx512f");
  const char* setting = std::getenv("JAXRM_LOSS_KERNEL");
  return supported && !(setting && std::strcmp(setting, "portable") == 0);
#else
  return false;
#endif
}

// From this many pairs on the outputs are streamed past the cache; below, they stay in it for whatever reads them
// next. The AVX-512 loops' threshold was measured on an AMD EPYC Zen 4 (above); the portable loops', on a Zen 3
// (AVX2, 32 MiB of L3), value_and_grad of the sum: streamed 2.15 against 1.92 ms at 2 * 10^6 pairs (24 MB of
// outputs, which fit in the L3), no clear difference at 4 * 10^6, 6.6-7.0 against 7.9-8.1 ms at 6 * 10^6, 9.7
// against 10.1 at 10^7.
constexpr int64_t kStreamPairs = 3 << 19, kPortableStreamPairs = 1 << 22;

// Whether the outputs of count pairs are streamed: from the threshold on; on the AVX-512 loops only with every
// output at the same offset from a 64-byte boundary (ForEach16 aligns the first and streams all).
bool Streams(int64_t count, bool avx512, std::initializer_list<const float*> outputs) {
  if (!avx512) return count >= kPortableStreamPairs;
  const uintptr_t offset = reinterpret_cast<uintptr_t>(*outputs.begin()) & 63;
  for (const float* output : outputs)
    if ((reinterpret_cast<uintptr_t>(output) & 63) != offset) return false;
  return count >= kStreamPairs;
}

// Runs item(k) for k in [0, items), on the calling thread and XLA's pool, the items claimed one at a time.
template <typename Item>
void ParallelFor(ffi::ThreadPool& pool, int64_t items, Item item) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto participate = [progress, items, item] {
    for (int64_t k; (k = progress->next.fetch_add(1)) < items;) {
      item(k);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([participate] { participate(); });
  participate();
  while (progress->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

// The sum of pairs(margin_pointer, begin, end, one_margin) over [begin, end): one call when every pair has its own
// margin, else one per piece of it that shares one (runs of `run` pairs).
template <typename Pairs>
double ForMarginRuns(const float* margin, int64_t run, int64_t begin, int64_t end, const Pairs& pairs) {
  if (run == 1) return pairs(margin, begin, end, std::false_type{});
  double total = 0.0;
  for (int64_t i = begin, stop; i < end; i = stop) {
    stop = std::min(end, (i / run + 1) * run);
    total += pairs(margin + i / run, i, stop, std::true_type{});
  }
  return total;
}

// That chosen and rejected have one size, which margin's size and the number of rows (totals) divide.
ffi::Error CheckSizes(const char* name, const ffi::Buffer<ffi::F32>& chosen, const ffi::Buffer<ffi::F32>& rejected,
                      const ffi::Buffer<ffi::F32>& margin, int64_t rows) {
  const int64_t count = chosen.element_count(), margins = margin.element_count();
  if (rejected.element_count() != count || margins == 0 || count % margins != 0 || rows == 0 || count % rows != 0)
    return ffi::Error::InvalidArgument(std::string(name) + ": chosen and rejected must have the same size, and "
                                       "margin (and total) a size that divides it");
  return ffi::Error::Success();
}

// Checks the sizes, then runs pairs(margin_pointer, begin, end, one_margin) over the pairs in parallel, kChunk at a
// time.
template <typename Pairs>
ffi::Error ForEachPair(const char* name, ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& chosen,
                       const ffi::Buffer<ffi::F32>& rejected, const ffi::Buffer<ffi::F32>& margin, Pairs pairs) {
  if (ffi::Error error = CheckSizes(name, chosen, rejected, margin, 1); error.failure()) return error;
  const int64_t count = chosen.element_count(), run = count / margin.element_count();
  const float* m = margin.typed_data();
  ParallelFor(pool, (count + kChunk - 1) / kChunk, [=](int64_t c) {
    ForMarginRuns(m, run, c * kChunk, std::min(count, (c + 1) * kChunk), pairs);
  });
  return ffi::Error::Success();
}

// The length of each of the rows that total's elements sum: count / rows pairs.
int64_t RowLength(const ffi::Buffer<ffi::F32>& chosen, int64_t rows) { return chosen.element_count() / rows; }

// Checks the sizes, then writes each row's total, scale times the sum of pairs(...) (as in ForEachPair, each
// returning the sum of its losses) over the row's pairs, computed in parallel: rows of more than kChunk pairs in
// pieces of kChunk, whose float64 partial sums are added in order afterwards (so the total is the same from run to
// run); shorter rows kChunk / length of them to a claim, each row whole.
template <typename Pairs>
ffi::Error SumEachRow(const char* name, ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& chosen,
                      const ffi::Buffer<ffi::F32>& rejected, const ffi::Buffer<ffi::F32>& margin,
                      ffi::ResultBuffer<ffi::F32>& total, double scale, Pairs pairs) {
  const int64_t rows = total->element_count();
  if (rows == 0 && chosen.element_count() == 0) return ffi::Error::Success();  // vmapped over no rows
  if (ffi::Error error = CheckSizes(name, chosen, rejected, margin, rows); error.failure()) return error;
  const int64_t length = RowLength(chosen, rows), run = chosen.element_count() / margin.element_count();
  const float* m = margin.typed_data();
  float* totals = total->typed_data();
  if (length > kChunk) {
    const int64_t pieces = (length + kChunk - 1) / kChunk;
    std::vector<double> partial(rows * pieces);
    ParallelFor(pool, rows * pieces, [&, m](int64_t k) {
      const int64_t row = k / pieces, begin = row * length + (k % pieces) * kChunk;
      partial[k] = ForMarginRuns(m, run, begin, std::min(begin + kChunk, (row + 1) * length), pairs);
    });
    for (int64_t row = 0; row < rows; ++row) {
      double sum = 0.0;
      for (int64_t k = 0; k < pieces; ++k) sum += partial[row * pieces + k];
      totals[row] = static_cast<float>(scale * sum);
    }
  } else {
    const int64_t per_claim = length ? kChunk / length : rows;
    ParallelFor(pool, (rows + per_claim - 1) / per_claim, [=](int64_t k) {
      for (int64_t row = k * per_claim; row < std::min(rows, (k + 1) * per_claim); ++row)
        totals[row] = static_cast<float>(scale * ForMarginRuns(m, run, row * length, (row + 1) * length, pairs));
    });
  }
  return ffi::Error::Success();
}

// 1, or for a mean 1 / the pairs in a row (NaN for empty rows, as 0 / 0; the derivatives are empty then).
double Scale(const ffi::Buffer<ffi::F32>& chosen, int64_t rows, bool mean) {
  if (!mean) return 1.0;
  const int64_t length = rows ? RowLength(chosen, rows) : 0;
  return length ? 1.0 / static_cast<double>(length) : std::nan("");
}

// The loss and both derivatives (kSum false), or each row's total and the derivatives times scale (kSum).
template <bool kSum>
double LossAndDerivativesOf(const float* c, const float* r, const float* m, float* loss, float* d_chosen,
                            float* d_rejected, float scale, int64_t begin, int64_t end, bool avx512, bool stream,
                            bool one_margin) {
#if defined(__x86_64__)
  if (avx512)
    return one_margin ? BradleyTerryPairs16<true, kSum>(c, r, m, loss, d_chosen, d_rejected, scale, begin, end, stream)
                      : BradleyTerryPairs16<false, kSum>(c, r, m, loss, d_chosen, d_rejected, scale, begin, end, stream);
#endif
  return one_margin ? BradleyTerryPairs<true, kSum>(c, r, m, loss, d_chosen, d_rejected, scale, begin, end, stream)
                    : BradleyTerryPairs<false, kSum>(c, r, m, loss, d_chosen, d_rejected, scale, begin, end, stream);
}

template <bool kSum>
double LossOf(const float* c, const float* r, const float* m, float* loss, int64_t begin, int64_t end, bool avx512,
              bool stream, bool one_margin) {
#if defined(__x86_64__)
  if (avx512)
    return one_margin ? BradleyTerryLossPairs16<true, kSum>(c, r, m, loss, begin, end, stream)
                      : BradleyTerryLossPairs16<false, kSum>(c, r, m, loss, begin, end, stream);
#endif
  return one_margin ? BradleyTerryLossPairs<true, kSum>(c, r, m, loss, begin, end, stream)
                    : BradleyTerryLossPairs<false, kSum>(c, r, m, loss, begin, end, stream);
}

ffi::Error BradleyTerry(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> chosen, ffi::Buffer<ffi::F32> rejected,
                        ffi::Buffer<ffi::F32> margin, ffi::ResultBuffer<ffi::F32> loss_buffer,
                        ffi::ResultBuffer<ffi::F32> d_chosen_buffer, ffi::ResultBuffer<ffi::F32> d_rejected_buffer) {
  const float *c = chosen.typed_data(), *r = rejected.typed_data();
  float *loss = loss_buffer->typed_data(), *d_chosen = d_chosen_buffer->typed_data(),
        *d_rejected = d_rejected_buffer->typed_data();
  const bool avx512 = UseAvx512(), stream = Streams(chosen.element_count(), avx512, {loss, d_chosen, d_rejected});
  return ForEachPair("jaxrm_bradley_terry", pool, chosen, rejected, margin,
                     [=](const float* m, int64_t begin, int64_t end, auto one_margin) {
                       return LossAndDerivativesOf<false>(c, r, m, loss, d_chosen, d_rejected, 1.0f, begin, end,
                                                          avx512, stream, one_margin);
                     });
}

ffi::Error BradleyTerrySum(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> chosen, ffi::Buffer<ffi::F32> rejected,
                           ffi::Buffer<ffi::F32> margin, ffi::ResultBuffer<ffi::F32> total,
                           ffi::ResultBuffer<ffi::F32> d_chosen_buffer, ffi::ResultBuffer<ffi::F32> d_rejected_buffer,
                           bool mean) {
  const float *c = chosen.typed_data(), *r = rejected.typed_data();
  float *d_chosen = d_chosen_buffer->typed_data(), *d_rejected = d_rejected_buffer->typed_data();
  const double scale = Scale(chosen, total->element_count(), mean);
  const bool avx512 = UseAvx512(), stream = Streams(chosen.element_count(), avx512, {d_chosen, d_rejected});
  return SumEachRow("jaxrm_bradley_terry_sum", pool, chosen, rejected, margin, total, scale,
                    [=, slope_scale = static_cast<float>(scale)](const float* m, int64_t begin, int64_t end,
                                                                 auto one_margin) {
                      return LossAndDerivativesOf<true>(c, r, m, nullptr, d_chosen, d_rejected, slope_scale, begin,
                                                        end, avx512, stream, one_margin);
                    });
}

ffi::Error BradleyTerryLoss(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> chosen, ffi::Buffer<ffi::F32> rejected,
                            ffi::Buffer<ffi::F32> margin, ffi::ResultBuffer<ffi::F32> loss_buffer) {
  const float *c = chosen.typed_data(), *r = rejected.typed_data();
  float* loss = loss_buffer->typed_data();
  const bool avx512 = UseAvx512(), stream = Streams(chosen.element_count(), avx512, {loss});
  return ForEachPair("jaxrm_bradley_terry_loss", pool, chosen, rejected, margin,
                     [=](const float* m, int64_t begin, int64_t end, auto one_margin) {
                       return LossOf<false>(c, r, m, loss, begin, end, avx512, stream, one_margin);
                     });
}

ffi::Error BradleyTerrySumLoss(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> chosen, ffi::Buffer<ffi::F32> rejected,
                               ffi::Buffer<ffi::F32> margin, ffi::ResultBuffer<ffi::F32> total, bool mean) {
  const float *c = chosen.typed_data(), *r = rejected.typed_data();
  const bool avx512 = UseAvx512();
  return SumEachRow("jaxrm_bradley_terry_sum_loss", pool, chosen, rejected, margin, total,
                    Scale(chosen, total->element_count(), mean),
                    [=](const float* m, int64_t begin, int64_t end, auto one_margin) {
                      return LossOf<true>(c, r, m, nullptr, begin, end, avx512, false, one_margin);
                    });
}

// What every handler here is called with: XLA's thread pool, then chosen, rejected and margin.
auto BindPairs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()   // chosen
      .Arg<ffi::Buffer<ffi::F32>>()   // rejected
      .Arg<ffi::Buffer<ffi::F32>>();  // margin
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrm_bradley_terry, BradleyTerry,
                              BindPairs()
                                  .Ret<ffi::Buffer<ffi::F32>>()    // loss
                                  .Ret<ffi::Buffer<ffi::F32>>()    // d_chosen
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d_rejected

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrm_bradley_terry_sum, BradleyTerrySum,
                              BindPairs()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // total, one per row
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_chosen
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_rejected
                                  .Attr<bool>("mean"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrm_bradley_terry_loss, BradleyTerryLoss,
                              BindPairs().Ret<ffi::Buffer<ffi::F32>>());  // loss

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrm_bradley_terry_sum_loss, BradleyTerrySumLoss,
                              BindPairs()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // total, one per row
                                  .Attr<bool>("mean"));
