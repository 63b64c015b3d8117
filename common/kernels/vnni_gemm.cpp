// Low-bit weights x 8-bit activations: the matmuls of decode and verify passes on a CPU. Two instruction paths over
// one weight layout, chosen per processor: AVX-512 VNNI (`vpdpbusd`) and AVX2 (`vpmaddubsw` + `vpmaddwd`, for
// processors without AVX-512, e.g. AMD Zen 2/3). Both compute every group's integer dot product exactly and then
// run the same float operations in the same order, so they give the same bits (tests/common/kernels checks each
// path against one exact reference).
//
// Weight layout (built by common/kernels/vnni_gemm.py), for W [N, K], N a multiple of 16, K of S = 32 * G:
//   tiles of 16 output rows; in a tile, groups of 32 input columns; a super-block is G groups.
//   codes [N/16, K/32, BITS * 64] uint8, one group after another; a group is 8 VNNI operands of 16 lanes (one lane
//         per output row, 4 consecutive columns per lane): operand j holds columns 4j..4j+3.
//         BITS = 8: operand j is bytes 64j..64j+63.  BITS = 4: byte block j (0..3) holds operand 2j in its low
//         nibbles and operand 2j + 1 in its high nibbles.
//   sc, mn [N/16, K/32, 16] uint8: per group and row;  d, dmin [N/16, K/S, 16] float16: per super-block and row.
//   w = d * sc * q - dmin * mn  with q in 0..2^BITS - 1 (Q4_K's form; 8 bits is the same form with byte codes).
// Activations are quantized per row and group of 32: xq = round(x / xs), xs = max|x| / 127 (llama.cpp's Q8_0;
// per group rather than per 256 keeps an outlier channel from coarsening its whole super-block).
// Every output row is computed by one thread over the whole of K in one fixed order, whatever M is: a row's
// result does not depend on the other rows of the call (batch-invariant by construction).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

constexpr int kTile = 16;
constexpr int kGroup = 32;
constexpr int kPrefetch = 2048;            // bytes of codes fetched ahead of the group in use (measured)

// x [M, K] (fp32 or bf16) -> xq [M, K] int8, and per row and group of 32: xs = max|x| / 127, bx = xs * sum(xq).
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void quantize_rows(const T* x, int64_t M, int64_t K, int8_t* xq, float* xs, float* bx) {
  const int64_t ng = K / kGroup;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < ng; ++g) {
      const T* xg = x + m * K + g * kGroup;
      const __m512 v0 = specd_simd::load16(xg, 0xFFFF), v1 = specd_simd::load16(xg + 16, 0xFFFF);
      const float a = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float scale = a > 0.f ? a / 127.f : 0.f;
      const __m512 inv = _mm512_set1_ps(a > 0.f ? 127.f / a : 0.f);
      constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v0, inv), kRound));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v1, inv), kRound));
      int8_t* qg = xq + m * K + g * kGroup;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qg), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qg + 16), _mm512_cvtsepi32_epi8(q1));
      xs[m * ng + g] = scale;
      bx[m * ng + g] = scale * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
    }
  }
}

// Rows [m0, m0 + MB) of one 16-row tile over the whole of K: y = sum over groups of
//   xs * (d * sc) * dot(q, xq) - (dmin * mn) * bx, stored as O (fp32, or bf16 rounded as torch rounds); with a
// bias (the tile's 16), y = round(round(y) + bias): torch's `y + bias` on a y in O.
template <int BITS, int MB, typename O>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c")))
inline void tile_rows(const uint8_t* codes, const uint8_t* sc, const uint8_t* mn, const at::Half* d,
                      const at::Half* dmin, const int8_t* xq, const float* xs, const float* bx,
                      int64_t K, int G, int64_t m0, O* y, int64_t ldy, const O* bias) {
  constexpr int kGroupBytes = BITS * 64;
  const int64_t nb = K / (kGroup * G), ng = K / kGroup;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MB];
  for (int r = 0; r < MB; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + b * 16)));
    const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dmin + b * 16)));
    for (int gi = 0; gi < G; ++gi) {
      const int64_t g = b * G + gi;
      const uint8_t* cg = codes + g * kGroupBytes;
      for (int j = 0; j < kGroupBytes / 64; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(cg + kPrefetch + 64 * j), _MM_HINT_T0);
      __m512i w[8];
      if constexpr (BITS == 4) {
        for (int j = 0; j < 4; ++j) {
          const __m512i v = _mm512_loadu_si512(cg + 64 * j);
          w[2 * j] = _mm512_and_si512(v, low4);
          w[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        }
      } else {
        for (int j = 0; j < 8; ++j) w[j] = _mm512_loadu_si512(cg + 64 * j);
      }
      const __m512 step = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g * 16)))));
      const __m512 low = _mm512_mul_ps(mv, _mm512_cvtepi32_ps(
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + g * 16)))));
      for (int r = 0; r < MB; ++r) {
        const int32_t* xg = reinterpret_cast<const int32_t*>(xq + (m0 + r) * K + g * kGroup);
        __m512i dot0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(xg[0]));
        __m512i dot1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], _mm512_set1_epi32(xg[1]));
        for (int j = 2; j < 8; j += 2) {
          dot0 = _mm512_dpbusd_epi32(dot0, w[j], _mm512_set1_epi32(xg[j]));
          dot1 = _mm512_dpbusd_epi32(dot1, w[j + 1], _mm512_set1_epi32(xg[j + 1]));
        }
        const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(dot0, dot1)),
                                            _mm512_set1_ps(xs[(m0 + r) * ng + g]));
        acc[r] = _mm512_fmadd_ps(scaled, step, acc[r]);
        acc[r] = _mm512_fnmadd_ps(low, _mm512_set1_ps(bx[(m0 + r) * ng + g]), acc[r]);
      }
    }
  }
  const __m512 bv = bias != nullptr ? specd_simd::load16(bias, 0xFFFF) : _mm512_setzero_ps();
  for (int r = 0; r < MB; ++r) {
    const __m512 v = bias != nullptr ? _mm512_add_ps(specd_simd::round_to<O>(acc[r]), bv) : acc[r];
    specd_simd::store16(y + (m0 + r) * ldy, v, 0xFFFF);
  }
}

// Rows per pass over a tile's weights: a verify pass of K + 1 <= 8 rows unpacks each group of codes once (8
// accumulators + 8 unpacked operands + 4 scales fit the 32 registers). A row's arithmetic is the same in any pass.
constexpr int kRowsPerPass = 8;

template <int BITS, typename O>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c")))
void tile(const uint8_t* codes, const uint8_t* sc, const uint8_t* mn, const at::Half* d, const at::Half* dmin,
          const int8_t* xq, const float* xs, const float* bx, int64_t M, int64_t K, int G, O* y,
          int64_t ldy, const O* bias) {
  int64_t m0 = 0;
  for (; m0 + kRowsPerPass <= M; m0 += kRowsPerPass)
    tile_rows<BITS, kRowsPerPass, O>(codes, sc, mn, d, dmin, xq, xs, bx, K, G, m0, y, ldy, bias);
  switch (M - m0) {
#define SPECD_REMAINDER(R) \
    case R: tile_rows<BITS, R, O>(codes, sc, mn, d, dmin, xq, xs, bx, K, G, m0, y, ldy, bias); break;
    SPECD_REMAINDER(7) SPECD_REMAINDER(6) SPECD_REMAINDER(5) SPECD_REMAINDER(4) SPECD_REMAINDER(3)
    SPECD_REMAINDER(2) SPECD_REMAINDER(1)
#undef SPECD_REMAINDER
    default: break;
  }
}

// ---- AVX2 (no AVX-512): the same layout read as two halves of 8 output rows (32 bytes of each 64-byte operand) ----
namespace avx2 {

using specd_simd::avx2::load8;
using specd_simd::avx2::reduce_add;
using specd_simd::avx2::reduce_max;
using specd_simd::avx2::round_to;
using specd_simd::avx2::store8;

// quantize_rows above, in 8-lane vectors: the same scale, rounding (to nearest even) and sums.
template <typename T>
SPECD_AVX2 void quantize_rows(const T* x, int64_t M, int64_t K, int8_t* xq, float* xs, float* bx) {
  const int64_t ng = K / kGroup;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < ng; ++g) {
      const T* xg = x + m * K + g * kGroup;
      __m256 v[4];
      for (int i = 0; i < 4; ++i) v[i] = load8(xg + 8 * i);
      const __m256 peak = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                                        _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
      const float a = reduce_max(peak);
      const float scale = a > 0.f ? a / 127.f : 0.f;
      const __m256 inv = _mm256_set1_ps(a > 0.f ? 127.f / a : 0.f);
      __m256i q[4];
      for (int i = 0; i < 4; ++i)
        q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      // int32 -> int8 with signed saturation; the packs interleave 128-bit lanes, the permute restores the order.
      const __m256i bytes = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K + g * kGroup), bytes);
      xs[m * ng + g] = scale;
      const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      bx[m * ng + g] = scale * static_cast<float>(reduce_add(sum));
    }
  }
}

// The AVX2 passes compute tile_rows' sums. A group's dot product: `vpmaddubsw` multiplies 4-bit values (0..15) by
// activation bytes and adds pairs into int16 (|pair| <= 2 * 15 * 127), the group's 8 operands add up in int16
// (|sum| <= 30480, no overflow), and `vpmaddwd` by 1 widens to the int32 sum of each lane's 32 products. 8-bit codes
// are split into their two nibbles, dot = 16 * dot(high, x) + dot(low, x): exact, where u8 x s8 pairs could
// saturate int16.

// Rows [m0, m0 + MB) of half `h` (output rows 8h..8h + 7) of one 16-row tile over the whole of K, 8-bit codes.
template <int BITS, int MB, typename O>
SPECD_AVX2 inline void half_tile_rows(const uint8_t* codes, const uint8_t* sc, const uint8_t* mn, const at::Half* d,
                                      const at::Half* dmin, const int8_t* xq, const float* xs, const float* bx,
                                      int64_t K, int G, int64_t m0, int h, O* y, int64_t ldy, const O* bias) {
  static_assert(BITS == 8, "4-bit codes take pair_tile_rows");
  constexpr int kGroupBytes = BITS * 64;
  const int64_t nb = K / (kGroup * G), ng = K / kGroup;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MB];
  for (int r = 0; r < MB; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + b * 16 + 8 * h)));
    const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dmin + b * 16 + 8 * h)));
    for (int gi = 0; gi < G; ++gi) {
      const int64_t g = b * G + gi;
      const uint8_t* cg = codes + g * kGroupBytes;
      if (h == 0)
        for (int j = 0; j < kGroupBytes / 64; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(cg + kPrefetch + 64 * j), _MM_HINT_T0);
      cg += 32 * h;
      __m256i lo[MB], hi[MB];
      for (int r = 0; r < MB; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
      // Not unrolled: unrolled, GCC computes every product first and spills them all to the stack (measured).
#pragma GCC unroll 1
      for (int j = 0; j < kGroupBytes / 64; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cg + 64 * j));
        const __m256i a = _mm256_and_si256(v, low4);
        const __m256i c = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        for (int r = 0; r < MB; ++r) {
          const int32_t* xg = reinterpret_cast<const int32_t*>(xq + (m0 + r) * K + g * kGroup);
          const __m256i xb = _mm256_set1_epi32(xg[j]);   // operand j: its low and high nibbles
          lo[r] = _mm256_add_epi16(lo[r], _mm256_maddubs_epi16(a, xb));
          hi[r] = _mm256_add_epi16(hi[r], _mm256_maddubs_epi16(c, xb));
        }
      }
      const __m256 step = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + g * 16 + 8 * h)))));
      const __m256 low = _mm256_mul_ps(mv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + g * 16 + 8 * h)))));
      for (int r = 0; r < MB; ++r) {
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(lo[r], ones),
                                             _mm256_slli_epi32(_mm256_madd_epi16(hi[r], ones), 4));
        const __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(xs[(m0 + r) * ng + g]));
        acc[r] = _mm256_fmadd_ps(scaled, step, acc[r]);
        acc[r] = _mm256_fnmadd_ps(low, _mm256_set1_ps(bx[(m0 + r) * ng + g]), acc[r]);
      }
    }
  }
  const __m256 bv = bias != nullptr ? load8(bias + 8 * h) : _mm256_setzero_ps();
  for (int r = 0; r < MB; ++r) {
    const __m256 v = bias != nullptr ? _mm256_add_ps(round_to<O>(acc[r]), bv) : acc[r];
    store8(y + (m0 + r) * ldy + 8 * h, v);
  }
}

// Rows [m0, m0 + MB) of both halves of one 16-row tile: the same sums as half_tile_rows, with each activation
// broadcast serving both halves (the broadcasts' loads, not the multiplies, bound a half's pass of few rows: a 1-row
// gate_up matmul 0.52 -> 0.38 ms, an int8 head 9.5 -> 8.0 ms, measured on a Zen 3).
template <int BITS, int MB, typename O>
SPECD_AVX2 inline void pair_tile_rows(const uint8_t* codes, const uint8_t* sc, const uint8_t* mn, const at::Half* d,
                                      const at::Half* dmin, const int8_t* xq, const float* xs, const float* bx,
                                      int64_t K, int G, int64_t m0, O* y, int64_t ldy, const O* bias) {
  constexpr int kGroupBytes = BITS * 64;
  const int64_t ng = K / kGroup;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[2][MB];
  for (int r = 0; r < MB; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t b = g / G;
    const uint8_t* cg = codes + g * kGroupBytes;
    for (int j = 0; j < kGroupBytes / 64; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(cg + kPrefetch + 64 * j), _MM_HINT_T0);
    __m256i lo[2][MB], hi[2][MB];
    for (int r = 0; r < MB; ++r) lo[0][r] = lo[1][r] = hi[0][r] = hi[1][r] = _mm256_setzero_si256();
#pragma GCC unroll 1                 // as in half_tile_rows
    for (int j = 0; j < kGroupBytes / 64; ++j) {
      __m256i a[2], c[2];
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cg + 64 * j + 32 * h));
        a[h] = _mm256_and_si256(v, low4);
        c[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      }
      for (int r = 0; r < MB; ++r) {
        const int32_t* xg = reinterpret_cast<const int32_t*>(xq + (m0 + r) * K + g * kGroup);
        if constexpr (BITS == 4) {       // byte block j: operand 2j in the low nibbles, 2j + 1 in the high ones
          const __m256i x0 = _mm256_set1_epi32(xg[2 * j]), x1 = _mm256_set1_epi32(xg[2 * j + 1]);
          for (int h = 0; h < 2; ++h)
            lo[h][r] = _mm256_add_epi16(lo[h][r], _mm256_add_epi16(_mm256_maddubs_epi16(a[h], x0),
                                                                   _mm256_maddubs_epi16(c[h], x1)));
        } else {                         // operand j: its low and high nibbles
          const __m256i xb = _mm256_set1_epi32(xg[j]);
          for (int h = 0; h < 2; ++h) {
            lo[h][r] = _mm256_add_epi16(lo[h][r], _mm256_maddubs_epi16(a[h], xb));
            hi[h][r] = _mm256_add_epi16(hi[h][r], _mm256_maddubs_epi16(c[h], xb));
          }
        }
      }
    }
    const __m256i ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; ++h) {
      const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + b * 16 + 8 * h)));
      const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dmin + b * 16 + 8 * h)));
      const __m256 step = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + g * 16 + 8 * h)))));
      const __m256 low = _mm256_mul_ps(mv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + g * 16 + 8 * h)))));
      for (int r = 0; r < MB; ++r) {
        __m256i dot = _mm256_madd_epi16(lo[h][r], ones);
        if constexpr (BITS == 8) dot = _mm256_add_epi32(dot, _mm256_slli_epi32(_mm256_madd_epi16(hi[h][r], ones), 4));
        const __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(xs[(m0 + r) * ng + g]));
        acc[h][r] = _mm256_fmadd_ps(scaled, step, acc[h][r]);
        acc[h][r] = _mm256_fnmadd_ps(low, _mm256_set1_ps(bx[(m0 + r) * ng + g]), acc[h][r]);
      }
    }
  }
  for (int h = 0; h < 2; ++h) {
    const __m256 bv = bias != nullptr ? load8(bias + 8 * h) : _mm256_setzero_ps();
    for (int r = 0; r < MB; ++r) {
      const __m256 v = bias != nullptr ? _mm256_add_ps(round_to<O>(acc[h][r]), bv) : acc[h][r];
      store8(y + (m0 + r) * ldy + 8 * h, v);
    }
  }
}

// Passes over a tile, chosen by measurement on a Zen 3 (16 vector registers): 4-bit codes in passes of both halves
// and up to 3 rows (3 beat 2 though 6 accumulators + 6 integer sums leave too few registers for the operands);
// 8-bit codes need twice the integer sums, so from 4 rows on they take half passes of 4 rows, and the last 1-3 rows
// a pass of both halves. A row's arithmetic is the same in every pass.
template <int BITS, typename O>
SPECD_AVX2 void tile(const uint8_t* codes, const uint8_t* sc, const uint8_t* mn, const at::Half* d,
                     const at::Half* dmin, const int8_t* xq, const float* xs, const float* bx, int64_t M, int64_t K,
                     int G, O* y, int64_t ldy, const O* bias) {
  int64_t m0 = 0;
  if constexpr (BITS == 8) {
    for (; m0 + 4 <= M; m0 += 4)
      for (int h = 0; h < 2; ++h)
        half_tile_rows<8, 4, O>(codes, sc, mn, d, dmin, xq, xs, bx, K, G, m0, h, y, ldy, bias);
  } else {
    for (; m0 + 3 <= M; m0 += 3) pair_tile_rows<4, 3, O>(codes, sc, mn, d, dmin, xq, xs, bx, K, G, m0, y, ldy, bias);
  }
  switch (M - m0) {
    case 3: pair_tile_rows<BITS, 3, O>(codes, sc, mn, d, dmin, xq, xs, bx, K, G, m0, y, ldy, bias); break;
    case 2: pair_tile_rows<BITS, 2, O>(codes, sc, mn, d, dmin, xq, xs, bx, K, G, m0, y, ldy, bias); break;
    case 1: pair_tile_rows<BITS, 1, O>(codes, sc, mn, d, dmin, xq, xs, bx, K, G, m0, y, ldy, bias); break;
    default: break;
  }
}

}  // namespace avx2

}  // namespace

bool has_vnni() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return specd_simd::has_avx512() && __builtin_cpu_supports("avx512vnni");
  }();
  return yes;
}

bool supported() { return has_vnni() || specd_simd::has_avx2(); }

// The instruction path a call takes here: "avx512_vnni" or "avx2" ("" when neither runs).
std::string isa() { return has_vnni() && !specd_simd::forced_avx2() ? "avx512_vnni" : specd_simd::has_avx2() ? "avx2" : ""; }

// x [M, K] (any float dtype) -> y [M, N] in x's dtype; bias [N] (optional, x's dtype) added as torch adds it.
torch::Tensor vnni_mm(torch::Tensor x, torch::Tensor codes, torch::Tensor sc, torch::Tensor mn, torch::Tensor d,
                      torch::Tensor dmin, int64_t G, int64_t bits, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(supported(), "vnni_mm: this processor lacks both AVX-512 VNNI and AVX2");
  TORCH_CHECK(bits == 4 || bits == 8, "vnni_mm: bits=", bits, ", must be 4 or 8");
  TORCH_CHECK(x.dim() == 2, "vnni_mm: x must be [M, K]");
  const int64_t M = x.size(0), K = x.size(1), NT = codes.size(0), S = kGroup * G;
  TORCH_CHECK(codes.size(1) * kGroup == K && K % S == 0 && codes.size(2) == bits * 64,
              "vnni_mm: x has K=", K, ", the weight another shape");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && sc.is_contiguous() &&
              mn.is_contiguous() && d.is_contiguous() && dmin.is_contiguous(), "vnni_mm: bad weight tensors");
  // fp32 and bf16 are read and written as they are; another dtype goes through fp32.
  const bool native = x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16;
  auto xc = native ? x.contiguous() : x.to(torch::kFloat32).contiguous();
  // Scratch kept per calling thread across calls (a decode step makes ~100 of these calls).
  static thread_local std::vector<int8_t> xq;
  static thread_local std::vector<float> xs, bx;
  xq.resize(M * K), xs.resize(M * (K / kGroup)), bx.resize(M * (K / kGroup));
  auto y = torch::empty({M, NT * kTile}, xc.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint8_t* scp = sc.data_ptr<uint8_t>();
  const uint8_t* mnp = mn.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* dmp = dmin.data_ptr<at::Half>();
  const int8_t* xqp = xq.data();
  const float* xsp = xs.data();
  const float* bp = bx.data();
  const int64_t ng = K / kGroup, nb = K / S, ldy = NT * kTile, tile_bytes = ng * bits * 64;
  const int g = static_cast<int>(G);
  const bool fused_bias = bias.has_value() && native;
  if (bias) {
    TORCH_CHECK(bias->numel() == NT * kTile && bias->is_contiguous() && bias->scalar_type() == x.scalar_type(),
                "vnni_mm: bias must be [", NT * kTile, "] in ", x.scalar_type());
  }
  const bool vnni = has_vnni() && !specd_simd::forced_avx2();
  auto run = [&](auto* xp, auto* yp) {
    using O = std::remove_pointer_t<decltype(yp)>;
    if (vnni)
      quantize_rows(xp, M, K, xq.data(), xs.data(), bx.data());
    else
      avx2::quantize_rows(xp, M, K, xq.data(), xs.data(), bx.data());
    const O* bp_all = fused_bias ? bias->data_ptr<O>() : nullptr;
    at::parallel_for(0, NT, 8, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* ct = cp + t * tile_bytes;
        const uint8_t* tsc = scp + t * ng * 16;
        const uint8_t* tmn = mnp + t * ng * 16;
        const at::Half* td = dp + t * nb * 16;
        const at::Half* tdm = dmp + t * nb * 16;
        O* ty = yp + t * kTile;
        const O* tb = bp_all ? bp_all + t * kTile : nullptr;
        if (vnni && bits == 4)
          tile<4, O>(ct, tsc, tmn, td, tdm, xqp, xsp, bp, M, K, g, ty, ldy, tb);
        else if (vnni)
          tile<8, O>(ct, tsc, tmn, td, tdm, xqp, xsp, bp, M, K, g, ty, ldy, tb);
        else if (bits == 4)
          avx2::tile<4, O>(ct, tsc, tmn, td, tdm, xqp, xsp, bp, M, K, g, ty, ldy, tb);
        else
          avx2::tile<8, O>(ct, tsc, tmn, td, tdm, xqp, xsp, bp, M, K, g, ty, ldy, tb);
      }
    });
  };
  if (xc.scalar_type() == torch::kBFloat16)
    run(xc.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
  else
    run(xc.data_ptr<float>(), y.data_ptr<float>());
  if (native) return y;
  auto out = y.to(x.scalar_type());
  return bias ? out + *bias : out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported", &supported, "whether this processor runs the kernel (AVX-512 VNNI or AVX2)");
  m.def("isa", &isa, "the instruction path calls take here: avx512_vnni or avx2");
  m.def("force_avx2", &specd_simd::force_avx2, "pin the AVX2 path (tests)");
  m.def("vnni_mm", &vnni_mm, "x [M, K] @ W [N, K]^T, W in 4 or 8 bits, activations in 8");
}
