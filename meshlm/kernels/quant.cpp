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
#include <torch/library.h>

#include "quant.h"

namespace {

using namespace meshlm_quant;

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
  qx_reserve(qx, M, K);
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
    at::parallel_for(0, M * qx.nb, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        if (bf16) quantize_block(x.data_ptr<c10::BFloat16>(), i / qx.nb, i % qx.nb, qx);
        else quantize_block(x.data_ptr<float>(), i / qx.nb, i % qx.nb, qx);
      }
    });
  }
  const float* xf = !floats ? nullptr : bf16 ? widen(x.data_ptr<c10::BFloat16>(), x.numel(), xbuf) : x.data_ptr<float>();
  const int64_t grain = M >= kMT ? 1 : 4;  // groups per task: small for prefill, a few for decode
  at::parallel_for(0, first.back(), grain, [&](int64_t g0, int64_t g1) {
    size_t i = 0;
    for (int64_t g = g0; g < g1; ++g) {
      while (g >= first[i + 1]) ++i;
      run_group_any(jobs[i], g - first[i], qx, xf, M, bf16);
    }
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshlm_kernels, m) {
  m.def("quant_linear_many(Tensor x, Tensor[] ws, int[] fmts, int[] ns, Tensor?[] bs) -> Tensor[]");
  m.impl("quant_linear_many", c10::DispatchKey::CPU, TORCH_FN(quant_linear_many));
}
