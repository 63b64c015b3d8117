// SIMD helpers shared by specd's CPU kernels: a vector exp, and loads/stores of fp32 or bf16 data with the same
// rounding as torch (bf16: round to nearest even, NaN kept a quiet NaN). AVX-512 (16 lanes) first, then the same in
// AVX2 (8 lanes; `specd_simd::avx2`) for processors without AVX-512: the same operations lane for lane, and a
// 16-lane sum in the order _mm512_reduce_add_ps adds, so a kernel's two paths give the same bits.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace specd_simd {

__attribute__((target("avx512f")))
inline __m512 exp512(__m512 x) {
  // e^x = 2^n * e^r, n = round(x / ln 2), |r| <= ln2 / 2; degree-6 Taylor polynomial for e^r (rel. error < 2e-7).
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  const __m512 rr = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

inline __mmask16 tail_mask(int64_t n) {          // the first min(n, 16) lanes
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// 16 values (lanes past `m` read as 0) as fp32.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 load16(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {                                         // bf16 -> fp32: the 16 bits are the top half of the float
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// The value torch would store for fp32 `v` in T (bf16: round to nearest even), back as fp32.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 round_to(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC00000));
    return _mm512_castsi512_ps(r);
  }
}

// Store 16 fp32 lanes (those in `m`) as T, rounded as torch rounds.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline void store16(T* p, __m512 v, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, m, v);
  } else {
    const __m512i top = _mm512_srli_epi32(_mm512_castps_si512(round_to<T>(v)), 16);
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(top));
  }
}

namespace avx2 {

#define SPECD_AVX2 __attribute__((target("avx2,fma,f16c")))

// exp512, in 8 lanes: the same operations, so the same bits.
SPECD_AVX2 inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  const __m256 rr = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// 8 values as fp32.
template <typename T>
SPECD_AVX2 inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {                                           // bf16 -> fp32: the 16 bits are the top half of the float
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// The first min(n, 8) values (lanes past them read as 0), n >= 1.
template <typename T>
SPECD_AVX2 inline __m256 load8(const T* p, int64_t n) {
  if (n >= 8) return load8(p);
  T tmp[8] = {};
  std::memcpy(tmp, p, n * sizeof(T));
  return load8(tmp);
}

// The value torch would store for fp32 `v` in T (bf16: round to nearest even, NaN kept a quiet NaN), as fp32.
template <typename T>
SPECD_AVX2 inline __m256 round_to(__m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
    r = _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan);
  }
}

// Store 8 fp32 lanes as T, rounded as torch rounds.
template <typename T>
SPECD_AVX2 inline void store8(T* p, __m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(p, v);
  } else {                                           // the top 16 bits of each rounded lane, packed in order
    const __m256i top = _mm256_srli_epi32(_mm256_castps_si256(round_to<T>(v)), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(top, top), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
}

// The first min(n, 8) lanes only, n >= 1.
template <typename T>
SPECD_AVX2 inline void store8(T* p, __m256 v, int64_t n) {
  if (n >= 8) return store8(p, v);
  T tmp[8];
  store8(tmp, v);
  std::memcpy(p, tmp, n * sizeof(T));
}

SPECD_AVX2 inline float reduce_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// The sum of 16 lanes held as lanes 0..7 (`lo`) and 8..15 (`hi`), added pairwise as GCC's _mm512_reduce_add_ps adds
// them: (hi + lo), then its upper four plus its lower four, then lanes {2, 3} onto {0, 1}, then lane 1 onto lane 0.
SPECD_AVX2 inline float reduce_add16(__m256 lo, __m256 hi) {
  const __m256 t3 = _mm256_add_ps(hi, lo);
  const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_add_ss(t8, _mm_shuffle_ps(t8, t8, _MM_SHUFFLE(0, 1, 0, 1))));
}

SPECD_AVX2 inline int32_t reduce_add(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Lanes [0, n) all ones, the rest zero (n clamped to 0..8): a blend mask.
SPECD_AVX2 inline __m256 first_lanes(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(std::max<int64_t>(n, 0), 8))), idx));
}

}  // namespace avx2

// Which paths this processor runs. `force_avx2()` pins the AVX2 path where AVX-512 runs too (tests compare them).
inline bool has_avx512() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return yes;
}

inline bool has_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return yes;
}

inline bool& forced_avx2() {
  static bool on = false;
  return on;
}

inline void force_avx2(bool on) {
  TORCH_CHECK(!on || has_avx2(), "force_avx2: this processor lacks AVX2/FMA/F16C");
  forced_avx2() = on;
}

// The 16-lane AVX-512 path runs (else the 8-lane AVX2 one).
inline bool use_avx512() { return has_avx512() && !forced_avx2(); }

}  // namespace specd_simd
