// bfloat16 x bfloat16 -> float32 matrix products on Intel AMX tiles, as XLA FFI custom calls:
//
//   jaxrm_amx_matmul:  C[i, M, N] = op(A[i]) op(B[i]),  op(X) = X or X^T,  operands bfloat16, products
//     accumulated in float32, for every i of a batch of products of one shape (a batch of one for a dense layer);
//   jaxrm_amx_attention[_backward]: softmax attention and its gradients, fused (see "Attention" below).
//
// XLA:CPU reaches the AMX tile unit for some product shapes only (a weight gradient, contracting over the
// tokens, runs at ~0.2 TFLOP/s on two Sapphire Rapids cores where oneDNN multiplies at ~2.5). This file is
// the smallest kernel that uses the tiles for every shape: both operands are copied once into tile-sized blocks (the copy also
// absorbs the transposes and pads ragged edges with zeros), then every 32 x 32 block of C is accumulated in
// four tile registers over the whole contraction, and stored once.
//
// Layouts (row-major, as XLA hands buffers to a custom call), with a leading batch axis on a, b and c:
//   transpose_a = false: a is [M, K];  true: a is [K, M]
//   transpose_b = false: b is [K, N];  true: b is [N, K]
// Packed A: for each 16-row block mb and 32-wide k block kb, a 16 x 32 bfloat16 tile, row r = row mb*16 + r.
// Packed B: for each 16-column block nb and kb, a 16 x 32 tile in AMX's pair layout ("VNNI"): tile row r holds,
//           for each of the 16 columns c, the two values B[kb*32 + 2r][c] and B[kb*32 + 2r + 1][c].
//
// Work runs on the calling thread and on XLA's intra-op thread pool, in chunks claimed one at a time.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "avx512.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 16;         // rows of every tile; columns of a C tile (float32)
constexpr int64_t kDepth = 32;        // bfloat16 values along the contraction in one tile row (64 bytes)
constexpr int64_t kTileValues = kRows * kDepth;
constexpr int kTileBytes = 64;        // bytes per tile row

// ---- Packing --------------------------------------------------------------------------------------

struct Problem {
  const uint16_t* a;
  const uint16_t* b;
  float* c;
  int64_t m, n, k;
  bool transpose_a, transpose_b;
  int64_t row_blocks, column_blocks, depth_blocks;  // tile counts along M (even), N (even), K
};

// A's value at (row, depth), zero outside the matrix.
inline uint16_t AValue(const Problem& p, int64_t row, int64_t depth) {
  if (row >= p.m || depth >= p.k) return 0;
  return p.transpose_a ? p.a[depth * p.m + row] : p.a[row * p.k + depth];
}

inline uint16_t BValue(const Problem& p, int64_t depth, int64_t column) {
  if (depth >= p.k || column >= p.n) return 0;
  return p.transpose_b ? p.b[column * p.k + depth] : p.b[depth * p.n + column];
}

// The 16 bfloat16 values at `even` and the 16 at `odd`, interleaved: (even[0], odd[0], even[1], odd[1], ...).
inline __m512i InterleavePairs(const uint16_t* even, const uint16_t* odd) {
  const __m512i order = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i low = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(even)));
  const __m512i high = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(odd)));
  return _mm512_permutex2var_epi16(low, order, high);
}

void PackATile(const Problem& p, int64_t mb, int64_t kb, uint16_t* tile) {
  const int64_t row0 = mb * kRows, depth0 = kb * kDepth;
  const bool full = row0 + kRows <= p.m && depth0 + kDepth <= p.k;
  if (full && !p.transpose_a) {
    for (int64_t r = 0; r < kRows; ++r)
      std::memcpy(tile + r * kDepth, p.a + (row0 + r) * p.k + depth0, kTileBytes);
  } else if (full) {
    // a is [K, M]. Interleaving its rows 2j and 2j + 1 gives, for each tile row r, the j-th 32-bit word of that
    // row (two consecutive depths); the tile is then the 16 x 16 transpose of those words.
    alignas(64) uint32_t words[kRows][kRows];
    for (int64_t j = 0; j < kRows; ++j) {
      const uint16_t* even = p.a + (depth0 + 2 * j) * p.m + row0;
      _mm512_store_si512(words[j], InterleavePairs(even, even + p.m));
    }
    auto* tile_words = reinterpret_cast<uint32_t*>(tile);
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t j = 0; j < kRows; ++j) tile_words[r * kRows + j] = words[j][r];
  } else {
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t d = 0; d < kDepth; ++d) tile[r * kDepth + d] = AValue(p, row0 + r, depth0 + d);
  }
}

void PackBTile(const Problem& p, int64_t nb, int64_t kb, uint16_t* tile) {
  const int64_t column0 = nb * kRows, depth0 = kb * kDepth;
  const bool full = column0 + kRows <= p.n && depth0 + kDepth <= p.k;
  if (full && !p.transpose_b) {  // interleave rows 2r and 2r + 1 of b
    for (int64_t r = 0; r < kRows; ++r) {
      const uint16_t* even = p.b + (depth0 + 2 * r) * p.n + column0;
      _mm512_storeu_si512(tile + r * kDepth, InterleavePairs(even, even + p.n));
    }
  } else if (full) {  // b is [N, K]: pairs along its rows are already adjacent; transpose them as 32-bit words
    auto* words = reinterpret_cast<uint32_t*>(tile);
    for (int64_t c = 0; c < kRows; ++c) {
      const uint16_t* source = p.b + (column0 + c) * p.k + depth0;
      for (int64_t r = 0; r < kRows; ++r) {
        uint32_t pair;
        std::memcpy(&pair, source + 2 * r, sizeof(pair));
        words[r * kRows + c] = pair;
      }
    }
  } else {
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t c = 0; c < kRows; ++c)
        for (int64_t j = 0; j < 2; ++j)
          tile[r * kDepth + 2 * c + j] = BValue(p, depth0 + 2 * r + j, column0 + c);
  }
}

// ---- Multiplying ----------------------------------------------------------------------------------

struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

void ConfigureTiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kRows;
    config.bytes_per_row[t] = kTileBytes;
  }
  _tile_loadconfig(&config);
}

// Writes a 16 x 16 float32 tile held in `scratch` to C at (row0, column0), clipped to C's edges.
void StoreClipped(const Problem& p, const float* scratch, int64_t row0, int64_t column0) {
  const int64_t rows = std::min(kRows, p.m - row0), columns = std::min(kRows, p.n - column0);
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(p.c + (row0 + r) * p.n + column0, scratch + r * kRows, columns * sizeof(float));
}

// Adds A rows (a0, a1) x B columns (b0, b1) over K tiles [kb_begin, kb_end) to tiles 0-3 (a 32 x 32 block).
inline void MultiplyTiles(const uint16_t* a0, const uint16_t* a1, const uint16_t* b0, const uint16_t* b1,
                          int64_t kb_begin, int64_t kb_end) {
  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t offset = kb * kTileValues;
    _tile_loadd(4, a0 + offset, kTileBytes);
    _tile_loadd(6, b0 + offset, kTileBytes);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b1 + offset, kTileBytes);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a1 + offset, kTileBytes);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// One 32 x 32 block of C: rows of tiles mb, mb + 1 and columns of tiles nb, nb + 1, in tiles 0-3.
void MultiplyBlock(const Problem& p, const uint16_t* packed_a, const uint16_t* packed_b, int64_t mb, int64_t nb) {
  const int64_t depth = p.depth_blocks;
  const uint16_t* a0 = packed_a + mb * depth * kTileValues;
  const uint16_t* a1 = a0 + depth * kTileValues;
  const uint16_t* b0 = packed_b + nb * depth * kTileValues;
  const uint16_t* b1 = b0 + depth * kTileValues;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  MultiplyTiles(a0, a1, b0, b1, 0, depth);
  const int64_t row0 = mb * kRows, column0 = nb * kRows;
  const int64_t stride = p.n * static_cast<int64_t>(sizeof(float));
  if (row0 + 2 * kRows <= p.m && column0 + 2 * kRows <= p.n) {
    float* c = p.c + row0 * p.n + column0;
    _tile_stored(0, c, stride);
    _tile_stored(1, c + kRows, stride);
    _tile_stored(2, c + kRows * p.n, stride);
    _tile_stored(3, c + kRows * p.n + kRows, stride);
    return;
  }
  alignas(64) float scratch[4][kRows * kRows];
  _tile_stored(0, scratch[0], kRows * sizeof(float));
  _tile_stored(1, scratch[1], kRows * sizeof(float));
  _tile_stored(2, scratch[2], kRows * sizeof(float));
  _tile_stored(3, scratch[3], kRows * sizeof(float));
  for (int t = 0; t < 4; ++t) {
    const int64_t r = row0 + (t / 2) * kRows, c = column0 + (t % 2) * kRows;
    if (r < p.m && c < p.n) StoreClipped(p, scratch[t], r, c);
  }
}

// Deep contractions (a weight gradient contracts over every token: K = 8192 at 32 x 256) go by panels: up to
// kPanelRowPairs x kPanelColumnPairs blocks of C, accumulated in a float32 buffer over chunks of kChunkDepth tiles
// of K, so that the chunk's A and B tiles (at most 512 + 256 KiB) and the panel (512 KiB) stay in the core's L2
// while each tile is used 8 or 16 times. Whole-K blocks would stream one B pair (2 x K / 16 KiB) per block from
// L3: 300 MB for a 384 x 1536 x 8192 product, which then runs at a third of the tile unit's rate.
constexpr int64_t kDeepDepth = 64;  // tiles of K (2048 values) above which products go by panels
constexpr int64_t kChunkDepth = 16;
constexpr int64_t kPanelRowPairs = 16, kPanelColumnPairs = 8;

// Block (mb, nb) of a panel over K tiles [kb_begin, kb_end): added to the 32 x 32 floats at `acc` (row stride
// `stride` floats), or written there when `first`.
void AccumulateBlock(const Problem& p, const uint16_t* packed_a, const uint16_t* packed_b, int64_t mb, int64_t nb,
                     int64_t kb_begin, int64_t kb_end, bool first, float* acc, int64_t stride) {
  const int64_t depth = p.depth_blocks, bytes = stride * static_cast<int64_t>(sizeof(float));
  const uint16_t* a0 = packed_a + mb * depth * kTileValues;
  const uint16_t* a1 = a0 + depth * kTileValues;
  const uint16_t* b0 = packed_b + nb * depth * kTileValues;
  const uint16_t* b1 = b0 + depth * kTileValues;
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, acc, bytes);
    _tile_loadd(1, acc + kRows, bytes);
    _tile_loadd(2, acc + kRows * stride, bytes);
    _tile_loadd(3, acc + kRows * stride + kRows, bytes);
  }
  MultiplyTiles(a0, a1, b0, b1, kb_begin, kb_end);
  _tile_stored(0, acc, bytes);
  _tile_stored(1, acc + kRows, bytes);
  _tile_stored(2, acc + kRows * stride, bytes);
  _tile_stored(3, acc + kRows * stride + kRows, bytes);
}

// The panel of row pairs [mb_begin, mb_end) x column pairs [nb_begin, nb_end), chunk by chunk of K, then copied
// to C within its edges.
void MultiplyPanel(const Problem& p, const uint16_t* packed_a, const uint16_t* packed_b, int64_t mb_begin,
                   int64_t mb_end, int64_t nb_begin, int64_t nb_end) {
  constexpr int64_t kPanelStride = kPanelColumnPairs * 2 * kRows;
  thread_local std::vector<float> panel(kPanelRowPairs * 2 * kRows * kPanelStride);
  for (int64_t kb = 0; kb < p.depth_blocks; kb += kChunkDepth) {
    const int64_t kb_end = std::min(p.depth_blocks, kb + kChunkDepth);
    for (int64_t nb = nb_begin; nb < nb_end; ++nb)
      for (int64_t mb = mb_begin; mb < mb_end; ++mb)
        AccumulateBlock(p, packed_a, packed_b, 2 * mb, 2 * nb, kb, kb_end, kb == 0,
                        panel.data() + (mb - mb_begin) * 2 * kRows * kPanelStride + (nb - nb_begin) * 2 * kRows,
                        kPanelStride);
  }
  const int64_t row0 = mb_begin * 2 * kRows, column0 = nb_begin * 2 * kRows;
  const int64_t rows = std::min(p.m, mb_end * 2 * kRows) - row0, columns = std::min(p.n, nb_end * 2 * kRows) - column0;
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(p.c + (row0 + r) * p.n + column0, panel.data() + r * kPanelStride, columns * sizeof(float));
}

struct FreeDeleter {
  void operator()(void* pointer) const { std::free(pointer); }
};

using TileBuffer = std::unique_ptr<uint16_t[], FreeDeleter>;

TileBuffer NewTileBuffer(int64_t tiles) {
  return TileBuffer(
      static_cast<uint16_t*>(std::aligned_alloc(64, std::max<int64_t>(tiles, 1) * kTileValues * sizeof(uint16_t))));
}

// One product, shared by the threads that take part: each claims chunks of packing, then (once every tile is
// packed) chunks of 32 x 32 blocks of C, until none are left. A helper that starts late finds nothing to do.
struct Work {
  Work(const Problem& problem, int64_t batch, int64_t threads) : p(problem), batch(batch) {
    a_tiles = p.row_blocks * p.depth_blocks;
    b_tiles = p.column_blocks * p.depth_blocks;
    packed_a = NewTileBuffer(batch * a_tiles);
    packed_b = NewTileBuffer(batch * b_tiles);
    pack_tiles = batch * (a_tiles + b_tiles);
    column_pairs = p.column_blocks / 2;
    if (p.depth_blocks > kDeepDepth) {  // a unit of work is a panel of blocks
      row_groups = (p.row_blocks / 2 + kPanelRowPairs - 1) / kPanelRowPairs;
      column_groups = (column_pairs + kPanelColumnPairs - 1) / kPanelColumnPairs;
      element_blocks = row_groups * column_groups;
    } else {
      element_blocks = (p.row_blocks / 2) * column_pairs;
    }
    blocks = batch * element_blocks;
    const int64_t chunks_per_thread = 8;  // enough to even out threads that start late or run slower
    pack_chunk = std::max<int64_t>(1, pack_tiles / (threads * chunks_per_thread));
    block_chunk = row_groups ? 1 : std::max<int64_t>(1, blocks / (threads * chunks_per_thread));
  }

  // The product of batch element `index`: operands and result offset to it.
  Problem Element(int64_t index) const {
    Problem element = p;
    element.a += index * p.m * p.k;
    element.b += index * p.k * p.n;
    element.c += index * p.m * p.n;
    return element;
  }

  void PackTile(int64_t t) {
    const int64_t element_tiles = a_tiles + b_tiles, index = t / element_tiles, local = t % element_tiles;
    const Problem element = Element(index);
    // Where the contraction runs down the rows of an operand ([K, M] a, [K, N] b), a tile reads half of each
    // 64-byte line, and its neighbour along M (N) the other half: those two are packed one after the other,
    // while the line is in cache. Otherwise tiles go along K, which reads each row from start to end.
    if (local < a_tiles) {
      const int64_t mb = p.transpose_a ? local % p.row_blocks : local / p.depth_blocks;
      const int64_t kb = p.transpose_a ? local / p.row_blocks : local % p.depth_blocks;
      PackATile(element, mb, kb, packed_a.get() + (index * a_tiles + mb * p.depth_blocks + kb) * kTileValues);
    } else {
      const int64_t u = local - a_tiles;
      const int64_t nb = p.transpose_b ? u / p.depth_blocks : u % p.column_blocks;
      const int64_t kb = p.transpose_b ? u % p.depth_blocks : u / p.column_blocks;
      PackBTile(element, nb, kb, packed_b.get() + (index * b_tiles + nb * p.depth_blocks + kb) * kTileValues);
    }
  }

  void MultiplyBlockAt(int64_t block) {
    const int64_t index = block / element_blocks, local = block % element_blocks;
    const uint16_t* a = packed_a.get() + index * a_tiles * kTileValues;
    const uint16_t* b = packed_b.get() + index * b_tiles * kTileValues;
    if (row_groups) {
      const int64_t mb = (local / column_groups) * kPanelRowPairs, nb = (local % column_groups) * kPanelColumnPairs;
      MultiplyPanel(Element(index), a, b, mb, std::min(p.row_blocks / 2, mb + kPanelRowPairs), nb,
                    std::min(column_pairs, nb + kPanelColumnPairs));
      return;
    }
    MultiplyBlock(Element(index), a, b, 2 * (local / column_pairs), 2 * (local % column_pairs));
  }

  void Participate() {
    for (;;) {
      const int64_t begin = next_tile.fetch_add(pack_chunk);
      if (begin >= pack_tiles) break;
      const int64_t end = std::min(begin + pack_chunk, pack_tiles);
      for (int64_t t = begin; t < end; ++t) PackTile(t);
      packed_tiles.fetch_add(end - begin, std::memory_order_release);
    }
    while (packed_tiles.load(std::memory_order_acquire) < pack_tiles) std::this_thread::yield();
    bool configured = false;
    for (;;) {
      const int64_t begin = next_block.fetch_add(block_chunk);
      if (begin >= blocks) break;
      if (!configured) ConfigureTiles(), configured = true;
      const int64_t end = std::min(begin + block_chunk, blocks);
      for (int64_t block = begin; block < end; ++block) MultiplyBlockAt(block);
      finished_blocks.fetch_add(end - begin, std::memory_order_release);
    }
    if (configured) _tile_release();
  }

  void WaitForBlocks() const {
    while (finished_blocks.load(std::memory_order_acquire) < blocks) std::this_thread::yield();
  }

  const Problem p;  // batch element 0
  const int64_t batch;
  TileBuffer packed_a, packed_b;
  int64_t a_tiles, b_tiles, pack_tiles, column_pairs, element_blocks, blocks, pack_chunk, block_chunk;
  int64_t row_groups = 0, column_groups = 0;  // of panels, for deep contractions; 0 when it goes by blocks
  std::atomic<int64_t> next_tile{0}, packed_tiles{0}, next_block{0}, finished_blocks{0};
};

// Tile counts of p: rows and columns rounded up to whole 2 x 2 blocks of tiles.
void CountTiles(Problem& p) {
  p.row_blocks = 2 * ((p.m + 2 * kRows - 1) / (2 * kRows));
  p.column_blocks = 2 * ((p.n + 2 * kRows - 1) / (2 * kRows));
  p.depth_blocks = (p.k + kDepth - 1) / kDepth;
}

// Runs the product on the calling thread and on every other thread of XLA's intra-op pool that is free to
// help (its tasks are queued with XLA's own, so the cores are not oversubscribed).
void Multiply(Problem p, int64_t batch, ffi::ThreadPool& pool) {
  CountTiles(p);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto work = std::make_shared<Work>(p, batch, threads);
  for (int64_t helper = 1; helper < threads; ++helper) pool.Schedule([work] { work->Participate(); });
  work->Participate();
  work->WaitForBlocks();
}

ffi::Error AmxMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                     ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b) {
  const auto a_dims = a.dimensions(), b_dims = b.dimensions(), c_dims = c->dimensions();
  if (a_dims.size() != 3 || b_dims.size() != 3 || c_dims.size() != 3)
    return ffi::Error::InvalidArgument("jaxrm_amx_matmul takes batches of matrices (rank 3)");
  Problem p{};
  p.a = reinterpret_cast<const uint16_t*>(a.untyped_data());
  p.b = reinterpret_cast<const uint16_t*>(b.untyped_data());
  p.c = c->typed_data();
  p.transpose_a = transpose_a;
  p.transpose_b = transpose_b;
  const int64_t batch = a_dims[0];
  p.m = transpose_a ? a_dims[2] : a_dims[1];
  p.k = transpose_a ? a_dims[1] : a_dims[2];
  p.n = transpose_b ? b_dims[1] : b_dims[2];
  const int64_t b_depth = transpose_b ? b_dims[2] : b_dims[1];
  if (b_dims[0] != batch || c_dims[0] != batch || b_depth != p.k || c_dims[1] != p.m || c_dims[2] != p.n)
    return ffi::Error::InvalidArgument("jaxrm_amx_matmul: operand shapes do not match");
  if (batch == 0 || p.m == 0 || p.n == 0) return ffi::Error::Success();
  if (p.k == 0) {
    std::memset(p.c, 0, batch * p.m * p.n * sizeof(float));
    return ffi::Error::Success();
  }
  Multiply(p, batch, pool);
  return ffi::Error::Success();
}


// ---- Attention ------------------------------------------------------------------------------------
//
// Softmax attention, one item (a batch row and a key/value head) at a time on one thread: every product on
// the tiles and the softmax in AVX-512 between them, so that an item's scores never leave the core's cache
// and no pass over them is left to XLA:
//
//   forward:   S = Q K^T + bias      P = softmax(S) by rows      O = P V
//   backward:  dV = P^T dO    dP = dO V^T    dS = P * (dP - rowsum(dO * O))    dQ = dS K    dK = dS^T Q
//
// Shapes of an item: Q [Qn, D] (the G query heads that share a key/value head one after another, T positions
// each, already scaled), K and V [S, D], P [Qn, S]; the bias [T, S] is shared by the heads of a batch row, so
// query row r takes bias row r mod T.

Problem Product(const uint16_t* a, const uint16_t* b, float* c, int64_t m, int64_t n, int64_t k,
                bool transpose_a, bool transpose_b) {
  Problem p{};
  p.a = a, p.b = b, p.c = c, p.m = m, p.n = n, p.k = k, p.transpose_a = transpose_a, p.transpose_b = transpose_b;
  CountTiles(p);
  return p;
}

// An item's scratch, one per thread: it grows to the largest item seen and is kept for the next call.
struct ItemScratch {
  TileBuffer packed_a, packed_b;
  int64_t a_capacity = 0, b_capacity = 0;
  std::unique_ptr<float[]> scores;
  std::unique_ptr<uint16_t[]> values;  // bfloat16
  int64_t score_capacity = 0, value_capacity = 0;

  float* Scores(int64_t count) {
    if (count > score_capacity) scores.reset(new float[score_capacity = count]);
    return scores.get();
  }
  uint16_t* Values(int64_t count) {
    if (count > value_capacity) values.reset(new uint16_t[value_capacity = count]);
    return values.get();
  }

  // The whole product p on this thread (its tiles configured).
  void Multiply(const Problem& p) {
    const int64_t a_tiles = p.row_blocks * p.depth_blocks, b_tiles = p.column_blocks * p.depth_blocks;
    if (a_tiles > a_capacity) packed_a = NewTileBuffer(a_capacity = a_tiles);
    if (b_tiles > b_capacity) packed_b = NewTileBuffer(b_capacity = b_tiles);
    for (int64_t t = 0; t < a_tiles; ++t)
      PackATile(p, t / p.depth_blocks, t % p.depth_blocks, packed_a.get() + t * kTileValues);
    for (int64_t t = 0; t < b_tiles; ++t)
      PackBTile(p, t / p.depth_blocks, t % p.depth_blocks, packed_b.get() + t * kTileValues);
    for (int64_t mb = 0; mb < p.row_blocks; mb += 2)
      for (int64_t nb = 0; nb < p.column_blocks; nb += 2) MultiplyBlock(p, packed_a.get(), packed_b.get(), mb, nb);
  }
};

thread_local ItemScratch item_scratch;

// Runs item(i) for i in [0, count) on the calling thread and on XLA's intra-op pool, one item per claim.
template <typename Item>
void ForEachItem(ffi::ThreadPool& pool, int64_t count, Item item) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto participate = [progress, count, item] {
    bool configured = false;
    for (int64_t i; (i = progress->next.fetch_add(1)) < count;) {
      if (!configured) ConfigureTiles(), configured = true;
      item(i);
      progress->done.fetch_add(1, std::memory_order_release);
    }
    if (configured) _tile_release();
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([participate] { participate(); });
  participate();
  while (progress->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

struct AttentionShape {
  int64_t items, queries, keys, depth, positions, items_per_bias;  // I, Qn, S, D, T, I / (bias rows)
};

void AttentionForwardItem(const AttentionShape& shape, const uint16_t* q, const uint16_t* k, const uint16_t* v,
                          const float* bias, float* o, uint16_t* p) {
  const int64_t qn = shape.queries, s = shape.keys, d = shape.depth;
  ItemScratch& scratch = item_scratch;
  float* scores = scratch.Scores(qn * s);
  scratch.Multiply(Product(q, k, scores, qn, s, d, false, true));  // Q K^T
  for (int64_t r = 0; r < qn; ++r)
    avx512::SoftmaxRow(scores + r * s, bias + (r % shape.positions) * s, s, p + r * s);
  scratch.Multiply(Product(p, v, o, qn, d, s, false, false));  // P V
}

void AttentionBackwardItem(const AttentionShape& shape, const uint16_t* q, const uint16_t* k, const uint16_t* v,
                           const uint16_t* p, const float* o, const float* out_grad, float* dq, float* dk,
                           float* dv) {
  const int64_t qn = shape.queries, s = shape.keys, d = shape.depth;
  ItemScratch& scratch = item_scratch;
  float* row_dot = scratch.Scores(qn * s + qn);
  float* dp = row_dot + qn;
  uint16_t* dout = scratch.Values(qn * d + qn * s);  // dO, then dS, in bfloat16
  uint16_t* ds = dout + qn * d;
  avx512::OutGradRows(out_grad, o, qn, d, dout, row_dot);
  scratch.Multiply(Product(p, dout, dv, s, d, qn, true, false));   // dV = P^T dO
  scratch.Multiply(Product(dout, v, dp, qn, s, d, false, true));   // dP = dO V^T
  avx512::ScoreGradRows(p, dp, row_dot, qn, s, ds);
  scratch.Multiply(Product(ds, k, dq, qn, d, s, false, false));  // dQ = dS K
  scratch.Multiply(Product(ds, q, dk, s, d, qn, true, false));   // dK = dS^T Q
}

// Checks the shapes of q [I, Qn, D], k and v [I, S, D] and bias [B, T, S] (T divides Qn, B divides I).
ffi::Error ReadAttentionShape(ffi::Span<const int64_t> q, ffi::Span<const int64_t> k, ffi::Span<const int64_t> v,
                              ffi::Span<const int64_t> bias, AttentionShape& shape) {
  if (q.size() != 3 || k.size() != 3 || v.size() != 3 || bias.size() != 3)
    return ffi::Error::InvalidArgument("jaxrm_amx_attention takes q, k, v and bias of rank 3");
  shape = {q[0], q[1], k[1], q[2], bias[1], 0};
  if (k[0] != shape.items || v[0] != shape.items || k[2] != shape.depth || v[1] != shape.keys ||
      v[2] != shape.depth || bias[2] != shape.keys || bias[0] < 1 || shape.items % bias[0] != 0 ||
      shape.positions < 1 || shape.queries % shape.positions != 0 || shape.keys < 1)
    return ffi::Error::InvalidArgument("jaxrm_amx_attention: operand shapes do not match");
  shape.items_per_bias = shape.items / bias[0];
  return ffi::Error::Success();
}

template <typename T>
const uint16_t* Bits(const T& buffer) {
  return reinterpret_cast<const uint16_t*>(buffer.untyped_data());
}

// The forward pass; with probabilities == nullptr (inference) each item's P stays in the thread's scratch.
ffi::Error AttentionForward(ffi::ThreadPool& pool, ffi::Buffer<ffi::BF16>& q, ffi::Buffer<ffi::BF16>& k,
                            ffi::Buffer<ffi::BF16>& v, ffi::Buffer<ffi::F32>& bias, float* out,
                            uint16_t* probabilities) {
  AttentionShape shape;
  if (ffi::Error error = ReadAttentionShape(q.dimensions(), k.dimensions(), v.dimensions(), bias.dimensions(), shape);
      error.failure())
    return error;
  const uint16_t *qs = Bits(q), *ks = Bits(k), *vs = Bits(v);
  const float* biases = bias.typed_data();
  const int64_t qd = shape.queries * shape.depth, sd = shape.keys * shape.depth, qs_ = shape.queries * shape.keys;
  ForEachItem(pool, shape.items, [=](int64_t i) {
    uint16_t* p = probabilities ? probabilities + i * qs_ : item_scratch.Values(qs_);
    AttentionForwardItem(shape, qs + i * qd, ks + i * sd, vs + i * sd,
                         biases + (i / shape.items_per_bias) * shape.positions * shape.keys, out + i * qd, p);
  });
  return ffi::Error::Success();
}

ffi::Error AmxAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k,
                        ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> o,
                        ffi::ResultBuffer<ffi::BF16> p) {
  return AttentionForward(pool, q, k, v, bias, o->typed_data(), reinterpret_cast<uint16_t*>(p->untyped_data()));
}

ffi::Error AmxAttentionInference(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k,
                                 ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> o) {
  return AttentionForward(pool, q, k, v, bias, o->typed_data(), nullptr);
}

ffi::Error AmxAttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k,
                                ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::BF16> p, ffi::Buffer<ffi::F32> o,
                                ffi::Buffer<ffi::F32> out_grad, ffi::ResultBuffer<ffi::F32> dq,
                                ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  AttentionShape shape;
  const auto q_dims = q.dimensions(), p_dims = p.dimensions();
  // p [I, Qn, S] stands in for the bias's shape: one bias row per query, T = Qn.
  if (ffi::Error error = ReadAttentionShape(q_dims, k.dimensions(), v.dimensions(), p_dims, shape); error.failure())
    return error;
  if (p_dims[0] != shape.items || p_dims[1] != shape.queries)
    return ffi::Error::InvalidArgument("jaxrm_amx_attention_backward: operand shapes do not match");
  const uint16_t *qs = Bits(q), *ks = Bits(k), *vs = Bits(v), *ps = Bits(p);
  const float *os = o.typed_data(), *gs = out_grad.typed_data();
  float *dqs = dq->typed_data(), *dks = dk->typed_data(), *dvs = dv->typed_data();
  const int64_t qd = shape.queries * shape.depth, sd = shape.keys * shape.depth, qs_ = shape.queries * shape.keys;
  ForEachItem(pool, shape.items, [=](int64_t i) {
    AttentionBackwardItem(shape, qs + i * qd, ks + i * sd, vs + i * sd, ps + i * qs_, os + i * qd, gs + i * qd,
                          dqs + i * qd, dks + i * sd, dvs + i * sd);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrm_amx_matmul, AmxMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

// What both forward handlers take: XLA's intra-op pool, then q, k, v (bfloat16) and the bias (float32).
static auto BindAttentionInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::BF16>>()
      .Arg<ffi::Buffer<ffi::BF16>>()
      .Arg<ffi::Buffer<ffi::BF16>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrm_amx_attention, AmxAttention,
                              BindAttentionInputs().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::BF16>>());  // o, p

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrm_amx_attention_inference, AmxAttentionInference,
                              BindAttentionInputs().Ret<ffi::Buffer<ffi::F32>>());  // o

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrm_amx_attention_backward, AmxAttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // q
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // k
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // v
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // p
                                  .Arg<ffi::Buffer<ffi::F32>>()   // o
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dO
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dv

// Asks Linux for the AMX tile state (a process must before its first tile instruction); 0 when granted.
extern "C" int jaxrm_amx_request() {
  constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
  return static_cast<int>(syscall(SYS_arch_prctl, kRequestPermission, kTileData));
}
