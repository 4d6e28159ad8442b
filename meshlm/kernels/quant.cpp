// Linear layers over packed weights on AVX-512: y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n]). Every format
// is packed 16 rows together (meshlm/kernels/qformat.py) so that the weights are one linear stream and
// each of a vector's 16 lanes is one output row (no horizontal sums):
//   F32  [G, K, 16]: per column k the 16 rows' values; BF16 [G, K/2, 16, 2]: per column pair, row r's pair
//   in lane r (widened to fp32 exactly); both accumulate x (fp32) * w with FMAs in fp32.
//   Q8_0 / Q4_0 / Q4_1 (VNNI): per block of 32 columns, 16 float16 scales d (Q4_1: then 16 minimums m),
//   then the quants with row r's 4-byte chunk c at byte 64*c + 4*r (Q8_0 quants + 128).
//
// x is quantized per row and block of 32 to int8 (d_x = max|x| / 127, q_x = round-half-even(x / d_x)),
// as llama.cpp does; one vpdpbusd multiplies 4 quant bytes of each of 16 rows by 4 int8 of x and adds
// them to that row's int32 lane, so a block's sum is exact and each of the 16 lanes is one output row.
// Per block: Q4_0 sum d*(q-8)*d_x*q_x = d*d_x*(sum q*q_x - 8*sum q_x); Q8_0 the same with 128 for the
// stored offset; Q4_1 d*d_x*sum q*q_x + m*d_x*sum q_x. Blocks are summed in fp32 in column order, so a
// row's result does not depend on the other rows of x (batch invariance) or on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#define QTARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))

namespace {

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

template <typename T>
QTARGET void quantize_x(const T* x, int64_t M, QX& qx) {
  const int64_t K = qx.K, nb = qx.nb;
  if (static_cast<int64_t>(qx.q.size()) < M * K) qx.q.resize(M * K);
  if (static_cast<int64_t>(qx.d.size()) < M * nb) {
    qx.d.resize(M * nb);
    qx.s.resize(M * nb);
  }
  at::parallel_for(0, M * nb, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = i / nb, b = i % nb;
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
  });
}

inline int32_t load32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// One group of 16 weight rows against rows m0 .. m0+MT of x: the 16 dot products of each x row in res[m].
// Each x row keeps P int32 partial sums per block (P * MT independent vpdpbusd chains hide its latency).
template <int FMT, int MT>
QTARGET void group_dot(const uint8_t* g, const QX& qx, int64_t m0, __m512* res) {
  constexpr int SB = FMT == kQ4_1 ? 64 : 32;     // scale bytes per packed block
  constexpr int QB = FMT == kQ8_0 ? 512 : 256;   // quant bytes per packed block
  constexpr int P = MT == 1 ? 4 : 2;
  const int64_t nb = qx.nb, K = qx.K;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
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
        for (int m = 0; m < MT; ++m)
          isum[m][c % P] = _mm512_dpbusd_epi32(isum[m][c % P], w, _mm512_set1_epi32(load32(xrow[m] + b * kBlock + 4 * c)));
      }
    } else {
      for (int c = 0; c < 4; ++c) {
        const __m512i w = _mm512_loadu_si512(q + 64 * c);
        const __m512i lo = _mm512_and_si512(w, low4);                         // elements 4c .. 4c+3
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);  // elements 16+4c ..
        for (int m = 0; m < MT; ++m) {
          const int8_t* xq = xrow[m] + b * kBlock;
          isum[m][(2 * c) % P] = _mm512_dpbusd_epi32(isum[m][(2 * c) % P], lo, _mm512_set1_epi32(load32(xq + 4 * c)));
          isum[m][(2 * c + 1) % P] =
              _mm512_dpbusd_epi32(isum[m][(2 * c + 1) % P], hi, _mm512_set1_epi32(load32(xq + 16 + 4 * c)));
        }
      }
    }
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
    for (int m = 0; m < MT; ++m) {
      const int64_t i = (m0 + m) * nb + b;
      const float dx = qx.d[i];
      const int32_t sx = qx.s[i];
      __m512i v = isum[m][0];
      for (int p = 1; p < P; ++p) v = _mm512_add_epi32(v, isum[m][p]);
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

// Widen bf16 x [M, K] to fp32 (exact) into a reused buffer; fp32 x is read in place.
const float* x_fp32(const at::Tensor& x, std::vector<float>& buf) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  const int64_t n = x.numel();
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  const c10::BFloat16* src = x.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  return buf.data();
}

// The packed shape of a weight of N rows and K columns in format fmt (see qformat.py).
std::vector<int64_t> packed_shape(int fmt, int64_t N, int64_t K) {
  const int64_t G = (N + kGroup - 1) / kGroup;
  if (fmt == kF32) return {G, K, kGroup};
  if (fmt == kBF16) return {G, K / 2, kGroup, 2};
  return {G, K / kBlock, kGroup * ((fmt == kQ4_1 ? 4 : 2) + (fmt == kQ8_0 ? 32 : 16))};
}

// x [..., K] fp32 or bf16; ws packed weights (qformat.py) of formats fmts and rows ns; bs bias [N_i] or
// None: [x @ w_i.T + b_i] as [..., N_i] in x's dtype. Quantized formats need K % 32 == 0, BF16 an even K.
std::vector<at::Tensor> quant_linear_many(const at::Tensor& x_in, at::TensorList ws, at::IntArrayRef fmts,
                                          at::IntArrayRef ns, const c10::List<c10::optional<at::Tensor>>& bs) {
  TORCH_CHECK(x_in.dim() >= 1, "packed_linear: x [..., K]");
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "packed_linear: x fp32 or bf16");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0;
  std::vector<int64_t> out_shape = x.sizes().vec();
  TORCH_CHECK(ws.size() == fmts.size() && ws.size() == ns.size() && ws.size() == bs.size(),
              "packed_linear: one format, row count and bias per weight");
  static thread_local QX qx_reused;  // the vectors only grow; named through a reference, because the
  static thread_local std::vector<float> xbuf;  // worker threads of parallel_for have thread_locals of their own
  QX& qx = qx_reused;
  qx.K = K;
  qx.nb = K / kBlock;
  bool quantized = false, floats = false;
  std::vector<at::Tensor> outs, biases;
  std::vector<Job> jobs;
  std::vector<int64_t> first(ws.size() + 1, 0);  // first global group of each job
  for (size_t i = 0; i < ws.size(); ++i) {
    const at::Tensor& w = ws[i];
    const int fmt = static_cast<int>(fmts[i]);
    TORCH_CHECK(fmt >= kQ4_0 && fmt <= kBF16, "packed_linear: unknown format ", fmt);
    const auto want = at::ScalarType(fmt == kF32 ? at::kFloat : fmt == kBF16 ? at::kBFloat16 : at::kByte);
    TORCH_CHECK(fmt == kF32 || K % (fmt == kBF16 ? 2 : kBlock) == 0, "packed_linear: K=", K, " does not fit format ", fmt);
    TORCH_CHECK(w.scalar_type() == want && w.is_contiguous() && w.sizes() == at::IntArrayRef(packed_shape(fmt, ns[i], K)),
                "packed_linear: weight ", i, " is not packed for N=", ns[i], " K=", K, " format ", fmt);
    (fmt >= kF32 ? floats : quantized) = true;
    const c10::optional<at::Tensor> b = bs.get(i);
    biases.push_back(b.has_value() && b->defined() ? b->to(at::kFloat).contiguous() : at::Tensor());
    out_shape.back() = ns[i];
    outs.push_back(at::empty(out_shape, x.options()));
    jobs.push_back({w.data_ptr(), fmt, ns[i], biases.back().defined() ? biases.back().data_ptr<float>() : nullptr,
                    outs.back().data_ptr()});
    first[i + 1] = first[i] + packed_shape(fmt, ns[i], K)[0];
  }
  if (M == 0) return outs;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (quantized) {
    if (bf16) quantize_x(x.data_ptr<c10::BFloat16>(), M, qx);
    else quantize_x(x.data_ptr<float>(), M, qx);
  }
  const float* xf = floats ? x_fp32(x, xbuf) : nullptr;
  const int64_t grain = M >= kMT ? 1 : 4;  // groups per task: small for prefill, a few for decode
  at::parallel_for(0, first.back(), grain, [&](int64_t g0, int64_t g1) {
    size_t i = 0;
    for (int64_t g = g0; g < g1; ++g) {
      while (g >= first[i + 1]) ++i;
      const Job& j = jobs[i];
      const int64_t local = g - first[i];
      switch (j.fmt) {
        case kQ4_0: run_group<kQ4_0>(j, local, qx, xf, M, bf16); break;
        case kQ4_1: run_group<kQ4_1>(j, local, qx, xf, M, bf16); break;
        case kQ8_0: run_group<kQ8_0>(j, local, qx, xf, M, bf16); break;
        case kF32: run_group<kF32>(j, local, qx, xf, M, bf16); break;
        default: run_group<kBF16>(j, local, qx, xf, M, bf16); break;
      }
    }
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshlm_kernels, m) {
  m.def("quant_linear_many(Tensor x, Tensor[] ws, int[] fmts, int[] ns, Tensor?[] bs) -> Tensor[]");
  m.impl("quant_linear_many", c10::DispatchKey::CPU, TORCH_FN(quant_linear_many));
}
