// A decoder layer's small operations, each one pass over its rows instead of a chain of PyTorch ops: RMSNorm with
// the residual add folded in, rotary embedding applied in place with the new K/V written to their cache slots,
// and the SiLU-gated product. At decode a layer's tensors are one row of a few thousand numbers, so the chain's
// cost is its calls (allocation, dispatch, dtype conversions: ~9 ops per norm, ~14 for RoPE), not its arithmetic.
//
// The numbers are torch's own (common/layers/layer_ops.py, tests/common/kernels/test_layer_ops.py): fp32
// arithmetic, and a bf16 model's intermediate results rounded to bf16 where PyTorch's ops round them. Only the
// RMSNorm sum of squares (summation order) and SiLU's exp (a polynomial, < 2e-7 relative) can differ from
// torch in the last bit of an fp32. Every row is computed alone, in a fixed order: batch-invariant. AVX-512 where the
// processor has it, else AVX2: the same operations lane for lane, so the same bits.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <string>

#include "simd.h"

namespace {

using specd_simd::exp512;
using specd_simd::load16;
using specd_simd::round_to;
using specd_simd::store16;
using specd_simd::tail_mask;

constexpr int64_t kRowGrain = 16;          // rows per task: a decode step's few rows stay on the calling thread

// out = w * (h / sqrt(mean(h^2) + eps)), h = x (residual == nullptr) or h = x + residual, stored into residual.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void norm_row(const T* x, T* residual, const T* w, T* out, int64_t N, float eps) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < N; i += 16) {
    const __mmask16 m = tail_mask(N - i);
    __m512 h = load16(x + i, m);
    if (residual != nullptr) {
      h = round_to<T>(_mm512_add_ps(h, load16(residual + i, m)));
      store16(residual + i, h, m);
    }
    ss = _mm512_fmadd_ps(h, h, ss);
  }
  const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(N) + eps);
  const T* h = residual != nullptr ? residual : x;
  for (int64_t i = 0; i < N; i += 16) {
    const __mmask16 m = tail_mask(N - i);
    const __m512 normed = round_to<T>(_mm512_mul_ps(load16(h + i, m), _mm512_set1_ps(inv)));
    store16(out + i, _mm512_mul_ps(load16(w + i, m), normed), m);
  }
}

// x1, x2 = the halves of one head; x1' = x1 c - x2 s, x2' = x2 c + x1 s, each product and sum rounded to T.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void rotate_head(T* x, const T* cos, const T* sin, int64_t half) {
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 m = tail_mask(half - i);
    const __m512 x1 = load16(x + i, m), x2 = load16(x + half + i, m);
    const __m512 c = load16(cos + i, m), s = load16(sin + i, m);
    const __m512 a = _mm512_sub_ps(round_to<T>(_mm512_mul_ps(x1, c)), round_to<T>(_mm512_mul_ps(x2, s)));
    const __m512 b = _mm512_add_ps(round_to<T>(_mm512_mul_ps(x2, c)), round_to<T>(_mm512_mul_ps(x1, s)));
    store16(x + i, a, m);
    store16(x + half + i, b, m);
  }
}

// out = silu(gate) * up, silu(g) = g / (1 + e^-g) rounded to T before the product (torch's two ops).
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void silu_mul_row(const T* gate, const T* up, T* out, int64_t I) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < I; i += 16) {
    const __mmask16 m = tail_mask(I - i);
    const __m512 g = load16(gate + i, m);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));                  // e^-g
    const __m512 silu = round_to<T>(_mm512_div_ps(g, _mm512_add_ps(one, e)));
    store16(out + i, _mm512_mul_ps(silu, load16(up + i, m)), m);
  }
}

// ---- AVX2 (no AVX-512): the same rows in 8-lane vectors, the same bits (the sum of squares kept in two 8-lane halves
// of the 16 lanes above and added in their order) ----
namespace avx2 {

using specd_simd::avx2::exp256;
using specd_simd::avx2::load8;
using specd_simd::avx2::round_to;
using specd_simd::avx2::store8;
using specd_simd::avx2::reduce_add16;

template <typename T>
SPECD_AVX2 void norm_row(const T* x, T* residual, const T* w, T* out, int64_t N, float eps) {
  __m256 ss[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t i = 0; i < N; i += 8) {
    const int64_t n = N - i;
    __m256 h = load8(x + i, n);
    if (residual != nullptr) {
      h = round_to<T>(_mm256_add_ps(h, load8(residual + i, n)));
      store8(residual + i, h, n);
    }
    ss[(i / 8) % 2] = _mm256_fmadd_ps(h, h, ss[(i / 8) % 2]);
  }
  const float inv = 1.f / std::sqrt(reduce_add16(ss[0], ss[1]) / static_cast<float>(N) + eps);
  const T* h = residual != nullptr ? residual : x;
  for (int64_t i = 0; i < N; i += 8) {
    const int64_t n = N - i;
    const __m256 normed = round_to<T>(_mm256_mul_ps(load8(h + i, n), _mm256_set1_ps(inv)));
    store8(out + i, _mm256_mul_ps(load8(w + i, n), normed), n);
  }
}

template <typename T>
SPECD_AVX2 void rotate_head(T* x, const T* cos, const T* sin, int64_t half) {
  for (int64_t i = 0; i < half; i += 8) {
    const int64_t n = half - i;
    const __m256 x1 = load8(x + i, n), x2 = load8(x + half + i, n);
    const __m256 c = load8(cos + i, n), s = load8(sin + i, n);
    const __m256 a = _mm256_sub_ps(round_to<T>(_mm256_mul_ps(x1, c)), round_to<T>(_mm256_mul_ps(x2, s)));
    const __m256 b = _mm256_add_ps(round_to<T>(_mm256_mul_ps(x2, c)), round_to<T>(_mm256_mul_ps(x1, s)));
    store8(x + i, a, n);
    store8(x + half + i, b, n);
  }
}

template <typename T>
SPECD_AVX2 void silu_mul_row(const T* gate, const T* up, T* out, int64_t I) {
  const __m256 one = _mm256_set1_ps(1.f);
  for (int64_t i = 0; i < I; i += 8) {
    const int64_t n = I - i;
    const __m256 g = load8(gate + i, n);
    const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));                  // e^-g
    const __m256 silu = round_to<T>(_mm256_div_ps(g, _mm256_add_ps(one, e)));
    store8(out + i, _mm256_mul_ps(silu, load8(up + i, n)), n);
  }
}

}  // namespace avx2

// f(T{}) with T = float or at::BFloat16, as x's dtype says (check_rows has admitted only these two).
template <typename F>
void with_dtype(at::ScalarType dtype, F&& f) {
  if (dtype == at::kBFloat16)
    f(at::BFloat16{});
  else
    f(float{});
}

void check_rows(const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), what, ": needs a contiguous [rows, n] CPU "
              "tensor, got sizes ", x.sizes(), " on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, what, ": float32 or bfloat16, got ",
              x.scalar_type());
}

}  // namespace

bool supported() { return specd_simd::has_avx512() || specd_simd::has_avx2(); }

std::string isa() { return specd_simd::use_avx512() ? "avx512" : specd_simd::has_avx2() ? "avx2" : ""; }

// x [T, N] -> RMSNorm(x) [T, N]; with `residual` [T, N]: residual += x in place first, and the norm is of the sum.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps, c10::optional<torch::Tensor> residual) {
  TORCH_CHECK(supported(), "rms_norm: this processor lacks AVX-512 and AVX2");
  const bool wide = specd_simd::use_avx512();
  check_rows(x, "rms_norm");
  const int64_t T = x.size(0), N = x.size(1);
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == N && weight.scalar_type() == x.scalar_type(),
              "rms_norm: weight must be [", N, "] in ", x.scalar_type());
  if (residual) {
    TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes() &&
                residual->scalar_type() == x.scalar_type(), "rms_norm: residual must match x ", x.sizes());
  }
  auto out = torch::empty_like(x);
  const float e = static_cast<float>(eps);
  with_dtype(x.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    T_* r = residual ? residual->data_ptr<T_>() : nullptr;
    at::parallel_for(0, T, kRowGrain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        (wide ? norm_row<T_> : avx2::norm_row<T_>)(x.data_ptr<T_>() + t * N, r ? r + t * N : nullptr,
                                                    weight.data_ptr<T_>(), out.data_ptr<T_>() + t * N, N, e);
    });
  });
  return out;
}

// qkv [T, (H + 2 KVH) D], in place: RoPE on its q and k heads at `positions` [T] (tables cos, sin [P, D/2]); then
// k and v of token t go to cache slot slots[t] of k_cache, v_cache [S, KVH, D].
void rope_store_kv(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin, int64_t H,
                   int64_t KVH, int64_t D, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots) {
  TORCH_CHECK(supported(), "rope_store_kv: this processor lacks AVX-512 and AVX2");
  const bool wide = specd_simd::use_avx512();
  check_rows(qkv, "rope_store_kv");
  const int64_t T = qkv.size(0), half = D / 2, P = cos.size(0), S = k_cache.size(0);
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(D % 2 == 0 && qkv.size(1) == (H + 2 * KVH) * D, "rope_store_kv: qkv has ", qkv.size(1),
              " columns, not (", H, " + 2 * ", KVH, ") * ", D);
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.dim() == 2 &&
              cos.size(1) == half && cos.scalar_type() == dt && sin.scalar_type() == dt,
              "rope_store_kv: cos and sin must be [positions, ", half, "] in ", dt);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
              k_cache.dim() == 3 && k_cache.size(1) == KVH && k_cache.size(2) == D && k_cache.scalar_type() == dt &&
              v_cache.scalar_type() == dt, "rope_store_kv: caches must be [slots, ", KVH, ", ", D, "] in ", dt);
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && positions.numel() == T &&
              slots.numel() == T && positions.is_contiguous() && slots.is_contiguous(),
              "rope_store_kv: positions and slots must be [", T, "] int64");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < P, "rope_store_kv: position ", pos[t], " outside the table's ", P);
    TORCH_CHECK(slot[t] >= 0 && slot[t] < S, "rope_store_kv: slot ", slot[t], " outside the cache's ", S);
  }
  const int64_t W = qkv.size(1), kv = KVH * D;
  with_dtype(dt, [&](auto tag) {
    using T_ = decltype(tag);
    at::parallel_for(0, T, kRowGrain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        T_* row = qkv.data_ptr<T_>() + t * W;
        for (int64_t h = 0; h < H + KVH; ++h)
          (wide ? rotate_head<T_> : avx2::rotate_head<T_>)(row + h * D, cos.data_ptr<T_>() + pos[t] * half,
                                                          sin.data_ptr<T_>() + pos[t] * half, half);
        std::copy(row + H * D, row + H * D + kv, k_cache.data_ptr<T_>() + slot[t] * kv);
        std::copy(row + H * D + kv, row + W, v_cache.data_ptr<T_>() + slot[t] * kv);
      }
    });
  });
}

// x [T, 2I] = [gate | up] -> silu(gate) * up [T, I].
torch::Tensor silu_mul(torch::Tensor x) {
  TORCH_CHECK(supported(), "silu_mul: this processor lacks AVX-512 and AVX2");
  const bool wide = specd_simd::use_avx512();
  check_rows(x, "silu_mul");
  TORCH_CHECK(x.size(1) % 2 == 0, "silu_mul: x has ", x.size(1), " columns, not [gate | up]");
  const int64_t T = x.size(0), I = x.size(1) / 2;
  auto out = torch::empty({T, I}, x.options());
  with_dtype(x.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    at::parallel_for(0, T, kRowGrain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        (wide ? silu_mul_row<T_> : avx2::silu_mul_row<T_>)(x.data_ptr<T_>() + t * 2 * I,
                                                            x.data_ptr<T_>() + t * 2 * I + I, out.data_ptr<T_>() + t * I, I);
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported", &supported, "whether this processor runs the kernels (AVX-512 or AVX2)");
  m.def("isa", &isa, "the instruction path calls take here: avx512 or avx2");
  m.def("force_avx2", &specd_simd::force_avx2, "pin the AVX2 path (tests)");
  m.def("rms_norm", &rms_norm, "RMSNorm of x, or of x + residual (stored into residual)");
  m.def("rope_store_kv", &rope_store_kv, "RoPE on qkv's q and k in place; k and v written to their cache slots");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [gate | up]");
}
