// Small-M bf16 linear layers on AVX-512: y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n]), w [N, K] row-major.
// Decode at batch 1 is a matrix-vector product that streams every weight once, so this is a bandwidth
// kernel: ROWS weight rows per block, one fp32 accumulator per (x row, weight row), software prefetch
// PREFETCH rows ahead, the blocks split over at::parallel_for threads. bf16 values are widened to fp32
// exactly (a bf16 is the top half of an fp32) and accumulate in fp32, like oneDNN, in another order.
// (fp32 weights stay with F.linear: MKL's GEMV already streams at the memory bandwidth.)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#ifndef ROWS
#define ROWS 4  // weight rows per block (for M <= 4)
#endif
#ifndef PREFETCH
#define PREFETCH 8  // software prefetch this many rows ahead (0: hardware prefetcher only)
#endif

namespace {

constexpr int64_t kGrain = 16;  // blocks per parallel task

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
}

// bf16 weights: xe / xo [M, K/2] fp32 hold x's even / odd elements. A 32-bit lane of w holds the pair
// (even, odd): lane << 16 is the even element as fp32 and lane & 0xffff0000 the odd one, both exact.
template <int M, int R>
inline void block_bf16(const float* xe, const float* xo, const uint16_t* w, const float* bias,
                       c10::BFloat16* out, int64_t n0, int64_t N, int64_t K) {
  const int64_t K2 = K / 2;
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const uint16_t *row[R], *ahead[R];
  __m512 acc[M][R];
  for (int r = 0; r < R; ++r) {
    row[r] = w + (n0 + r) * K;
    ahead[r] = w + std::min<int64_t>(n0 + r + PREFETCH, N - 1) * K;
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < K2; j += 16) {
    const __mmask16 mask = tail_mask(K2 - j);
    __m512 we[R], wo[R];
    for (int r = 0; r < R; ++r) {
      const __m512i v = _mm512_maskz_loadu_epi32(mask, row[r] + 2 * j);
      if (PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(ahead[r] + 2 * j), _MM_HINT_T0);
      we[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      wo[r] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
    }
    for (int m = 0; m < M; ++m) {
      const __m512 xev = _mm512_maskz_loadu_ps(mask, xe + m * K2 + j);
      const __m512 xov = _mm512_maskz_loadu_ps(mask, xo + m * K2 + j);
      for (int r = 0; r < R; ++r) {
        acc[m][r] = _mm512_fmadd_ps(we[r], xev, acc[m][r]);
        acc[m][r] = _mm512_fmadd_ps(wo[r], xov, acc[m][r]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      out[m * N + n0 + r] = c10::BFloat16(_mm512_reduce_add_ps(acc[m][r]) + (bias ? bias[n0 + r] : 0.f));
}

// x [M, K] bf16 as fp32 [even | odd] halves [2, M, K/2]: what block_bf16 reads.
template <int M>
std::vector<float> split_x(const at::Tensor& x) {
  const int64_t K = x.size(1), K2 = K / 2;
  std::vector<float> split(2 * M * K2);
  const c10::BFloat16* xb = x.data_ptr<c10::BFloat16>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K2; ++j) {
      split[m * K2 + j] = static_cast<float>(xb[m * K + 2 * j]);
      split[(M + m) * K2 + j] = static_cast<float>(xb[m * K + 2 * j + 1]);
    }
  return split;
}

// One product of a run: weight [N, K], bias or null, output [M, N].
struct Job {
  const uint16_t* w;
  const float* bias;
  c10::BFloat16* out;
  int64_t N;
};

// Every job's blocks of R rows in one parallel region, then the N % R leftover rows one by one.
template <int M>
void run(const at::Tensor& x, const std::vector<Job>& jobs) {
  const int64_t K = x.size(1), K2 = K / 2;
  const std::vector<float> split = split_x<M>(x);
  const float *xe = split.data(), *xo = split.data() + M * K2;
  constexpr int R = M <= 4 ? ROWS : 2;  // M * R accumulators + R weight vectors fit 32 registers
  std::vector<int64_t> first(jobs.size() + 1, 0);  // first global block of each job
  for (size_t i = 0; i < jobs.size(); ++i) first[i + 1] = first[i] + jobs[i].N / R;
  at::parallel_for(0, first.back(), kGrain, [&](int64_t b0, int64_t b1) {
    size_t i = 0;
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= first[i + 1]) ++i;
      const Job& j = jobs[i];
      block_bf16<M, R>(xe, xo, j.w, j.bias, j.out, (b - first[i]) * R, j.N, K);
    }
  });
  for (const Job& j : jobs)
    for (int64_t n = j.N / R * R; n < j.N; ++n) block_bf16<M, 1>(xe, xo, j.w, j.bias, j.out, n, j.N, K);
}

// x [M, K] and each w [N_i, K] contiguous bf16, K even, 1 <= M <= 8; bias [N_i] or None: [x @ w_i.T + b_i].
std::vector<at::Tensor> small_m_linear_many(const at::Tensor& x, at::TensorList ws,
                                            const c10::List<c10::optional<at::Tensor>>& bs) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "small_m_linear: x [M, K] contiguous");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.size(1) % 2 == 0, "small_m_linear: bf16 with an even K");
  TORCH_CHECK(bs.size() == ws.size(), "small_m_linear: one bias (or None) per weight");
  const int64_t M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "small_m_linear: 1 <= M <= 8");
  std::vector<at::Tensor> outs, biases;
  std::vector<Job> jobs;
  for (size_t i = 0; i < ws.size(); ++i) {
    const at::Tensor& w = ws[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1) && w.is_contiguous(), "small_m_linear: w [N, K] contiguous");
    TORCH_CHECK(w.scalar_type() == at::kBFloat16, "small_m_linear: x and w must share a dtype");
    const c10::optional<at::Tensor> b = bs.get(i);
    biases.push_back(b.has_value() && b->defined() ? b->to(at::kFloat).contiguous() : at::Tensor());
    outs.push_back(at::empty({M, w.size(0)}, x.options()));
    jobs.push_back({reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>()),
                    biases.back().defined() ? biases.back().data_ptr<float>() : nullptr,
                    outs.back().data_ptr<c10::BFloat16>(), w.size(0)});
  }
  switch (M) {
    case 1: run<1>(x, jobs); break;
    case 2: run<2>(x, jobs); break;
    case 3: run<3>(x, jobs); break;
    case 4: run<4>(x, jobs); break;
    case 5: run<5>(x, jobs); break;
    case 6: run<6>(x, jobs); break;
    case 7: run<7>(x, jobs); break;
    default: run<8>(x, jobs); break;
  }
  return outs;
}

at::Tensor small_m_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  c10::List<c10::optional<at::Tensor>> bs;
  bs.push_back(b);
  return small_m_linear_many(x, {w}, bs)[0];
}

}  // namespace

TORCH_LIBRARY(meshlm_kernels, m) {
  m.def("small_m_linear(Tensor x, Tensor w, Tensor? b) -> Tensor");
  m.def("small_m_linear_many(Tensor x, Tensor[] ws, Tensor?[] bs) -> Tensor[]");
  m.impl("small_m_linear", c10::DispatchKey::CPU, TORCH_FN(small_m_linear));
  m.impl("small_m_linear_many", c10::DispatchKey::CPU, TORCH_FN(small_m_linear_many));
}
