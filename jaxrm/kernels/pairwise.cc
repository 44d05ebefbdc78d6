// The Bradley-Terry loss and its derivatives in one pass over the pairs, as XLA FFI custom calls:
//
//   jaxrm_bradley_terry:  loss[i] = -log sigma(d[i]),  d[i] = chosen[i] - rejected[i] - margin[i / run],
//                         and its derivatives  d_chosen[i] = d loss[i] / d chosen[i] = -sigma(-d[i]),
//                         d_rejected[i] = d loss[i] / d rejected[i] = d loss[i] / d margin = sigma(-d[i])
//
// float32 buffers of any shape, read as flat arrays; margin has any count of elements that divides the pairs'
// count, run = pairs / margins consecutive pairs sharing each (one margin for all; one per pair; one per row
// of a vmapped batch). With a = |d| and e = exp(-a), one exponential serves every output:
//
//   loss       = max(-d, 0) + log1p(e)                    (no overflow for any d)
//   sigma(-d)  = d >= 0 ? e / (1 + e) : 1 / (1 + e)       (both branches give 1/2 at d = 0)
//
// and log1p(e) = 2 atanh(e / (2 + e)), an odd polynomial whose quotient shares sigma's division.
//
// XLA:CPU (jax 0.10) runs the loss and its gradient as five passes over the pairs, with a single-threaded reduction
// carrying the exp and log1p; here each pair is read once and each output written once, so the call is bound
// by memory, not arithmetic. The loop is plain C++ written to vectorise: exp is Cephes' single-precision
// polynomial and atanh a fitted one (relative error <= 3.1e-7 in all); on x86-64 Linux the compiler emits
// AVX-512, AVX2 and baseline versions of it (target_clones) and the loader picks the widest this CPU runs. On a CPU
// with AVX-512F the same arithmetic runs from intrinsics instead, which stream large outputs past the cache
// (BradleyTerryPairs16; JAXRM_LOSS_KERNEL=portable keeps the plain loop).
//
// Work runs on the calling thread and on XLA's intra-op thread pool, in chunks claimed one at a time.

#include <algorithm>
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

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <immintrin.h>
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
JAXRM_INLINE float ExpNonPositive(float x) {
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  float r = x - n * 0.693359375f;  // ln2 in two parts, the first exact in float32
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  return y * FloatFromBits((BitsOfFloat(t) + 127u) << 23);
}

// e^-|d|, and 0 where |d| >= 87 (e^-87 is near float32's smallest normal number); NaN for a NaN d, whose
// comparison is false.
JAXRM_INLINE float ExpOfMinusAbs(float d) {
  const float a = std::fabs(d);
  return a >= 87.0f ? 0.0f : ExpNonPositive(-a);
}

// 2 atanh(h / 2) = log((2 + h) / (2 - h)) for 0 <= h <= 2/3: h + h^3 Q(h^2), Q of degree 3 fitted to relative error
// 4.5e-9 (iteratively reweighted least squares on Chebyshev nodes). With h = 2e / (2 + e), it is log(1 + e) for
// 0 <= e <= 1, and small e keeps its relative precision (no 1 + e is rounded before the logarithm; and h, unlike
// e / (2 + e), is a normal number for every e >= e^-87, where XLA's threads flush subnormals to zero).
JAXRM_INLINE float TwiceAtanhOfHalf(float h) {
  const float z = h * h;
  float q = 5.471105e-4f;
  q = q * z + 2.1876397e-3f;
  q = q * z + 1.2506728e-2f;
  q = q * z + 8.333302e-2f;
  return h + h * z * q;
}

// Pairs [begin, end): the loss and both derivatives. With kOneMargin, margin[0] serves them all.
//
// With e = e^-|d| (ExpOfMinusAbs), one division gives both quotients: w = 1 / ((1 + e)(2 + e)),
// 1 / (1 + e) = (2 + e) w and 2e / (2 + e) = 2e (1 + e) w; then
//   loss = max(-d, 0) + 2 atanh(e / (2 + e)),   sigma(-d) = (d >= 0 ? e : 1) / (1 + e),
// within 3.1e-7 relative of float64 at every d (a dense sweep over [-100, 100]). Every value is computed for every
// pair and the conditions are selects between values, which -fno-trapping-math lets the compiler vectorise without
// masks (masked stores are microcoded on AMD); each select puts NaN on the side a false comparison takes, so a
// NaN d gives NaN in every output.
template <bool kOneMargin>
JAXRM_VECTOR_CLONES void BradleyTerryPairs(const float* __restrict chosen, const float* __restrict rejected,
                                           const float* __restrict margin, float* __restrict loss,
                                           float* __restrict d_chosen, float* __restrict d_rejected, int64_t begin,
                                           int64_t end) {
  const float one_margin = margin[0];
  for (int64_t i = begin; i < end; ++i) {
    const float d = chosen[i] - rejected[i] - (kOneMargin ? one_margin : margin[i]);
    const float e = ExpOfMinusAbs(d);
    const float one_plus_e = 1.0f + e, two_plus_e = 2.0f + e;
    const float w = 1.0f / (one_plus_e * two_plus_e);
    float reciprocal = two_plus_e * w;                                // 1 / (1 + e) to ~2 ulp, then one Newton
    reciprocal += reciprocal * (1.0f - one_plus_e * reciprocal);      // step (its residual an exact FMA): 1/2 ulp
    const float sigma = (d >= 0.0f ? e : 1.0f) * reciprocal;
    loss[i] = std::max(-d, 0.0f) + TwiceAtanhOfHalf((e + e) * one_plus_e * w);  // std::max(NaN, 0) is NaN
    d_chosen[i] = -sigma;
    d_rejected[i] = sigma;
  }
}

// Pairs [begin, end): the loss alone, for a forward pass (one quotient, h = 2e / (2 + e), and no sigma).
template <bool kOneMargin>
JAXRM_VECTOR_CLONES void BradleyTerryLossPairs(const float* __restrict chosen, const float* __restrict rejected,
                                               const float* __restrict margin, float* __restrict loss, int64_t begin,
                                               int64_t end) {
  const float one_margin = margin[0];
  for (int64_t i = begin; i < end; ++i) {
    const float d = chosen[i] - rejected[i] - (kOneMargin ? one_margin : margin[i]);
    const float e = ExpOfMinusAbs(d);
    loss[i] = std::max(-d, 0.0f) + TwiceAtanhOfHalf((e + e) / (2.0f + e));
  }
}

#if defined(__x86_64__)
// The same arithmetic with AVX-512 intrinsics, sixteen pairs at a time, for one reason: from kStreamPairs on the
// outputs are written with non-temporal stores, which skip the read-for-ownership of every output line (120 MB at
// 10^7 pairs) that a plain store costs, and no compiler emits them from plain C++. Measured on an AMD EPYC Zen 4
// (two cores), value_and_grad of the sum: 9.0 -> 7.7 ms at 10^7 pairs, 2.3 -> 1.5 ms at 2 * 10^6; below ~10^6
// pairs the outputs stay in cache for whatever reads them next, and plain stores are faster (0.67 against 0.77 ms).
#define JAXRM_AVX512_CODE __attribute__((target("avx512f"), always_inline))
#define JAXRM_AVX512 JAXRM_AVX512_CODE inline

// ExpOfMinusAbs: e^-|d|, 0 where |d| >= 87, NaN for NaN (the comparison "not >= 87" holds for NaN).
JAXRM_AVX512 __m512 ExpOfMinusAbs16(__m512 d) {
  const __m512 x = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(d), _mm512_set1_epi32(INT32_MIN)));  // -|d|
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(12582912.0f));
  const __m512 n = _mm512_sub_ps(t, _mm512_set1_ps(12582912.0f));
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __mmask16 in_range = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLE_UQ);
  return _mm512_maskz_scalef_ps(in_range, y, n);  // y 2^n, exactly the scalar version's product
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

// Runs block(i, mask, stream) over [begin, end) sixteen pairs at a time: with stream, a masked head up to the
// 64-byte boundary of aligned_to, streamed whole blocks, and a masked tail (then a store fence, so that the pairs
// are visible to the thread that sees this chunk done).
template <typename Block>
JAXRM_AVX512 void ForEach16(const float* aligned_to, int64_t begin, int64_t end, bool stream, Block block) {
  int64_t i = begin;
  if (stream) {
    const int64_t head = std::min<int64_t>(end - begin, (-(reinterpret_cast<uintptr_t>(aligned_to + begin)) & 63) / 4);
    if (head) block(i, static_cast<__mmask16>((1u << head) - 1), false);
    for (i += head; i + 16 <= end; i += 16) block(i, static_cast<__mmask16>(0xffff), true);
  } else {
    for (; i + 16 <= end; i += 16) block(i, static_cast<__mmask16>(0xffff), false);
  }
  if (i < end) block(i, static_cast<__mmask16>((1u << (end - i)) - 1), false);
  if (stream) _mm_sfence();
}

template <bool kOneMargin>
__attribute__((target("avx512f"))) void BradleyTerryPairs16(const float* chosen, const float* rejected,
                                                            const float* margin, float* loss, float* d_chosen,
                                                            float* d_rejected, int64_t begin, int64_t end,
                                                            bool stream) {
  ForEach16(loss, begin, end, stream, [=](int64_t i, __mmask16 mask, bool whole) JAXRM_AVX512_CODE {
    const __m512 d = Differences16<kOneMargin>(chosen, rejected, margin, i, mask);
    const __m512 one = _mm512_set1_ps(1.0f), e = ExpOfMinusAbs16(d);
    const __m512 one_plus_e = _mm512_add_ps(one, e), two_plus_e = _mm512_add_ps(_mm512_set1_ps(2.0f), e);
    const __m512 w = _mm512_div_ps(one, _mm512_mul_ps(one_plus_e, two_plus_e));
    __m512 reciprocal = _mm512_mul_ps(two_plus_e, w);
    reciprocal = _mm512_fmadd_ps(reciprocal, _mm512_fnmadd_ps(one_plus_e, reciprocal, one), reciprocal);
    const __mmask16 non_negative = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_GE_OQ);
    const __m512 sigma = _mm512_mul_ps(_mm512_mask_blend_ps(non_negative, one, e), reciprocal);
    const __m512 h = _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(e, e), one_plus_e), w);
    const __m512 minus_d = _mm512_sub_ps(_mm512_setzero_ps(), d);
    Store16(loss, i, _mm512_add_ps(PositivePart16(minus_d), TwiceAtanhOfHalf16(h)), mask, whole);
    Store16(d_chosen, i, _mm512_sub_ps(_mm512_setzero_ps(), sigma), mask, whole);
    Store16(d_rejected, i, sigma, mask, whole);
  });
}

template <bool kOneMargin>
__attribute__((target("avx512f"))) void BradleyTerryLossPairs16(const float* chosen, const float* rejected,
                                                                const float* margin, float* loss, int64_t begin,
                                                                int64_t end, bool stream) {
  ForEach16(loss, begin, end, stream, [=](int64_t i, __mmask16 mask, bool whole) JAXRM_AVX512_CODE {
    const __m512 d = Differences16<kOneMargin>(chosen, rejected, margin, i, mask);
    const __m512 e = ExpOfMinusAbs16(d);
    const __m512 h = _mm512_div_ps(_mm512_add_ps(e, e), _mm512_add_ps(_mm512_set1_ps(2.0f), e));
    Store16(loss, i, _mm512_add_ps(PositivePart16(_mm512_sub_ps(_mm512_setzero_ps(), d)), TwiceAtanhOfHalf16(h)),
            mask, whole);
  });
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

constexpr int64_t kStreamPairs = 3 << 19;

// Whether the AVX-512 loops stream the outputs of count pairs: from kStreamPairs on, with every output at the same
// offset from a 64-byte boundary (ForEach16 aligns the first and streams all).
bool Streams(int64_t count, std::initializer_list<const float*> outputs) {
  const uintptr_t offset = reinterpret_cast<uintptr_t>(*outputs.begin()) & 63;
  for (const float* output : outputs)
    if ((reinterpret_cast<uintptr_t>(output) & 63) != offset) return false;
  return count >= kStreamPairs;
}

// Runs chunk(begin, end) over [0, count) in pieces of kChunk, on the calling thread and XLA's pool.
template <typename Chunk>
void ForEachChunk(ffi::ThreadPool& pool, int64_t count, Chunk chunk) {
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto participate = [progress, chunks, count, chunk] {
    for (int64_t c; (c = progress->next.fetch_add(1)) < chunks;) {
      chunk(c * kChunk, std::min(count, (c + 1) * kChunk));
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([participate] { participate(); });
  participate();
  while (progress->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// Checks the shapes, then runs pairs(margin_pointer, begin, end, one_margin) over the pairs in parallel: each chunk
// whole when every pair has its own margin, else in the pieces of it that share one.
template <typename Pairs>
ffi::Error ForEachPair(const char* name, ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& chosen,
                       const ffi::Buffer<ffi::F32>& rejected, const ffi::Buffer<ffi::F32>& margin, Pairs pairs) {
  const int64_t count = chosen.element_count(), margins = margin.element_count();
  if (rejected.element_count() != count || margins == 0 || count % margins != 0)
    return ffi::Error::InvalidArgument(std::string(name) + ": chosen and rejected must have the same size, and "
                                       "margin a size that divides it");
  if (count == 0) return ffi::Error::Success();
  const float* m = margin.typed_data();
  const int64_t run = count / margins;
  ForEachChunk(pool, count, [=](int64_t begin, int64_t end) {
    if (run == 1) return pairs(m, begin, end, std::false_type{});
    for (int64_t i = begin, stop; i < end; i = stop) {
      stop = std::min(end, (i / run + 1) * run);
      pairs(m + i / run, i, stop, std::true_type{});
    }
  });
  return ffi::Error::Success();
}

ffi::Error BradleyTerry(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> chosen, ffi::Buffer<ffi::F32> rejected,
                        ffi::Buffer<ffi::F32> margin, ffi::ResultBuffer<ffi::F32> loss_buffer,
                        ffi::ResultBuffer<ffi::F32> d_chosen_buffer, ffi::ResultBuffer<ffi::F32> d_rejected_buffer) {
  const float *c = chosen.typed_data(), *r = rejected.typed_data();
  float *loss = loss_buffer->typed_data(), *d_chosen = d_chosen_buffer->typed_data(),
        *d_rejected = d_rejected_buffer->typed_data();
  const bool avx512 = UseAvx512(), stream = avx512 && Streams(chosen.element_count(), {loss, d_chosen, d_rejected});
  return ForEachPair("jaxrm_bradley_terry", pool, chosen, rejected, margin,
                     [=](const float* m, int64_t begin, int64_t end, auto one_margin) {
                       constexpr bool kOneMargin = decltype(one_margin)::value;
#if defined(__x86_64__)
                       if (avx512)
                         return BradleyTerryPairs16<kOneMargin>(c, r, m, loss, d_chosen, d_rejected, begin, end, stream);
#endif
                       BradleyTerryPairs<kOneMargin>(c, r, m, loss, d_chosen, d_rejected, begin, end);
                     });
}

ffi::Error BradleyTerryLoss(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> chosen, ffi::Buffer<ffi::F32> rejected,
                            ffi::Buffer<ffi::F32> margin, ffi::ResultBuffer<ffi::F32> loss_buffer) {
  const float *c = chosen.typed_data(), *r = rejected.typed_data();
  float* loss = loss_buffer->typed_data();
  const bool avx512 = UseAvx512(), stream = avx512 && Streams(chosen.element_count(), {loss});
  return ForEachPair("jaxrm_bradley_terry_loss", pool, chosen, rejected, margin,
                     [=](const float* m, int64_t begin, int64_t end, auto one_margin) {
                       constexpr bool kOneMargin = decltype(one_margin)::value;
#if defined(__x86_64__)
                       if (avx512) return BradleyTerryLossPairs16<kOneMargin>(c, r, m, loss, begin, end, stream);
#endif
                       BradleyTerryLossPairs<kOneMargin>(c, r, m, loss, begin, end);
                     });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrm_bradley_terry, BradleyTerry,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // chosen
                                  .Arg<ffi::Buffer<ffi::F32>>()    // rejected
                                  .Arg<ffi::Buffer<ffi::F32>>()    // margin
                                  .Ret<ffi::Buffer<ffi::F32>>()    // loss
                                  .Ret<ffi::Buffer<ffi::F32>>()    // d_chosen
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d_rejected

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrm_bradley_terry_loss, BradleyTerryLoss,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // chosen
                                  .Arg<ffi::Buffer<ffi::F32>>()    // rejected
                                  .Arg<ffi::Buffer<ffi::F32>>()    // margin
                                  .Ret<ffi::Buffer<ffi::F32>>());  // loss
