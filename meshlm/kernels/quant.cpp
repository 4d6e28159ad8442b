// Quantized linear layers on AVX-512 VNNI: y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n]), w packed by
// meshlm/kernels/qformat.py: per group of 16 rows and block of 32 columns, 16 float16 scales d (Q4_1: then
// 16 minimums m), then the quants with row r's 4-byte chunk c at byte 64*c + 4*r (Q8_0 quants + 128).
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

constexpr int kQ4_0 = 0, kQ4_1 = 1, kQ8_0 = 2;
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

// One product of a call: packed weight, format, rows N, bias (fp32) or null, output [M, N].
struct Job {
  const uint8_t* w;
  int fmt;
  int64_t N;
  const float* bias;
  void* out;
};

template <int FMT>
QTARGET void run_group(const Job& j, int64_t g, const QX& qx, int64_t M, bool bf16) {
  const int64_t nb = qx.nb;
  constexpr int64_t BB = (FMT == kQ4_1 ? 64 : 32) + (FMT == kQ8_0 ? 512 : 256);
  const uint8_t* gw = j.w + g * nb * BB;
  const int64_t n0 = g * kGroup, lanes = std::min<int64_t>(kGroup, j.N - n0);
  alignas(64) float tmp[kGroup];
  __m512 res[kMT];
  for (int64_t m0 = 0; m0 < M; m0 += kMT) {
    const int64_t mt = std::min<int64_t>(kMT, M - m0);
    switch (mt) {
      case 1: group_dot<FMT, 1>(gw, qx, m0, res); break;
      case 2: group_dot<FMT, 2>(gw, qx, m0, res); break;
      case 3: group_dot<FMT, 3>(gw, qx, m0, res); break;
      default: group_dot<FMT, 4>(gw, qx, m0, res); break;
    }
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

// x [M, K] fp32 or bf16 contiguous, K % 32 == 0; ws packed uint8 [ceil(N_i/16), K/32, 16*block bytes];
// fmts the format of each; ns N_i; bs bias [N_i] or None: [x @ w_i.T + b_i] in x's dtype.
std::vector<at::Tensor> quant_linear_many(const at::Tensor& x, at::TensorList ws, at::IntArrayRef fmts,
                                          at::IntArrayRef ns, const c10::List<c10::optional<at::Tensor>>& bs) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quant_linear: x [M, K] contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "quant_linear: x fp32 or bf16");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kBlock == 0, "quant_linear: K must be a multiple of 32");
  TORCH_CHECK(ws.size() == fmts.size() && ws.size() == ns.size() && ws.size() == bs.size(),
              "quant_linear: one format, row count and bias per weight");
  static thread_local QX qx;  // reused: its vectors only grow
  qx.K = K;
  qx.nb = K / kBlock;
  std::vector<at::Tensor> outs, biases;
  std::vector<Job> jobs;
  std::vector<int64_t> first(ws.size() + 1, 0);  // first global group of each job
  for (size_t i = 0; i < ws.size(); ++i) {
    const at::Tensor& w = ws[i];
    const int fmt = static_cast<int>(fmts[i]);
    TORCH_CHECK(fmt == kQ4_0 || fmt == kQ4_1 || fmt == kQ8_0, "quant_linear: unknown format ", fmt);
    const int64_t bb = kGroup * ((fmt == kQ4_1 ? 4 : 2) + (fmt == kQ8_0 ? 32 : 16));
    const int64_t groups = (ns[i] + kGroup - 1) / kGroup;
    TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 3 && w.size(0) == groups &&
                    w.size(1) == qx.nb && w.size(2) == bb,
                "quant_linear: weight ", i, " is not packed for N=", ns[i], " K=", K);
    const c10::optional<at::Tensor> b = bs.get(i);
    biases.push_back(b.has_value() && b->defined() ? b->to(at::kFloat).contiguous() : at::Tensor());
    outs.push_back(at::empty({M, ns[i]}, x.options()));
    jobs.push_back({w.data_ptr<uint8_t>(), fmt, ns[i],
                    biases.back().defined() ? biases.back().data_ptr<float>() : nullptr, outs.back().data_ptr()});
    first[i + 1] = first[i] + groups;
  }
  if (M == 0) return outs;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (bf16) quantize_x(x.data_ptr<c10::BFloat16>(), M, qx);
  else quantize_x(x.data_ptr<float>(), M, qx);
  const int64_t grain = M >= kMT ? 1 : 4;  // groups per task: small for prefill, a few for decode
  at::parallel_for(0, first.back(), grain, [&](int64_t g0, int64_t g1) {
    size_t i = 0;
    for (int64_t g = g0; g < g1; ++g) {
      while (g >= first[i + 1]) ++i;
      const Job& j = jobs[i];
      switch (j.fmt) {
        case kQ4_0: run_group<kQ4_0>(j, g - first[i], qx, M, bf16); break;
        case kQ4_1: run_group<kQ4_1>(j, g - first[i], qx, M, bf16); break;
        default: run_group<kQ8_0>(j, g - first[i], qx, M, bf16); break;
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
