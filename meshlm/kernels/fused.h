// The row functions of fused.cpp (RMSNorm, SiLU * up, RoPE), shared with decode.cpp (one copy of the
// arithmetic, so both ops give the same bits). Built with -ffp-contract=off: a * b + c is never an FMA.
#pragma once
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>

// libtorch_cpu's SLEEF, the exp of ATen's AVX-512 kernels; weak, so a torch that stops exporting it still
// loads these ops (silu_mul then takes std::exp, within one rounding of ATen's).
extern "C" __attribute__((weak)) __m512 Sleef_expf16_u10(__m512);

namespace meshlm_fused {

template <typename T>
inline float f(T v) { return static_cast<float>(v); }

// Rounds to T (identity for float): what storing an fp32 result into a T tensor does.
template <typename T>
inline float r(float v) { return static_cast<float>(static_cast<T>(v)); }

// oi = w * (xi * rsqrt(mean(xi^2) + eps)).to(T), the normalization in fp32, one row of K.
template <typename T>
inline void norm_row(const T* xi, const T* w, T* oi, int64_t K, float eps) {
  float acc[16] = {0.f};
  for (int64_t k = 0; k < K; ++k) acc[k & 15] += f(xi[k]) * f(xi[k]);
  float ss = 0.f;
  for (float a : acc) ss += a;
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(K) + eps);
  for (int64_t k = 0; k < K; ++k) oi[k] = static_cast<T>(f(w[k]) * r<T>(f(xi[k]) * inv));
}

// out = (silu(g).to(T) * u).to(T), silu(g) = g / (1 + exp(-g)) in fp32 as ATen's vector kernel computes it,
// with the same exp (SLEEF's expf16_u10, exported by libtorch_cpu) on every element, a row's tail included:
// ATen takes std::exp for its tail elements, so at widths that are not a multiple of 64 the two may differ
// in exp's last bit there; this op gives an element the same value wherever it sits in the batch.
template <typename T>
inline void silu_mul_block(const T* g, const T* u, T* out, int64_t i0, int64_t len) {
  alignas(64) float x[16], s[16];
  for (int64_t j = 0; j < 16; ++j) x[j] = j < len ? f(g[i0 + j]) : 0.f;
  const __m512 xv = _mm512_load_ps(x);
  if (Sleef_expf16_u10 != nullptr) {
    const __m512 e = Sleef_expf16_u10(_mm512_xor_ps(_mm512_set1_ps(-0.f), xv));  // exp(-x)
    _mm512_store_ps(s, _mm512_div_ps(xv, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
  } else {
    for (int64_t j = 0; j < 16; ++j) s[j] = x[j] / (1.f + std::exp(-x[j]));
  }
  for (int64_t j = 0; j < len; ++j) out[i0 + j] = static_cast<T>(r<T>(s[j]) * f(u[i0 + j]));
}

// In place, rotate-half RoPE of one head's row xi [D]: xi = xi * c + cat(-x2, x1) * s (D <= 1024).
template <typename T>
inline void rope_one(T* xi, const T* c, const T* s, int64_t D) {
  const int64_t half = D / 2;
  float lo[512], hi[512];
  for (int64_t d = 0; d < half; ++d) {
    lo[d] = f(xi[d]);
    hi[d] = f(xi[d + half]);
  }
  for (int64_t d = 0; d < half; ++d) {
    // first half: x1 * cos - x2 * sin; second: x2 * cos + x1 * sin (-x2 is exact in any dtype)
    xi[d] = static_cast<T>(r<T>(lo[d] * f(c[d])) + r<T>(-hi[d] * f(s[d])));
    xi[d + half] = static_cast<T>(r<T>(hi[d] * f(c[d + half])) + r<T>(lo[d] * f(s[d + half])));
  }
}

}  // namespace meshlm_fused
