// Attention over a paged KV cache in which every query row is computed alone, in one fixed order: its result does
// not depend on the other rows of the call, on the other sequences, or on how far the context is padded
// (batch-invariant by construction, like vnni_gemm.cpp's rows). CPU, AVX-512 or AVX2 (the same bits), fp32
// arithmetic on bf16/fp32 data.
//
// q [B, Q, H, D]; k_cache, v_cache [S, KVH, D] (S cache slots); slots [B, C] int64: the cache slot of each context
// position; q_pos [B, Q] int64: query (b, i) sees context positions 0..q_pos[b, i]. -> out [B, Q, H * D].
// Per (sequence, KV head): the keys 0..max(q_pos) are read once into fp32 blocks of 16 keys transposed
// ([D][16]: scores of one query row against 16 keys are 16 FMA lanes, no horizontal sums) and the values into
// fp32 rows. Per query row and head of the group: scores = (q . k) * scale for its keys, softmax with one max and
// one sum in a fixed order, out = sum_j p_j v_j / sum.
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

constexpr int kLanes = 16;
using specd_simd::exp512;

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void head_group(const T* q, const T* k_cache, const T* v_cache, const int64_t* slots, const int64_t* q_pos,
                T* out, int64_t Q, int64_t H, int64_t KVH, int64_t D, int64_t kvh, float scale) {
  const int64_t g = H / KVH;
  int64_t n_keys = 0;
  for (int64_t i = 0; i < Q; ++i) n_keys = std::max(n_keys, q_pos[i] + 1);
  const int64_t n_blocks = (n_keys + kLanes - 1) / kLanes;
  // Scratch kept per thread across calls (a fresh 0.5 MB vector per call costs page faults, measured: 10x at 1k keys).
  // Lanes past the last key of the last block are never read unmasked.
  static thread_local std::vector<float> kt, vf, qf, scores, acc;
  kt.resize(n_blocks * D * kLanes);                                   // [blocks][D][16]
  vf.resize(n_keys * D);                                              // [keys][D]
  qf.resize(D), scores.resize(n_blocks * kLanes), acc.resize(D);
  for (int64_t j = 0; j < n_keys; ++j) {
    const T* kj = k_cache + (slots[j] * KVH + kvh) * D;
    const T* vj = v_cache + (slots[j] * KVH + kvh) * D;
    float* col = kt.data() + (j / kLanes) * D * kLanes + (j % kLanes);
    float* row = vf.data() + j * D;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes) {
        _mm512_storeu_ps(row + d, specd_simd::load16(vj + d, 0xFFFF));
        alignas(64) float tmp[kLanes];
        _mm512_store_ps(tmp, specd_simd::load16(kj + d, 0xFFFF));
        for (int l = 0; l < kLanes; ++l) col[(d + l) * kLanes] = tmp[l];
      }
      for (; d < D; ++d) col[d * kLanes] = to_float(kj[d]), row[d] = to_float(vj[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) col[d * kLanes] = to_float(kj[d]), row[d] = to_float(vj[d]);
    }
  }
  for (int64_t i = 0; i < Q; ++i) {
    const int64_t n = q_pos[i] + 1, nb = (n + kLanes - 1) / kLanes;
    for (int64_t hh = 0; hh < g; ++hh) {
      const int64_t h = kvh * g + hh;
      const T* qi = q + (i * H + h) * D;
      for (int64_t d = 0; d < D; ++d) qf[d] = to_float(qi[d]);
      __m512 vmax = _mm512_set1_ps(-INFINITY);
      for (int64_t blk = 0; blk < nb; ++blk) {
        const float* kb = kt.data() + blk * D * kLanes;
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        for (int64_t d = 0; d + 1 < D; d += 2) {
          s0 = _mm512_fmadd_ps(_mm512_set1_ps(qf[d]), _mm512_loadu_ps(kb + d * kLanes), s0);
          s1 = _mm512_fmadd_ps(_mm512_set1_ps(qf[d + 1]), _mm512_loadu_ps(kb + (d + 1) * kLanes), s1);
        }
        if (D % 2) s0 = _mm512_fmadd_ps(_mm512_set1_ps(qf[D - 1]), _mm512_loadu_ps(kb + (D - 1) * kLanes), s0);
        const __m512 s = _mm512_mul_ps(_mm512_add_ps(s0, s1), _mm512_set1_ps(scale));
        const int64_t valid = std::min<int64_t>(kLanes, n - blk * kLanes);
        const __mmask16 m = static_cast<__mmask16>((1u << valid) - 1u);
        _mm512_storeu_ps(scores.data() + blk * kLanes, s);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, s);
      }
      const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
      __m512 vsum = _mm512_setzero_ps();
      for (int64_t blk = 0; blk < nb; ++blk) {
        const int64_t valid = std::min<int64_t>(kLanes, n - blk * kLanes);
        const __mmask16 m = static_cast<__mmask16>((1u << valid) - 1u);
        const __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_loadu_ps(scores.data() + blk * kLanes), mx)));
        _mm512_storeu_ps(scores.data() + blk * kLanes, e);
        vsum = _mm512_add_ps(vsum, e);
      }
      const float inv = 1.f / _mm512_reduce_add_ps(vsum);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const __m512 p = _mm512_set1_ps(scores[j]);
        const float* vj = vf.data() + j * D;
        int64_t d = 0;
        for (; d + kLanes <= D; d += kLanes)
          _mm512_storeu_ps(acc.data() + d, _mm512_fmadd_ps(p, _mm512_loadu_ps(vj + d), _mm512_loadu_ps(acc.data() + d)));
        for (; d < D; ++d) acc[d] += scores[j] * vj[d];
      }
      T* o = out + (i * H + h) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] * inv);
    }
  }
}

// ---- AVX2 (no AVX-512): head_group in 8-lane vectors, the same bits. A 16-key block is two halves (keys 0..7 and
// 8..15 of its [D][16] layout); each lane's scores, maximum and sums are those of the 16-lane path, the softmax sum
// is added across the 16 lanes in _mm512_reduce_add_ps's order, and the value loop steps 16 columns at a time so
// that the same columns fall to the scalar tail. ----
namespace avx2 {

using specd_simd::avx2::exp256;
using specd_simd::avx2::first_lanes;
using specd_simd::avx2::reduce_add16;
using specd_simd::avx2::reduce_max;

template <typename T>
SPECD_AVX2 void head_group(const T* q, const T* k_cache, const T* v_cache, const int64_t* slots, const int64_t* q_pos,
                           T* out, int64_t Q, int64_t H, int64_t KVH, int64_t D, int64_t kvh, float scale) {
  const int64_t g = H / KVH;
  int64_t n_keys = 0;
  for (int64_t i = 0; i < Q; ++i) n_keys = std::max(n_keys, q_pos[i] + 1);
  const int64_t n_blocks = (n_keys + kLanes - 1) / kLanes;
  static thread_local std::vector<float> kt, vf, qf, scores, acc;
  kt.resize(n_blocks * D * kLanes);                                   // [blocks][D][16]
  vf.resize(n_keys * D);                                              // [keys][D]
  qf.resize(D), scores.resize(n_blocks * kLanes), acc.resize(D);
  for (int64_t j = 0; j < n_keys; ++j) {
    const T* kj = k_cache + (slots[j] * KVH + kvh) * D;
    const T* vj = v_cache + (slots[j] * KVH + kvh) * D;
    float* col = kt.data() + (j / kLanes) * D * kLanes + (j % kLanes);
    float* row = vf.data() + j * D;
    for (int64_t d = 0; d < D; ++d) col[d * kLanes] = to_float(kj[d]), row[d] = to_float(vj[d]);
  }
  for (int64_t i = 0; i < Q; ++i) {
    const int64_t n = q_pos[i] + 1, nb = (n + kLanes - 1) / kLanes;
    for (int64_t hh = 0; hh < g; ++hh) {
      const int64_t h = kvh * g + hh;
      const T* qi = q + (i * H + h) * D;
      for (int64_t d = 0; d < D; ++d) qf[d] = to_float(qi[d]);
      __m256 vmax[2] = {_mm256_set1_ps(-INFINITY), _mm256_set1_ps(-INFINITY)};
      for (int64_t blk = 0; blk < nb; ++blk) {
        const float* kb = kt.data() + blk * D * kLanes;
        for (int half = 0; half < 2; ++half) {
          const float* kh = kb + 8 * half;
          __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
          for (int64_t d = 0; d + 1 < D; d += 2) {
            s0 = _mm256_fmadd_ps(_mm256_set1_ps(qf[d]), _mm256_loadu_ps(kh + d * kLanes), s0);
            s1 = _mm256_fmadd_ps(_mm256_set1_ps(qf[d + 1]), _mm256_loadu_ps(kh + (d + 1) * kLanes), s1);
          }
          if (D % 2) s0 = _mm256_fmadd_ps(_mm256_set1_ps(qf[D - 1]), _mm256_loadu_ps(kh + (D - 1) * kLanes), s0);
          const __m256 sv = _mm256_mul_ps(_mm256_add_ps(s0, s1), _mm256_set1_ps(scale));
          _mm256_storeu_ps(scores.data() + blk * kLanes + 8 * half, sv);
          const __m256 valid = first_lanes(n - blk * kLanes - 8 * half);
          vmax[half] = _mm256_blendv_ps(vmax[half], _mm256_max_ps(vmax[half], sv), valid);
        }
      }
      const __m256 mx = _mm256_set1_ps(reduce_max(_mm256_max_ps(vmax[0], vmax[1])));
      __m256 vsum[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t blk = 0; blk < nb; ++blk) {
        for (int half = 0; half < 2; ++half) {
          float* sp = scores.data() + blk * kLanes + 8 * half;
          const __m256 valid = first_lanes(n - blk * kLanes - 8 * half);
          const __m256 e = _mm256_and_ps(valid, exp256(_mm256_sub_ps(_mm256_loadu_ps(sp), mx)));
          _mm256_storeu_ps(sp, e);
          vsum[half] = _mm256_add_ps(vsum[half], e);
        }
      }
      const float inv = 1.f / reduce_add16(vsum[0], vsum[1]);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const __m256 p = _mm256_set1_ps(scores[j]);
        const float* vj = vf.data() + j * D;
        int64_t d = 0;
        for (; d + kLanes <= D; d += kLanes) {
          _mm256_storeu_ps(acc.data() + d, _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + d), _mm256_loadu_ps(acc.data() + d)));
          _mm256_storeu_ps(acc.data() + d + 8,
                           _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + d + 8), _mm256_loadu_ps(acc.data() + d + 8)));
        }
        for (; d < D; ++d) acc[d] += scores[j] * vj[d];
      }
      T* o = out + (i * H + h) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] * inv);
    }
  }
}

}  // namespace avx2

}  // namespace

bool supported() { return specd_simd::has_avx512() || specd_simd::has_avx2(); }

std::string isa() { return specd_simd::use_avx512() ? "avx512" : specd_simd::has_avx2() ? "avx2" : ""; }

torch::Tensor row_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                            torch::Tensor q_pos, double scale) {
  TORCH_CHECK(supported(), "row_attention: this processor lacks AVX-512 and AVX2");
  const bool wide = specd_simd::use_avx512();
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "row_attention: shapes");
  const int64_t B = q.size(0), Q = q.size(1), H = q.size(2), D = q.size(3), KVH = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D && H % KVH == 0 && slots.size(0) == B && q_pos.size(0) == B &&
              q_pos.size(1) == Q && q.scalar_type() == k_cache.scalar_type() &&
              k_cache.scalar_type() == v_cache.scalar_type(), "row_attention: q, cache, slots, q_pos disagree");
  auto qc = q.contiguous();
  auto kc = k_cache.contiguous();
  auto vc = v_cache.contiguous();
  auto sc = slots.scalar_type() == torch::kInt64 ? slots.contiguous() : slots.to(torch::kInt64).contiguous();
  auto pc = q_pos.scalar_type() == torch::kInt64 ? q_pos.contiguous() : q_pos.to(torch::kInt64).contiguous();
  const int64_t* pp = pc.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * Q; ++i)
    TORCH_CHECK(pp[i] >= 0 && pp[i] < slots.size(1), "row_attention: a query sees past its context (position ",
                pp[i], ", context of ", slots.size(1), ")");
  auto out = torch::empty({B, Q, H * D}, q.options());
  const int64_t C = sc.size(1);
  const float s = static_cast<float>(scale);
  AT_DISPATCH_SWITCH(q.scalar_type(), "row_attention",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      at::parallel_for(0, B * KVH, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t / KVH, kvh = t % KVH;
          (wide ? head_group<float> : avx2::head_group<float>)(qc.data_ptr<float>() + b * Q * H * D, kc.data_ptr<float>(), vc.data_ptr<float>(),
                            sc.data_ptr<int64_t>() + b * C, pc.data_ptr<int64_t>() + b * Q,
                            out.data_ptr<float>() + b * Q * H * D, Q, H, KVH, D, kvh, s);
        }
      });
    })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      at::parallel_for(0, B * KVH, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t / KVH, kvh = t % KVH;
          (wide ? head_group<at::BFloat16> : avx2::head_group<at::BFloat16>)(qc.data_ptr<at::BFloat16>() + b * Q * H * D, kc.data_ptr<at::BFloat16>(),
                                   vc.data_ptr<at::BFloat16>(), sc.data_ptr<int64_t>() + b * C,
                                   pc.data_ptr<int64_t>() + b * Q, out.data_ptr<at::BFloat16>() + b * Q * H * D,
                                   Q, H, KVH, D, kvh, s);
        }
      });
    })
  );
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported", &supported, "whether this processor runs the kernel (AVX-512 or AVX2)");
  m.def("isa", &isa, "the instruction path calls take here: avx512 or avx2");
  m.def("force_avx2", &specd_simd::force_avx2, "pin the AVX2 path (tests)");
  m.def("row_attention", &row_attention, "paged attention, every query row computed alone in a fixed order");
}
