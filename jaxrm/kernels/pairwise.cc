// The Bradley-Terry loss and its derivatives in one pass over the pairs, as XLA FFI custom calls:
//
//   jaxrm_bradley_terry:  loss[i] = -log sigma(d[i]),  d[i] = chosen[i] - rejected[i] - margin[i / run],
//                         and its derivatives  d_chosen[i] = d loss[i] / d chosen[i] = -sigma(-d[i]),
//                         d_rejected[i] = d loss[i] / d rejected[i] = d loss[i] / d margin = sigma(-d[i])
//
// float32 buffers of any shape, read as flat arrays; margin has any count of elements that divides the pairs'
// count, run = pairs / margins consecutive pairs sharing each (one margin for all; one per pair; one per row
// of a vmapped batch). With a = |d| and e = exp(-a), one exponential and one logarithm serve every output:
//
//   loss       = max(-d, 0) + log1p(e)                    (no overflow for any d)
//   sigma(-d)  = d >= 0 ? e / (1 + e) : 1 / (1 + e)       (both branches give 1/2 at d = 0)
//
// XLA:CPU (jax 0.10) runs the loss and its gradient as five passes over the pairs, with a single-threaded reduction
// carrying the exp and log1p; here each pair is read once and each output written once, so the call is bound
// by memory, not arithmetic. The loop is plain C++ written to vectorise: exp and log are Cephes'
// single-precision polynomials (relative error ~1e-7); on x86-64 Linux the compiler emits AVX-512, AVX2 and
// baseline versions of it (target_clones) and the loader picks the widest this CPU runs.
//
// Work runs on the calling thread and on XLA's intra-op thread pool, in chunks claimed one at a time.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

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

JAXRM_INLINE float FromBits(int32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// e^x for -87 < x <= 0: x = n ln2 + r with |r| <= ln2 / 2, a degree-7 polynomial in r, times 2^n.
JAXRM_INLINE float ExpNonPositive(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  float r = x - n * 0.693359375f;  // ln2 in two parts, the first exact in float32
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  return y * FromBits((static_cast<int32_t>(n) + 127) << 23);
}

// log(1 + e) for 0 <= e <= 1, without rounding 1 + e: log(1 + f) + k ln2 with f = e, k = 0 up to sqrt(2) - 1,
// else f = (e - 1) / 2, k = 1 (both f exact), and log(1 + f) = f - f^2/2 + f^3 P(f) on f in [-0.293, 0.415].
JAXRM_INLINE float Log1pUnit(float e) {
  const bool high = e > 0.41421356f;
  const float f = high ? (e - 1.0f) * 0.5f : e;
  const float k = high ? 1.0f : 0.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + k * -2.12194440e-4f - 0.5f * z;
  return f + y + k * 0.693359375f;
}

// Pairs [begin, end): the loss and both derivatives. With kOneMargin, margin[0] serves them all.
template <bool kOneMargin>
JAXRM_VECTOR_CLONES void BradleyTerryPairs(const float* __restrict chosen, const float* __restrict rejected,
                                           const float* __restrict margin, float* __restrict loss,
                                           float* __restrict d_chosen, float* __restrict d_rejected, int64_t begin,
                                           int64_t end) {
  const float one_margin = margin[0];
  for (int64_t i = begin; i < end; ++i) {
    const float d = chosen[i] - rejected[i] - (kOneMargin ? one_margin : margin[i]);
    const float a = d < 0.0f ? -d : d;
    const bool live = a < 87.0f;  // below e^-87, e = 0 (float32 has no normal number there); NaN is not live
    // Everything is computed for every pair and then selected, and NaN is carried by arithmetic (nan_or_zero is
    // NaN for a NaN d, else 0, infinities included): with no condition around a store or a call, the AVX2 clone
    // compiles to plain vector code (with selects written into the stores, GCC emits masked stores, which are
    // microcoded on AMD and made this loop several times slower there).
    const float e_live = ExpNonPositive(live ? -a : 0.0f);
    const float e = live ? e_live : 0.0f;
    const float nan_or_zero = std::min(a, 1.0f) * 0.0f;  // std::min(NaN, 1) is NaN
    const float reciprocal = 1.0f / (1.0f + e);
    const float sigma = d >= 0.0f ? e * reciprocal : reciprocal;
    loss[i] = (d < 0.0f ? -d : 0.0f) + Log1pUnit(e) + nan_or_zero;
    d_chosen[i] = nan_or_zero - sigma;
    d_rejected[i] = sigma + nan_or_zero;
  }
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

ffi::Error BradleyTerry(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> chosen, ffi::Buffer<ffi::F32> rejected,
                        ffi::Buffer<ffi::F32> margin, ffi::ResultBuffer<ffi::F32> loss_buffer,
                        ffi::ResultBuffer<ffi::F32> d_chosen_buffer, ffi::ResultBuffer<ffi::F32> d_rejected_buffer) {
  const int64_t count = chosen.element_count(), margins = margin.element_count();
  if (rejected.element_count() != count || margins == 0 || count % margins != 0)
    return ffi::Error::InvalidArgument("jaxrm_bradley_terry: chosen and rejected must have the same size, and "
                                       "margin a size that divides it");
  if (count == 0) return ffi::Error::Success();
  const float *c = chosen.typed_data(), *r = rejected.typed_data(), *m = margin.typed_data();
  float *loss = loss_buffer->typed_data(), *d_chosen = d_chosen_buffer->typed_data(),
        *d_rejected = d_rejected_buffer->typed_data();
  const int64_t run = count / margins;
  ForEachChunk(pool, count, [=](int64_t begin, int64_t end) {
    if (run == 1) return BradleyTerryPairs<false>(c, r, m, loss, d_chosen, d_rejected, begin, end);
    for (int64_t i = begin, stop; i < end; i = stop) {  // pieces of the chunk that share one margin
      stop = std::min(end, (i / run + 1) * run);
      BradleyTerryPairs<true>(c, r, m + i / run, loss, d_chosen, d_rejected, i, stop);
    }
  });
  return ffi::Error::Success();
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
