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

// Every block of R rows in parallel, then the N % R leftover rows one by one.
template <int R, typename Block>
void for_rows(int64_t N, const Block& block) {
  const int64_t blocks = N / R;
  at::parallel_for(0, blocks, kGrain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) block(std::integral_constant<int, R>(), b * R);
  });
  for (int64_t n = blocks * R; n < N; ++n) block(std::integral_constant<int, 1>(), n);
}

template <int M>
void run(const at::Tensor& x, const at::Tensor& w, const float* bias, at::Tensor& out) {
  const int64_t K = x.size(1), N = w.size(0), K2 = K / 2;
  std::vector<float> split(2 * M * K2);  // [even | odd] fp32 copies of x
  const c10::BFloat16* xb = x.data_ptr<c10::BFloat16>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K2; ++j) {
      split[m * K2 + j] = static_cast<float>(xb[m * K + 2 * j]);
      split[(M + m) * K2 + j] = static_cast<float>(xb[m * K + 2 * j + 1]);
    }
  const float *xe = split.data(), *xo = split.data() + M * K2;
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>());
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  constexpr int R = M <= 4 ? ROWS : 2;  // M * R accumulators + R weight vectors fit 32 registers
  for_rows<R>(N, [&](auto r, int64_t n0) {
    block_bf16<M, decltype(r)::value>(xe, xo, wp, bias, op, n0, N, K);
  });
}

// x [M, K] and w [N, K] contiguous bf16, K even, 1 <= M <= 8; bias [N] or None.
at::Tensor small_m_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "small_m_linear: x [M, K], w [N, K]");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "small_m_linear: x and w must be contiguous");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "small_m_linear: x and w must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.size(1) % 2 == 0, "small_m_linear: bf16 with an even K");
  const int64_t M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "small_m_linear: 1 <= M <= 8");
  at::Tensor bias;
  if (b.has_value() && b->defined()) bias = b->to(at::kFloat).contiguous();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({M, w.size(0)}, x.options());
  switch (M) {
    case 1: run<1>(x, w, bp, out); break;
    case 2: run<2>(x, w, bp, out); break;
    case 3: run<3>(x, w, bp, out); break;
    case 4: run<4>(x, w, bp, out); break;
    case 5: run<5>(x, w, bp, out); break;
    case 6: run<6>(x, w, bp, out); break;
    case 7: run<7>(x, w, bp, out); break;
    default: run<8>(x, w, bp, out); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(meshlm_kernels, m) {
  m.def("small_m_linear(Tensor x, Tensor w, Tensor? b) -> Tensor");
  m.impl("small_m_linear", c10::DispatchKey::CPU, TORCH_FN(small_m_linear));
}
