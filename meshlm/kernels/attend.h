// Paged decode attention on the CPU: each sequence's one new query token attends over its cached keys and
// values where they lie in the block pool, so nothing is gathered or copied. One task per (sequence, KV
// head): the G query heads of the group read each key and value row once (grouped-query attention with no
// repeat), scores are taken a block at a time and folded into an online softmax in fp32. A sequence's
// result depends only on its own data, in a fixed order, so it is the same alone and inside any batch.
#pragma once
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <cstdint>
#include <limits>
#include <vector>

namespace meshlm_attend {

constexpr int64_t kLanes = 16;  // partial sums per dot product: one vector register, summed in a fixed order

template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  float part[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) part[j] += q[i + j] * static_cast<float>(k[i + j]);
  for (; i < d; ++i) part[i % kLanes] += q[i] * static_cast<float>(k[i]);
  float s = 0.f;
  for (int64_t j = 0; j < kLanes; ++j) s += part[j];
  return s;
}

template <typename T>
inline void axpy(float* acc, float p, const T* v, int64_t d) {
  for (int64_t j = 0; j < d; ++j) acc[j] += p * static_cast<float>(v[j]);
}

#ifdef __AVX512F__
// fp32 rows whose length is a multiple of 16: one 16-lane fused multiply-add per 16 elements.
template <>
inline float dot<float>(const float* q, const float* k, int64_t d) {
  if (d % kLanes) {
    float s = 0.f;
    for (int64_t i = 0; i < d; ++i) s += q[i] * k[i];
    return s;
  }
  __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
  for (int64_t i = kLanes; i < d; i += kLanes)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(k + i), acc);
  return _mm512_reduce_add_ps(acc);
}

template <>
inline void axpy<float>(float* acc, float p, const float* v, int64_t d) {
  if (d % kLanes) {
    for (int64_t j = 0; j < d; ++j) acc[j] += p * v[j];
    return;
  }
  const __m512 pv = _mm512_set1_ps(p);
  for (int64_t j = 0; j < d; j += kLanes)
    _mm512_storeu_ps(acc + j, _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + j), _mm512_loadu_ps(acc + j)));
}
#endif

// Prefetch rows of a pool into the cache: L1 (T0) or L2 (T1). An asm statement, not _mm_prefetch: gcc
// deletes a loop that only prefetches (it has no effect the compiler must keep), which left this kernel
// with no prefetching at all.
template <bool L2 = false>
inline void prefetch_rows(const void* p, int64_t rows, int64_t stride_bytes, int64_t row_bytes) {
#if defined(__x86_64__)
  const char* c = static_cast<const char*>(p);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < row_bytes; o += 64) {
      if constexpr (L2) asm volatile("prefetcht1 %0" : : "m"(c[r * stride_bytes + o]));
      else asm volatile("prefetcht0 %0" : : "m"(c[r * stride_bytes + o]));
    }
#endif
}

// Divides query heads [q0, q0 + nq)'s sums by their softmax totals l and, when lse is given, writes
// lse[h] = m + log(l) (the log-sum-exp of the head's scaled scores). An empty range (l = 0) leaves out 0 and
// gives lse -inf, so partials over disjoint keys merge exactly.
inline void finish(const float* m, const float* l, int64_t q0, int64_t nq, int64_t D, float* out, float* lse) {
  for (int64_t i = 0; i < nq; ++i) {
    if (l[i] > 0.f)
      for (int64_t j = 0; j < D; ++j) out[(q0 + i) * D + j] /= l[i];
    if (lse) lse[q0 + i] = l[i] > 0.f ? m[i] + std::log(l[i]) : -std::numeric_limits<float>::infinity();
  }
}

// One sequence, KV heads [h0, h1): q [Hq, D] fp32 -> out [Hq, D] fp32 over tokens [first, ctx). Block by
// block, every head of the range reads the block's rows (contiguous in the pool) while they sit in L1;
// the next block's rows are prefetched first. Each head's arithmetic is the same whatever h0 and h1 are.
// lse, when given: [Hq] fp32, the log-sum-exp of each query head's scaled scores (see finish).
template <typename T>
void attend(const float* q, const T* kp, const T* vp, const int64_t* table, int64_t first, int64_t ctx,
            int64_t bs, int64_t Hkv, int64_t h0, int64_t h1, int64_t G, int64_t D, float scale, float* out,
            float* lse = nullptr) {
  const int64_t stride = Hkv * D, q0 = h0 * G, nq = (h1 - h0) * G;
  std::vector<float> s(G * bs), m(nq, -std::numeric_limits<float>::infinity()), l(nq, 0.f);
  for (int64_t i = 0; i < nq * D; ++i) out[q0 * D + i] = 0.f;
  const int64_t row_bytes = (h1 - h0) * D * sizeof(T), stride_bytes = stride * sizeof(T);
  for (int64_t t0 = first; t0 < ctx;) {
    const int64_t off = t0 % bs, n = std::min(bs - off, ctx - t0);
    const int64_t base = table[t0 / bs] * bs + off;  // pool slot of token t0
    if (t0 + n < ctx) {
      const int64_t next = table[(t0 + n) / bs] * bs, rows = std::min(bs, ctx - t0 - n);
      prefetch_rows(kp + next * stride + h0 * D, rows, stride_bytes, row_bytes);
      prefetch_rows(vp + next * stride + h0 * D, rows, stride_bytes, row_bytes);
    }
    for (int64_t h = h0; h < h1; ++h) {
      const float* qh = q + h * G * D;
      float* oh = out + h * G * D;
      float *mh = m.data() + (h - h0) * G, *lh = l.data() + (h - h0) * G;
      for (int64_t i = 0; i < n; ++i) {
        const T* krow = kp + (base + i) * stride + h * D;
        for (int64_t g = 0; g < G; ++g) s[g * bs + i] = dot(qh + g * D, krow, D) * scale;
      }
      for (int64_t g = 0; g < G; ++g) {
        float mx = mh[g];
        for (int64_t i = 0; i < n; ++i) mx = std::max(mx, s[g * bs + i]);
        const float corr = std::exp(mh[g] - mx);  // 0 on the first block (m = -inf)
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          const float p = std::exp(s[g * bs + i] - mx);
          s[g * bs + i] = p;
          sum += p;
        }
        lh[g] = lh[g] * corr + sum;
        mh[g] = mx;
        float* acc = oh + g * D;
        for (int64_t j = 0; j < D; ++j) acc[j] *= corr;
      }
      for (int64_t i = 0; i < n; ++i) {
        const T* vrow = vp + (base + i) * stride + h * D;
        for (int64_t g = 0; g < G; ++g) axpy(oh + g * D, s[g * bs + i], vrow, D);
      }
    }
    t0 += n;
  }
  finish(m.data(), l.data(), q0, nq, D, out, lse);
}

#ifdef __AVX512F__
// The vector path: head_dim = 16 * ND. Rows are taken in tiles of up to 16 consecutive tokens of one
// block; the 16 scores of a tile come out as one vector (each row's dot product is 16 lane partials summed
// by the same transpose-and-add tree whatever its lane), softmax runs on whole vectors with exp16, and each
// query head's output stays in registers across the tile's value rows. Which lane a row takes depends only
// on its position in its own sequence, so a sequence's result is still the same alone and in any batch.

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// e^x on 16 lanes (Cephes' single-precision polynomial after x = n ln2 + r; about 1 ulp); lanes below
// -87.3 (including -inf) give exactly 0.
inline __m512 exp16(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// v[i] holds row i's 16 partial sums; returns the vector whose lane i is row i's total. A fixed shuffle
// tree: pairs of elements within 128-bit lanes first, then the four 128-bit lanes; every row gets the same
// order of additions.
inline __m512 transpose_sum(const __m512* v) {
  __m512 u[4];
  for (int k = 0; k < 4; ++k) {
    const __m512* r = v + 4 * k;  // rows 4k .. 4k+3
    const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(r[0], r[1]), _mm512_unpackhi_ps(r[0], r[1]));
    const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(r[2], r[3]), _mm512_unpackhi_ps(r[2], r[3]));
    const __m512d a = _mm512_castps_pd(t0), b = _mm512_castps_pd(t1);
    // per 128-bit lane: the sums of that lane's four elements of rows 4k .. 4k+3
    u[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xDD));
}

// Tiles between a tile's L2 prefetch and its use. The pool is read once per step, after the weights' stream
// has flushed the caches, so a tile fetched only when reached waits on memory latency. Measured over 30
// layers' pools at 1024 tokens (cold, one thread): 2-3 ahead into L2 ~1.3x faster than none; the next tile
// into L1 alone gains nothing.
constexpr int64_t kAhead = 3;

// Into L2: the K and V rows of heads [h0, h1) of the tile of up to 16 tokens from token t (none past ctx).
template <typename T>
inline void prefetch_tile(const T* kp, const T* vp, const int64_t* table, int64_t t, int64_t ctx, int64_t bs,
                          int64_t stride, int64_t h0, int64_t h1, int64_t D) {
  if (t >= ctx) return;
  const int64_t rows = std::min({bs - t % bs, ctx - t, int64_t(16)}), at = table[t / bs] * bs + t % bs;
  prefetch_rows<true>(kp + at * stride + h0 * D, rows, stride * sizeof(T), (h1 - h0) * D * sizeof(T));
  prefetch_rows<true>(vp + at * stride + h0 * D, rows, stride * sizeof(T), (h1 - h0) * D * sizeof(T));
}

template <int ND, typename T>
void attend16(const float* q, const T* kp, const T* vp, const int64_t* table, int64_t first, int64_t ctx,
              int64_t bs, int64_t Hkv, int64_t h0, int64_t h1, int64_t G, float scale, float* out,
              float* lse = nullptr) {
  constexpr int64_t D = 16 * ND;
  const int64_t stride = Hkv * D, nq = (h1 - h0) * G, q0 = h0 * G;
  std::vector<float> m(nq, -std::numeric_limits<float>::infinity()), l(nq, 0.f);
  for (int64_t i = 0; i < nq * D; ++i) out[q0 * D + i] = 0.f;
  alignas(64) float p[16];
  __m512 part[16];
  for (int64_t k = 0; k <= kAhead; ++k)  // the first tiles
    prefetch_tile(kp, vp, table, first + 16 * k, ctx, bs, stride, h0, h1, D);
  for (int64_t t0 = first; t0 < ctx;) {
    const int64_t off = t0 % bs, n = std::min({bs - off, ctx - t0, int64_t(16)});
    const int64_t base = table[t0 / bs] * bs + off;  // pool slot of token t0; the tile's rows follow it
    prefetch_tile(kp, vp, table, t0 + n + 16 * kAhead, ctx, bs, stride, h0, h1, D);  // kAhead past the next
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t qi = h * G + g;  // query head
        const float* qh = q + qi * D;
        __m512 qv[ND];
        for (int c = 0; c < ND; ++c) qv[c] = _mm512_loadu_ps(qh + 16 * c);
        for (int64_t i = 0; i < 16; ++i) {
          if (i >= n) { part[i] = _mm512_setzero_ps(); continue; }
          const T* krow = kp + (base + i) * stride + h * D;
          __m512 acc = _mm512_mul_ps(qv[0], load16(krow));
          for (int c = 1; c < ND; ++c) acc = _mm512_fmadd_ps(qv[c], load16(krow + 16 * c), acc);
          part[i] = acc;
        }
        const __m512 s = _mm512_mul_ps(transpose_sum(part), _mm512_set1_ps(scale));
        float& mh = m[qi - q0];
        const float mx = std::max(mh, _mm512_mask_reduce_max_ps(valid, s));
        const float corr = exp16(_mm512_set1_ps(mh - mx))[0];  // 0 on the first tile (m = -inf)
        const __m512 pv = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(s, _mm512_set1_ps(mx))));
        l[qi - q0] = l[qi - q0] * corr + _mm512_reduce_add_ps(pv);
        mh = mx;
        _mm512_store_ps(p, pv);
        float* oh = out + qi * D;
        __m512 o[ND];
        const __m512 cv = _mm512_set1_ps(corr);
        for (int c = 0; c < ND; ++c) o[c] = _mm512_mul_ps(_mm512_loadu_ps(oh + 16 * c), cv);
        for (int64_t i = 0; i < n; ++i) {
          const T* vrow = vp + (base + i) * stride + h * D;
          const __m512 pi = _mm512_set1_ps(p[i]);
          for (int c = 0; c < ND; ++c) o[c] = _mm512_fmadd_ps(pi, load16(vrow + 16 * c), o[c]);
        }
        for (int c = 0; c < ND; ++c) _mm512_storeu_ps(oh + 16 * c, o[c]);
      }
    }
    t0 += n;
  }
  finish(m.data(), l.data(), q0, nq, D, out, lse);
}
#endif

// The vector path for head_dim 16 * ND where it is built, else the portable one above.
template <typename T>
void attend_any(const float* q, const T* kp, const T* vp, const int64_t* table, int64_t first, int64_t ctx,
                int64_t bs, int64_t Hkv, int64_t h0, int64_t h1, int64_t G, int64_t D, float scale, float* out,
                float* lse = nullptr) {
#ifdef __AVX512F__
  switch (D) {
    case 32: return attend16<2>(q, kp, vp, table, first, ctx, bs, Hkv, h0, h1, G, scale, out, lse);
    case 64: return attend16<4>(q, kp, vp, table, first, ctx, bs, Hkv, h0, h1, G, scale, out, lse);
    case 128: return attend16<8>(q, kp, vp, table, first, ctx, bs, Hkv, h0, h1, G, scale, out, lse);
    default: break;
  }
#endif
  attend(q, kp, vp, table, first, ctx, bs, Hkv, h0, h1, G, D, scale, out, lse);
}

}  // namespace meshlm_attend
