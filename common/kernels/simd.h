// AVX-512 helpers shared by specd's CPU kernels: a vector exp, and 16-lane loads/stores of fp32 or bf16 data with
// the same rounding as torch (bf16: round to nearest even, NaN kept a quiet NaN).
#pragma once
#include <torch/extension.h>
#include <immintrin.h>
#include <cstdint>
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

}  // namespace specd_simd
