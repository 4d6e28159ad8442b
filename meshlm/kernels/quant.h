// The product kernels of quant.cpp over packed weights, shared with decode.cpp (one copy of the
// arithmetic, so a product gives the same bits through either op).
// (Layout and numerics: quant.cpp.)
#pragma once
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#define QTARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))

namespace meshlm_quant {

constexpr int kQ4_0 = 0, kQ4_1 = 1, kQ8_0 = 2, kF32 = 3, kBF16 = 4;
constexpr int64_t kBlock = 32, kGroup = 16;
constexpr int kMT = 4;  // rows of x per pass over a group's weights (accumulators: 2 per row)

// x quantized per row and block: q [M, K] int8, d [M, K/32] fp32 scales, s [M, K/32] sums of q.
struct QX {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> s;
  int64_t K = 0, nb = 0;
};

QTARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
QTARGET inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bf16 -> fp32, exact
}

// Row m, block b of x [M, K] into qx (the block's int8 quants, scale and quant sum).
template <typename T>
QTARGET inline void quantize_block(const T* x, int64_t m, int64_t b, QX& qx) {
  const int64_t K = qx.K, i = m * qx.nb + b;
  const T* src = x + m * K + b * kBlock;
  const __m512 a = load16(src), c = load16(src + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  // cvtps_epi32 rounds half to even (the default MXCSR mode), like torch.round
  const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
  const __m512i qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, _mm512_set1_ps(id)));
  int8_t* dst = qx.q.data() + m * K + b * kBlock;
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtepi32_epi8(qc));
  qx.d[i] = d;
  qx.s[i] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
}

// Size qx for M rows of K columns (the vectors only grow).
inline void qx_reserve(QX& qx, int64_t M, int64_t K) {
  qx.K = K;
  qx.nb = K / kBlock;
  if (static_cast<int64_t>(qx.q.size()) < M * K) qx.q.resize(M * K);
  if (static_cast<int64_t>(qx.d.size()) < M * qx.nb) {
    qx.d.resize(M * qx.nb);
    qx.s.resize(M * qx.nb);
  }
}

inline int32_t load32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// acc + the 16 rows' 4 unsigned bytes in w dotted with the 4 int8 of x at p, broadcast to every lane.
QTARGET inline __m512i dot4(__m512i acc, __m512i w, const int8_t* p) {
  return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(load32(p)));
}

// One group of 16 weight rows against rows m0 .. m0+MT of x: the 16 dot products of each x row in res[m].
// Each x row keeps P int32 partial sums per block (P * MT independent vpdpbusd chains hide its latency).
template <int FMT, int MT>
QTARGET void group_dot(const uint8_t* g, const QX& qx, int64_t m0, __m512* res) {
  constexpr int SB = FMT == kQ4_1 ? 64 : 32;     // scale bytes per packed block
  constexpr int QB = FMT == kQ8_0 ? 512 : 256;   // quant bytes per packed block
  constexpr int P = MT == 1 ? 4 : 2, H = P / 2;
  const int64_t nb = qx.nb, K = qx.K;
  const __m512i low4 = _mm512_set1_epi8(0x0F), high4 = _mm512_set1_epi8(static_cast<char>(0xF0));
  const int8_t* xrow[MT];
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) {
    acc[m] = _mm512_setzero_ps();
    xrow[m] = qx.q.data() + (m0 + m) * K;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = g + b * (SB + QB);
    const uint8_t* q = blk + SB;
    __m512i isum[MT][P];
    for (int m = 0; m < MT; ++m)
      for (int p = 0; p < P; ++p) isum[m][p] = _mm512_setzero_si512();
    if constexpr (FMT == kQ8_0) {
      for (int c = 0; c < 8; ++c) {
        const __m512i w = _mm512_loadu_si512(q + 64 * c);
        for (int m = 0; m < MT; ++m) isum[m][c % P] = dot4(isum[m][c % P], w, xrow[m] + b * kBlock + 4 * c);
      }
    } else {
      // Chains [0, H) take the low nibbles, [H, P) the high ones left in place (16 x their value, so those
      // sums are exact multiples of 16, shifted back once per block): no shift per load.
      for (int c = 0; c < 4; ++c) {
        const __m512i w = _mm512_loadu_si512(q + 64 * c);
        const __m512i lo = _mm512_and_si512(w, low4);   // elements 4c .. 4c+3
        const __m512i hi = _mm512_and_si512(w, high4);  // 16 x elements 16+4c ..
        for (int m = 0; m < MT; ++m) {
          const int8_t* xq = xrow[m] + b * kBlock;
          isum[m][c % H] = dot4(isum[m][c % H], lo, xq + 4 * c);
          isum[m][H + c % H] = dot4(isum[m][H + c % H], hi, xq + 16 + 4 * c);
        }
      }
    }
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
    for (int m = 0; m < MT; ++m) {
      const int64_t i = (m0 + m) * nb + b;
      const float dx = qx.d[i];
      const int32_t sx = qx.s[i];
      __m512i v = isum[m][0];
      if constexpr (FMT == kQ8_0) {
        for (int p = 1; p < P; ++p) v = _mm512_add_epi32(v, isum[m][p]);
      } else {
        __m512i h = isum[m][H];
        for (int p = 1; p < H; ++p) {
          v = _mm512_add_epi32(v, isum[m][p]);
          h = _mm512_add_epi32(h, isum[m][H + p]);
        }
        v = _mm512_add_epi32(v, _mm512_srai_epi32(h, 4));
      }
      if constexpr (FMT == kQ4_0) v = _mm512_sub_epi32(v, _mm512_set1_epi32(8 * sx));
      if constexpr (FMT == kQ8_0) v = _mm512_sub_epi32(v, _mm512_set1_epi32(128 * sx));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc[m]);
      if constexpr (FMT == kQ4_1) {
        const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32)));
        acc[m] = _mm512_fmadd_ps(mw, _mm512_set1_ps(dx * static_cast<float>(sx)), acc[m]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) res[m] = acc[m];
}

// Float formats: rows m0 .. m0+MT of x (fp32 [M, K]) against one packed group; P partial sums per row.
// P is the same for every MT: a row's float sums must not depend on how many rows share the pass.
template <int MT>
QTARGET void group_dot_f32(const float* g, const float* x, int64_t K, int64_t m0, __m512* res) {
  constexpr int P = 4;
  __m512 acc[MT][P];
  for (int m = 0; m < MT; ++m)
    for (int p = 0; p < P; ++p) acc[m][p] = _mm512_setzero_ps();
  const float* xr = x + m0 * K;
  int64_t k = 0;
  for (; k + P <= K; k += P)
    for (int p = 0; p < P; ++p) {
      const __m512 w = _mm512_loadu_ps(g + 16 * (k + p));
      for (int m = 0; m < MT; ++m) acc[m][p] = _mm512_fmadd_ps(w, _mm512_set1_ps(xr[m * K + k + p]), acc[m][p]);
    }
  for (; k < K; ++k) {
    const __m512 w = _mm512_loadu_ps(g + 16 * k);
    for (int m = 0; m < MT; ++m) acc[m][0] = _mm512_fmadd_ps(w, _mm512_set1_ps(xr[m * K + k]), acc[m][0]);
  }
  for (int m = 0; m < MT; ++m) {
    __m512 v = acc[m][0];
    for (int p = 1; p < P; ++p) v = _mm512_add_ps(v, acc[m][p]);
    res[m] = v;
  }
}

template <int MT>
QTARGET void group_dot_bf16(const uint16_t* g, const float* x, int64_t K, int64_t m0, __m512* res) {
  constexpr int P = 2;  // 2P accumulators per row (even and odd columns)
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 acc[MT][2 * P];
  for (int m = 0; m < MT; ++m)
    for (int p = 0; p < 2 * P; ++p) acc[m][p] = _mm512_setzero_ps();
  const float* xr = x + m0 * K;
  const int64_t K2 = K / 2;
  int64_t j = 0;
  auto pair = [&](int64_t jj, int p) QTARGET {
    const __m512i v = _mm512_loadu_si512(g + 32 * jj);
    const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
    for (int m = 0; m < MT; ++m) {
      acc[m][2 * p] = _mm512_fmadd_ps(we, _mm512_set1_ps(xr[m * K + 2 * jj]), acc[m][2 * p]);
      acc[m][2 * p + 1] = _mm512_fmadd_ps(wo, _mm512_set1_ps(xr[m * K + 2 * jj + 1]), acc[m][2 * p + 1]);
    }
  };
  for (; j + P <= K2; j += P)
    for (int p = 0; p < P; ++p) pair(j + p, p);
  for (; j < K2; ++j) pair(j, 0);
  for (int m = 0; m < MT; ++m) {
    __m512 v = acc[m][0];
    for (int p = 1; p < 2 * P; ++p) v = _mm512_add_ps(v, acc[m][p]);
    res[m] = v;
  }
}

// One product of a call: packed weight, format, rows N, bias (fp32) or null, output [M, N].
struct Job {
  const void* w;
  int fmt;
  int64_t N;
  const float* bias;
  void* out;
};

template <int FMT>
QTARGET void run_group(const Job& j, int64_t g, const QX& qx, const float* xf, int64_t M, bool bf16) {
  const int64_t K = qx.K, nb = qx.nb;
  constexpr int64_t BB = (FMT == kQ4_1 ? 64 : 32) + (FMT == kQ8_0 ? 512 : 256);
  const int64_t n0 = g * kGroup, lanes = std::min<int64_t>(kGroup, j.N - n0);
  alignas(64) float tmp[kGroup];
  __m512 res[kMT];
  for (int64_t m0 = 0; m0 < M; m0 += kMT) {
    const int64_t mt = std::min<int64_t>(kMT, M - m0);
#define MESHLM_MT(F) \
  switch (mt) { case 1: F(1); break; case 2: F(2); break; case 3: F(3); break; default: F(4); break; }
    if constexpr (FMT == kF32) {
      const float* gw = static_cast<const float*>(j.w) + g * K * kGroup;
#define MESHLM_CALL(T) group_dot_f32<T>(gw, xf, K, m0, res)
      MESHLM_MT(MESHLM_CALL)
#undef MESHLM_CALL
    } else if constexpr (FMT == kBF16) {
      const uint16_t* gw = static_cast<const uint16_t*>(j.w) + g * K * kGroup;
#define MESHLM_CALL(T) group_dot_bf16<T>(gw, xf, K, m0, res)
      MESHLM_MT(MESHLM_CALL)
#undef MESHLM_CALL
    } else {
      const uint8_t* gw = static_cast<const uint8_t*>(j.w) + g * nb * BB;
#define MESHLM_CALL(T) group_dot<FMT, T>(gw, qx, m0, res)
      MESHLM_MT(MESHLM_CALL)
#undef MESHLM_CALL
    }
#undef MESHLM_MT
    for (int64_t m = 0; m < mt; ++m) {
      _mm512_store_ps(tmp, res[m]);
      for (int64_t l = 0; l < lanes; ++l) {
        const float y = tmp[l] + (j.bias ? j.bias[n0 + l] : 0.0f);
        const int64_t o = (m0 + m) * j.N + n0 + l;
        if (bf16) static_cast<c10::BFloat16*>(j.out)[o] = c10::BFloat16(y);
        else static_cast<float*>(j.out)[o] = y;
      }
    }
  }
}

// Group g of job j: run_group for the job's format.
QTARGET inline void run_group_any(const Job& j, int64_t g, const QX& qx, const float* xf, int64_t M, bool bf16) {
  switch (j.fmt) {
    case kQ4_0: run_group<kQ4_0>(j, g, qx, xf, M, bf16); break;
    case kQ4_1: run_group<kQ4_1>(j, g, qx, xf, M, bf16); break;
    case kQ8_0: run_group<kQ8_0>(j, g, qx, xf, M, bf16); break;
    case kF32: run_group<kF32>(j, g, qx, xf, M, bf16); break;
    default: run_group<kBF16>(j, g, qx, xf, M, bf16); break;
  }
}

// n values as fp32: bf16 widened (exact) into a reused buffer, fp32 read in place.
inline const float* widen(const float* x, int64_t, std::vector<float>&) { return x; }
inline const float* widen(const c10::BFloat16* x, int64_t n, std::vector<float>& buf) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]);
  return buf.data();
}

// The packed shape of a weight of N rows and K columns in format fmt (see qformat.py).
inline std::vector<int64_t> packed_shape(int fmt, int64_t N, int64_t K) {
  const int64_t G = (N + kGroup - 1) / kGroup;
  if (fmt == kF32) return {G, K, kGroup};
  if (fmt == kBF16) return {G, K / 2, kGroup, 2};
  return {G, K / kBlock, kGroup * ((fmt == kQ4_1 ? 4 : 2) + (fmt == kQ8_0 ? 32 : 16))};
}

}  // namespace meshlm_quant
