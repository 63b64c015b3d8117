// Low-bit weights x 8-bit activations on AVX-512 VNNI: the matmuls of decode and verify passes on a CPU.
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

}  // namespace

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

// x [M, K] (any float dtype) -> y [M, N] in x's dtype; bias [N] (optional, x's dtype) added as torch adds it.
torch::Tensor vnni_mm(torch::Tensor x, torch::Tensor codes, torch::Tensor sc, torch::Tensor mn, torch::Tensor d,
                      torch::Tensor dmin, int64_t G, int64_t bits, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(supported(), "vnni_mm: this processor lacks AVX-512 VNNI");
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
  auto run = [&](auto* xp, auto* yp) {
    quantize_rows(xp, M, K, xq.data(), xs.data(), bx.data());
    using O = std::remove_pointer_t<decltype(yp)>;
    const O* bp_all = fused_bias ? bias->data_ptr<O>() : nullptr;
    at::parallel_for(0, NT, 8, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* ct = cp + t * tile_bytes;
        if (bits == 4)
          tile<4, O>(ct, scp + t * ng * 16, mnp + t * ng * 16, dp + t * nb * 16, dmp + t * nb * 16, xqp, xsp, bp, M,
                     K, g, yp + t * kTile, ldy, bp_all ? bp_all + t * kTile : nullptr);
        else
          tile<8, O>(ct, scp + t * ng * 16, mnp + t * ng * 16, dp + t * nb * 16, dmp + t * nb * 16, xqp, xsp, bp, M,
                     K, g, yp + t * kTile, ldy, bp_all ? bp_all + t * kTile : nullptr);
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
  m.def("supported", &supported, "whether this processor runs the kernel (AVX-512 VNNI)");
  m.def("vnni_mm", &vnni_mm, "x [M, K] @ W [N, K]^T, W in 4 or 8 bits, activations in 8");
}
