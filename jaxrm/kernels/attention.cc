// Softmax attention and its gradients fused per item, as XLA FFI custom calls for XLA:CPU, in float32 and (where
// the build has AVX512-BF16) with bfloat16 operands:
//
//   jaxrm_attention[_bf16][_inference]:  S = Q K^T + bias      P = softmax(S) by rows      O = P V
//   jaxrm_attention[_bf16]_backward:     dV = P^T dO    dP = dO V^T    dS = P * (dP - rowsum(dO * O))
//                                        dQ = dS K      dK = dS^T Q
//
// An item is a batch row and a key/value head: Q [Qn, D] (the G query heads that share the key/value head one
// after another, T positions each, already scaled), K and V [S, D], P [Qn, S]; the bias [T, S] is shared by the
// heads of a batch row, so query row r takes bias row r mod T. One thread runs an item's products, softmax and
// backward back to back, so that its scores stay in that core's cache and XLA runs no pass over them.
//
// XLA:CPU (jax 0.10) runs attention's products as batched YNNPACK products of one item each, at a third of the
// rate of its large products (256 x 256 x 32 per item: ~50 GFLOP/s on two AMD EPYC Zen 3 cores, against ~140
// for a dense layer's), and its softmax and backward as separate passes over [B, K, Qn, S] float32 tensors.
// In float32 every product is one register-blocked loop, C[m, n] = sum_k op(A)[m, k] B[k, n] over rows of B,
// written with GCC's vector extensions (eight floats), compiled for the vector instructions of the CPU that builds
// it (attention.py passes -mavx2 -mfma where the CPU has them: target_clones gave GCC 12 worse code, its
// accumulators spilled, at half the speed). The bfloat16 items ("bfloat16 operands on AVX512-BF16" below) use
// the dot-product instruction instead, and avx512.h's softmax and row passes (shared with the AMX kernel).
//
// Work runs on the calling thread and on XLA's intra-op thread pool, one item per claim.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512BF16__)
#include "avx512.h"
#endif

namespace ffi = xla::ffi;

namespace {

#define JAXRM_INLINE inline __attribute__((always_inline))

constexpr int kLanes = 8;
typedef float Vec __attribute__((vector_size(32)));
typedef int32_t Ints __attribute__((vector_size(32)));
typedef float UnalignedVec __attribute__((vector_size(32), aligned(4)));

JAXRM_INLINE Vec Load(const float* p) { return *reinterpret_cast<const UnalignedVec*>(p); }
JAXRM_INLINE void Store(float* p, Vec v) { *reinterpret_cast<UnalignedVec*>(p) = v; }
JAXRM_INLINE Vec Splat(float x) { return Vec{x, x, x, x, x, x, x, x}; }

JAXRM_INLINE float Sum(Vec v) {
  float total = 0.0f;
  for (int i = 0; i < kLanes; ++i) total += v[i];
  return total;
}

JAXRM_INLINE float Max(Vec v) {
  float top = v[0];
  for (int i = 1; i < kLanes; ++i) top = std::max(top, v[i]);
  return top;
}

// Element (row, column) of op(A): a[row * lda + column], or with kTransposed a[column * lda + row].
template <bool kTransposed, typename T>
JAXRM_INLINE T At(const T* a, int64_t lda, int64_t row, int64_t column) {
  return kTransposed ? a[column * lda + row] : a[row * lda + column];
}

// C[m0 + i, n0 + 8 j ...] = sum_k op(A)[m0 + i, k] B[k, n0 + 8 j ...] for kRows rows and kVectors vectors of
// columns: kRows x kVectors accumulators in registers, one row of B loaded per k (depth >= 1; the first product
// initialises the sums, which keeps them in registers from start to end).
template <bool kTransposed, int kRows, int kVectors>
JAXRM_INLINE void Block(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t m0,
                        int64_t n0, int64_t depth) {
  Vec sum[kRows][kVectors], row[kVectors];
  for (int j = 0; j < kVectors; ++j) row[j] = Load(b + n0 + j * kLanes);
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kVectors; ++j) sum[i][j] = Splat(At<kTransposed>(a, lda, m0 + i, 0)) * row[j];
  for (int64_t k = 1; k < depth; ++k) {
    for (int j = 0; j < kVectors; ++j) row[j] = Load(b + k * ldb + n0 + j * kLanes);
    for (int i = 0; i < kRows; ++i) {
      const Vec x = Splat(At<kTransposed>(a, lda, m0 + i, k));
      for (int j = 0; j < kVectors; ++j) sum[i][j] += x * row[j];
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kVectors; ++j) Store(c + (m0 + i) * ldc + n0 + j * kLanes, sum[i][j]);
}

template <bool kTransposed, int kVectors>
JAXRM_INLINE void Rows(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                       int64_t n0, int64_t depth) {
  int64_t m = 0;
  for (; m + 6 <= rows; m += 6) Block<kTransposed, 6, kVectors>(a, lda, b, ldb, c, ldc, m, n0, depth);
  switch (rows - m) {
    case 5: return Block<kTransposed, 5, kVectors>(a, lda, b, ldb, c, ldc, m, n0, depth);
    case 4: return Block<kTransposed, 4, kVectors>(a, lda, b, ldb, c, ldc, m, n0, depth);
    case 3: return Block<kTransposed, 3, kVectors>(a, lda, b, ldb, c, ldc, m, n0, depth);
    case 2: return Block<kTransposed, 2, kVectors>(a, lda, b, ldb, c, ldc, m, n0, depth);
    case 1: return Block<kTransposed, 1, kVectors>(a, lda, b, ldb, c, ldc, m, n0, depth);
  }
}

// C [rows, columns] = op(A) [rows, depth] B [depth, columns], B and C row-major and dense, columns a multiple of
// eight: column panels of sixteen (one of eight at the end), each swept over every row while it stays in L1.
template <bool kTransposed>
JAXRM_INLINE void Multiply(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t columns,
                           int64_t depth) {
  if (depth == 0) return std::fill(c, c + rows * columns, 0.0f);
  int64_t n = 0;
  for (; n + 2 * kLanes <= columns; n += 2 * kLanes)
    Rows<kTransposed, 2>(a, lda, b, columns, c, columns, rows, n, depth);
  if (n < columns) Rows<kTransposed, 1>(a, lda, b, columns, c, columns, rows, n, depth);
}

// x [rows, columns] -> into [columns, rows].
JAXRM_INLINE void Transpose(const float* x, int64_t rows, int64_t columns, float* into) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < columns; ++c) into[c * rows + r] = x[r * columns + c];
}

// e^x for x <= 0 (Cephes' expf: x = n ln2 + r, a degree-7 polynomial in r, times 2^n; relative error ~1e-7),
// and exactly 0 from -87 down. n is rounded by adding 1.5 * 2^23, which leaves it in the low bits of t, so 2^n's
// bits are (bits(t) + 127) << 23.
JAXRM_INLINE Vec ExpNonPositive(Vec x) {
  const auto live = x > Splat(-87.0f);
  x = live ? x : Splat(-87.0f);
  const Vec t = x * 1.44269504088896341f + 12582912.0f;
  const Vec n = t - 12582912.0f;
  Vec r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  Vec y = Splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const Ints scale = ((Ints)t + 127) << 23;
  return live ? y * (Vec)scale : Splat(0.0f);
}

// p = softmax(s + bias) over the n values of a row (n a multiple of eight); p may be s.
JAXRM_INLINE void SoftmaxRow(const float* s, const float* bias, int64_t n, float* p) {
  Vec top = Splat(-INFINITY);
  for (int64_t j = 0; j < n; j += kLanes) {
    const Vec x = Load(s + j) + Load(bias + j);
    top = x > top ? x : top;
  }
  const float row_max = Max(top);
  Vec total = {};
  for (int64_t j = 0; j < n; j += kLanes) {
    const Vec e = ExpNonPositive(Load(s + j) + Load(bias + j) - row_max);
    Store(p + j, e);
    total += e;
  }
  const float inverse = 1.0f / Sum(total);
  for (int64_t j = 0; j < n; j += kLanes) Store(p + j, Load(p + j) * inverse);
}

struct Shape {
  int64_t items, queries, keys, depth, positions, items_per_bias;  // I, Qn, S, D, T, I / (bias rows)
};

// An item's scratch, one per thread: it grows to the largest item seen and is kept for the next call.
thread_local std::vector<float> scratch;

float* Scratch(int64_t count) {
  if (static_cast<int64_t>(scratch.size()) < count) scratch.resize(count);
  return scratch.data();
}

// p [Qn, S] may be null (inference): the probabilities then stay in the thread's scratch.
void ForwardItem(const Shape& shape, const float* q, const float* k, const float* v, const float* bias, float* o,
                 float* p) {
  const int64_t qn = shape.queries, s = shape.keys, d = shape.depth;
  float* key_t = Scratch(d * s + (p ? 0 : qn * s));
  if (!p) p = key_t + d * s;
  Transpose(k, s, d, key_t);
  Multiply<false>(q, d, key_t, p, qn, s, d);  // S = Q K^T
  for (int64_t r = 0; r < qn; ++r) SoftmaxRow(p + r * s, bias + (r % shape.positions) * s, s, p + r * s);
  Multiply<false>(p, s, v, o, qn, d, s);  // O = P V
}

void BackwardItem(const Shape& shape, const float* q, const float* k, const float* v, const float* p,
                  const float* o, const float* out_grad, float* dq, float* dk, float* dv) {
  const int64_t qn = shape.queries, s = shape.keys, d = shape.depth;
  float* value_t = Scratch(d * s + qn * s);
  float* ds = value_t + d * s;  // dP, then dS in place
  Transpose(v, s, d, value_t);
  Multiply<true>(p, s, out_grad, dv, s, d, qn);       // dV = P^T dO
  Multiply<false>(out_grad, d, value_t, ds, qn, s, d);  // dP = dO V^T
  for (int64_t r = 0; r < qn; ++r) {
    Vec dot = {};
    for (int64_t j = 0; j < d; j += kLanes) dot += Load(out_grad + r * d + j) * Load(o + r * d + j);
    const float row_dot = Sum(dot);
    for (int64_t j = 0; j < s; j += kLanes)
      Store(ds + r * s + j, Load(p + r * s + j) * (Load(ds + r * s + j) - row_dot));
  }
  Multiply<false>(ds, s, k, dq, qn, d, s);  // dQ = dS K
  Multiply<true>(ds, s, q, dk, s, d, qn);   // dK = dS^T Q
}

#if defined(__AVX512BF16__)
// ---- bfloat16 operands on AVX512-BF16 ------------------------------------------------------------------------
//
// The same items with bfloat16 Q, K, V (P, dO and dS rounded to bfloat16 for the products that read them, as XLA's
// bfloat16 attention and the AMX kernel round them), on the dot-product instruction vdpbf16ps: lane j of an
// accumulator adds a[2j] b[2j] + a[2j + 1] b[2j + 1], two bfloat16 products summed in float32. A product
// C = op(A) B then runs over pairs of its contraction: op(A)'s pair (A[m, 2k], A[m, 2k + 1]) broadcast as one 32-bit
// value, B packed as pairs of its rows, B2[k, n] = (B[2k, n], B[2k + 1, n]) in the low and high halves. Each item's
// operands are packed so into the thread's scratch (a row-major bfloat16 matrix already holds the pairs of its rows'
// neighbouring columns); every product is one register-blocked loop of 12 rows x 32 columns of accumulators (24 of
// the 32 vector registers: the block of YNNPACK's bfloat16 product on this instruction, which XLA runs here).

constexpr int kPairLanes = 16;  // float32 lanes of a 512-bit vector; columns (keys, head size) are multiples of it
typedef uint32_t Pair __attribute__((may_alias));  // two bfloat16 values, the even one in the low half

JAXRM_INLINE const Pair* Pairs(const uint16_t* x) { return reinterpret_cast<const Pair*>(x); }

// x [rows, columns] bfloat16 -> into [rows / 2, columns]: the pairs of its rows.
void PairRows(const uint16_t* x, int64_t rows, int64_t columns, Pair* into) {
  for (int64_t r = 0; r + 1 < rows; r += 2)
    for (int64_t c = 0; c < columns; ++c)
      into[r / 2 * columns + c] = x[r * columns + c] | static_cast<uint32_t>(x[(r + 1) * columns + c]) << 16;
}

// x [rows, columns] bfloat16, as pairs [rows, columns / 2] -> into [columns / 2, rows]: the pairs of x^T's rows.
void TransposePairs(const uint16_t* x, int64_t rows, int64_t columns, Pair* into) {
  const Pair* pairs = Pairs(x);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < columns / 2; ++c) into[c * rows + r] = pairs[r * (columns / 2) + c];
}

// C[m0 + i, n0 + 16 j ...] = sum over pairs k of op(A)'s pair (m0 + i, k) . B2[k, n0 + 16 j ...].
template <bool kTransposed, int kRows, int kVectors>
JAXRM_INLINE void PairBlock(const Pair* a, int64_t lda, const Pair* b, int64_t ldb, float* c, int64_t ldc, int64_t m0,
                            int64_t n0, int64_t pairs) {
  __m512 sum[kRows][kVectors];
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kVectors; ++j) sum[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < pairs; ++k) {
    __m512bh row[kVectors];
    for (int j = 0; j < kVectors; ++j) row[j] = (__m512bh)_mm512_loadu_si512(b + k * ldb + n0 + j * kPairLanes);
    for (int i = 0; i < kRows; ++i) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(At<kTransposed>(a, lda, m0 + i, k)));
      for (int j = 0; j < kVectors; ++j) sum[i][j] = _mm512_dpbf16_ps(sum[i][j], x, row[j]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kVectors; ++j) _mm512_storeu_ps(c + (m0 + i) * ldc + n0 + j * kPairLanes, sum[i][j]);
}

// Rows [m, rows) of C: blocks of 12 rows, then the rest (fewer than 12) as one block of its own height.
template <bool kTransposed, int kVectors, int kRows = 12>
JAXRM_INLINE void PairRowsOf(const Pair* a, int64_t lda, const Pair* b, int64_t ldb, float* c, int64_t ldc,
                             int64_t m, int64_t rows, int64_t n0, int64_t pairs) {
  if constexpr (kRows == 12) {
    for (; m + 12 <= rows; m += 12) PairBlock<kTransposed, 12, kVectors>(a, lda, b, ldb, c, ldc, m, n0, pairs);
    PairRowsOf<kTransposed, kVectors, 11>(a, lda, b, ldb, c, ldc, m, rows, n0, pairs);
  } else if constexpr (kRows > 0) {
    if (rows - m == kRows) return PairBlock<kTransposed, kRows, kVectors>(a, lda, b, ldb, c, ldc, m, n0, pairs);
    PairRowsOf<kTransposed, kVectors, kRows - 1>(a, lda, b, ldb, c, ldc, m, rows, n0, pairs);
  }
}

// C [rows, columns] = op(A) B for B2 [pairs, columns] and C row-major and dense, columns a multiple of 16; op(A)'s pair
// (m, k) is a[m * lda + k], or with kTransposed a[k * lda + m]. Column panels of 32 (one of 16 at the end).
template <bool kTransposed>
void PairMultiply(const Pair* a, int64_t lda, const Pair* b, float* c, int64_t rows, int64_t columns, int64_t pairs) {
  int64_t n = 0;
  for (; n + 2 * kPairLanes <= columns; n += 2 * kPairLanes)
    PairRowsOf<kTransposed, 2>(a, lda, b, columns, c, columns, 0, rows, n, pairs);
  if (n < columns) PairRowsOf<kTransposed, 1>(a, lda, b, columns, c, columns, 0, rows, n, pairs);
}

thread_local std::vector<uint32_t> pair_scratch;

Pair* PairScratch(int64_t count) {
  if (static_cast<int64_t>(pair_scratch.size()) < count) pair_scratch.resize(count);
  return pair_scratch.data();
}

// As ForwardItem, bfloat16 operands and P (p may be null: inference).
void ForwardItemBF16(const Shape& shape, const uint16_t* q, const uint16_t* k, const uint16_t* v, const float* bias,
                     float* o, uint16_t* p) {
  const int64_t qn = shape.queries, s = shape.keys, d = shape.depth;
  float* scores = Scratch(qn * s);
  Pair* next = PairScratch(d / 2 * s + s / 2 * d + (p ? 0 : qn * s / 2));
  auto take = [&next](int64_t count) { return std::exchange(next, next + count); };
  Pair* key_t = take(d / 2 * s);
  Pair* value_pairs = take(s / 2 * d);
  if (!p) p = reinterpret_cast<uint16_t*>(take(qn * s / 2));
  TransposePairs(k, s, d, key_t);
  PairRows(v, s, d, value_pairs);
  PairMultiply<false>(Pairs(q), d / 2, key_t, scores, qn, s, d / 2);  // S = Q K^T
  for (int64_t r = 0; r < qn; ++r)
    avx512::SoftmaxRow(scores + r * s, bias + (r % shape.positions) * s, s, p + r * s);
  PairMultiply<false>(Pairs(p), s / 2, value_pairs, o, qn, d, s / 2);  // O = P V
}

// As BackwardItem, bfloat16 operands and P; dO and dS rounded to bfloat16 for the products.
void BackwardItemBF16(const Shape& shape, const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* p,
                      const float* o, const float* out_grad, float* dq, float* dk, float* dv) {
  const int64_t qn = shape.queries, s = shape.keys, d = shape.depth;
  float* dp = Scratch(qn * s + qn);  // dP, then the rows' rowsum(dO * O)
  float* row_dot = dp + qn * s;
  Pair* next = PairScratch(d * s + 3 * qn * d / 2 + qn * s);
  auto take = [&next](int64_t count) { return std::exchange(next, next + count); };
  Pair* value_t = take(d / 2 * s);
  Pair* key_pairs = take(s / 2 * d);
  Pair* query_pairs = take(qn / 2 * d);
  Pair* out_grad_pairs = take(qn / 2 * d);
  uint16_t* dout = reinterpret_cast<uint16_t*>(take(qn * d / 2));  // dO [Qn, D] in bfloat16
  Pair* pairs_of_p = take(qn / 2 * s);                               // P's row pairs, then dS's
  uint16_t* ds = reinterpret_cast<uint16_t*>(take(qn * s / 2));    // dS [Qn, S] in bfloat16
  avx512::OutGradRows(out_grad, o, qn, d, dout, row_dot);
  TransposePairs(v, s, d, value_t);
  PairRows(k, s, d, key_pairs);
  PairRows(q, qn, d, query_pairs);
  PairRows(dout, qn, d, out_grad_pairs);
  PairRows(p, qn, s, pairs_of_p);
  PairMultiply<true>(pairs_of_p, s, out_grad_pairs, dv, s, d, qn / 2);  // dV = P^T dO
  PairMultiply<false>(Pairs(dout), d / 2, value_t, dp, qn, s, d / 2);   // dP = dO V^T
  avx512::ScoreGradRows(p, dp, row_dot, qn, s, ds);
  PairRows(ds, qn, s, pairs_of_p);
  PairMultiply<false>(Pairs(ds), s / 2, key_pairs, dq, qn, d, s / 2);  // dQ = dS K
  PairMultiply<true>(pairs_of_p, s, query_pairs, dk, s, d, qn / 2);    // dK = dS^T Q
}
#endif  // __AVX512BF16__

// Runs item(i) for i in [0, count) on the calling thread and on XLA's intra-op pool, one item per claim.
template <typename Item>
void ForEachItem(ffi::ThreadPool& pool, int64_t count, Item item) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto participate = [progress, count, item] {
    for (int64_t i; (i = progress->next.fetch_add(1)) < count;) {
      item(i);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([participate] { participate(); });
  participate();
  while (progress->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

// Checks q [I, Qn, D], k and v [I, S, D] and bias [B, T, S] (T divides Qn, B divides I, S and D multiples of the
// vector width `lanes`, and for bfloat16 an even Qn: its products contract over pairs of queries).
ffi::Error ReadShape(const char* name, ffi::Span<const int64_t> q, ffi::Span<const int64_t> k,
                     ffi::Span<const int64_t> v, ffi::Span<const int64_t> bias, int64_t lanes, int64_t query_multiple,
                     Shape& shape) {
  if (q.size() != 3 || k.size() != 3 || v.size() != 3 || bias.size() != 3)
    return ffi::Error::InvalidArgument(std::string(name) + " takes q, k, v and bias of rank 3");
  shape = {q[0], q[1], k[1], q[2], bias[1], 0};
  if (k[0] != shape.items || v[0] != shape.items || k[2] != shape.depth || v[1] != shape.keys ||
      v[2] != shape.depth || bias[2] != shape.keys || bias[0] < 1 || shape.items % bias[0] != 0 ||
      shape.positions < 1 || shape.queries % shape.positions != 0 || shape.keys < 1 || shape.keys % lanes != 0 ||
      shape.depth % lanes != 0 || shape.queries % query_multiple != 0)
    return ffi::Error::InvalidArgument(std::string(name) + ": operand shapes do not match");
  shape.items_per_bias = shape.items / bias[0];
  return ffi::Error::Success();
}

// What differs between the float32 and the bfloat16 kernels: the names, the shapes they take, their items.
template <ffi::DataType kType>
struct Kernel;

template <>
struct Kernel<ffi::F32> {
  static constexpr const char* kName = "jaxrm_attention";
  static constexpr int64_t kLanesOf = kLanes, kQueryMultiple = 1;
  static constexpr auto kForward = ForwardItem;
  static constexpr auto kBackward = BackwardItem;
};

#if defined(__AVX512BF16__)
template <>
struct Kernel<ffi::BF16> {
  static constexpr const char* kName = "jaxrm_attention_bf16";
  static constexpr int64_t kLanesOf = kPairLanes, kQueryMultiple = 2;
  static constexpr auto kForward = ForwardItemBF16;
  static constexpr auto kBackward = BackwardItemBF16;
};
#endif

template <ffi::DataType kType>
using Value = ffi::NativeType<kType>;  // float, or uint16_t holding bfloat16

// The forward pass; with probabilities == nullptr (inference) each item's P stays in the thread's scratch.
template <ffi::DataType kType>
ffi::Error Forward(ffi::ThreadPool& pool, ffi::Buffer<kType>& q, ffi::Buffer<kType>& k, ffi::Buffer<kType>& v,
                   ffi::Buffer<ffi::F32>& bias, float* out, Value<kType>* probabilities) {
  using K = Kernel<kType>;
  Shape shape;
  if (ffi::Error error = ReadShape(K::kName, q.dimensions(), k.dimensions(), v.dimensions(), bias.dimensions(),
                                   K::kLanesOf, K::kQueryMultiple, shape);
      error.failure())
    return error;
  const Value<kType>*qs = q.typed_data(), *ks = k.typed_data(), *vs = v.typed_data();
  const float* biases = bias.typed_data();
  const int64_t qd = shape.queries * shape.depth, sd = shape.keys * shape.depth, qk = shape.queries * shape.keys;
  ForEachItem(pool, shape.items, [=](int64_t i) {
    K::kForward(shape, qs + i * qd, ks + i * sd, vs + i * sd,
                biases + (i / shape.items_per_bias) * shape.positions * shape.keys, out + i * qd,
                probabilities ? probabilities + i * qk : nullptr);
  });
  return ffi::Error::Success();
}

template <ffi::DataType kType>
ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<kType> q, ffi::Buffer<kType> k, ffi::Buffer<kType> v,
                     ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<kType> p) {
  return Forward(pool, q, k, v, bias, o->typed_data(), p->typed_data());
}

template <ffi::DataType kType>
ffi::Error AttentionInference(ffi::ThreadPool pool, ffi::Buffer<kType> q, ffi::Buffer<kType> k, ffi::Buffer<kType> v,
                              ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> o) {
  return Forward<kType>(pool, q, k, v, bias, o->typed_data(), nullptr);
}

template <ffi::DataType kType>
ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<kType> q, ffi::Buffer<kType> k, ffi::Buffer<kType> v,
                             ffi::Buffer<kType> p, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> out_grad,
                             ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                             ffi::ResultBuffer<ffi::F32> dv) {
  using K = Kernel<kType>;
  Shape shape;
  const auto q_dims = q.dimensions(), p_dims = p.dimensions();
  // p [I, Qn, S] stands in for the bias's shape: one bias row per query, T = Qn.
  if (ffi::Error error = ReadShape(K::kName, q_dims, k.dimensions(), v.dimensions(), p_dims, K::kLanesOf,
                                   K::kQueryMultiple, shape);
      error.failure())
    return error;
  const auto o_dims = o.dimensions(), g_dims = out_grad.dimensions();
  if (p_dims[0] != shape.items || p_dims[1] != shape.queries || o_dims.size() != 3 || g_dims.size() != 3 ||
      !std::equal(o_dims.begin(), o_dims.end(), q_dims.begin()) ||
      !std::equal(g_dims.begin(), g_dims.end(), q_dims.begin()))
    return ffi::Error::InvalidArgument(std::string(K::kName) + "_backward: operand shapes do not match");
  const Value<kType>*qs = q.typed_data(), *ks = k.typed_data(), *vs = v.typed_data(), *ps = p.typed_data();
  const float *os = o.typed_data(), *gs = out_grad.typed_data();
  float *dqs = dq->typed_data(), *dks = dk->typed_data(), *dvs = dv->typed_data();
  const int64_t qd = shape.queries * shape.depth, sd = shape.keys * shape.depth, qk = shape.queries * shape.keys;
  ForEachItem(pool, shape.items, [=](int64_t i) {
    K::kBackward(shape, qs + i * qd, ks + i * sd, vs + i * sd, ps + i * qk, os + i * qd, gs + i * qd, dqs + i * qd,
                 dks + i * sd, dvs + i * sd);
  });
  return ffi::Error::Success();
}

// The operands every call takes first: q, k, v.
template <ffi::DataType kType>
auto BindItems() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<kType>>()            // q
      .template Arg<ffi::Buffer<kType>>()   // k
      .template Arg<ffi::Buffer<kType>>();  // v
}

template <ffi::DataType kType>
auto BindInputs() {
  return BindItems<kType>().template Arg<ffi::Buffer<ffi::F32>>();  // bias
}

template <ffi::DataType kType>
auto BindBackward() {
  return BindItems<kType>()
      .template Arg<ffi::Buffer<kType>>()       // p
      .template Arg<ffi::Buffer<ffi::F32>>()    // o
      .template Arg<ffi::Buffer<ffi::F32>>()    // out_grad
      .template Ret<ffi::Buffer<ffi::F32>>()    // dq
      .template Ret<ffi::Buffer<ffi::F32>>()    // dk
      .template Ret<ffi::Buffer<ffi::F32>>();   // dv
}

}  // namespace

// o, p; o; dq, dk, dv.
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrm_attention, Attention<ffi::F32>,
                              BindInputs<ffi::F32>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrm_attention_inference, AttentionInference<ffi::F32>,
                              BindInputs<ffi::F32>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrm_attention_backward, AttentionBackward<ffi::F32>, BindBackward<ffi::F32>());

#if defined(__AVX512BF16__)
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrm_attention_bf16, Attention<ffi::BF16>,
                              BindInputs<ffi::BF16>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::BF16>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrm_attention_bf16_inference, AttentionInference<ffi::BF16>,
                              BindInputs<ffi::BF16>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrm_attention_bf16_backward, AttentionBackward<ffi::BF16>, BindBackward<ffi::BF16>());
#endif
