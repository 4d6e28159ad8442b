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
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>

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

// Rows ids [T] of a packed weight w (format fmt, qformat.py's layouts above) dequantized to fp32 [T, K]: an
// embedding lookup. Each value is what qformat.dequantize_rows computes (d * q; Q4_1 d * q + m: a multiply,
// then an add), so the bits are the same.
at::Tensor packed_rows(const at::Tensor& w, int64_t fmt, const at::Tensor& ids_in) {
  TORCH_CHECK(w.is_contiguous() && fmt >= kQ4_0 && fmt <= kBF16, "packed_rows: a packed weight and its format");
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const int64_t T = ids.numel(), G = w.size(0);
  const bool quant = fmt < kF32;
  const int64_t SB = fmt == kQ4_1 ? 64 : 32, BB = quant ? SB + (fmt == kQ8_0 ? 512 : 256) : 0;
  const int64_t nb = quant ? w.size(1) : 0, K = quant ? nb * kBlock : fmt == kF32 ? w.size(1) : 2 * w.size(1);
  if (quant) TORCH_CHECK(w.dim() == 3 && w.size(2) == BB, "packed_rows: not a packed quantized weight");
  at::Tensor out = at::empty({T, K}, w.options().dtype(at::kFloat));
  const int64_t* id = ids.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(id[t] >= 0 && id[t] < G * kGroup, "packed_rows: row ", id[t], " outside the weight");
    const int64_t g = id[t] / kGroup, r = id[t] % kGroup;
    float* row = o + t * K;
    if (fmt == kF32) {
      const float* gw = w.data_ptr<float>() + g * K * kGroup;
      for (int64_t k = 0; k < K; ++k) row[k] = gw[k * kGroup + r];
    } else if (fmt == kBF16) {
      const c10::BFloat16* gw = w.data_ptr<c10::BFloat16>() + g * K * kGroup;
      for (int64_t k = 0; k < K; k += 2) {
        row[k] = static_cast<float>(gw[(k / 2 * kGroup + r) * 2]);
        row[k + 1] = static_cast<float>(gw[(k / 2 * kGroup + r) * 2 + 1]);
      }
    } else {
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = w.data_ptr<uint8_t>() + (g * nb + b) * BB;
        uint16_t h;
        std::memcpy(&h, blk + 2 * r, 2);
        const float d = static_cast<float>(c10::Half(h, c10::Half::from_bits()));
        float mn = 0.f;
        if (fmt == kQ4_1) {
          std::memcpy(&h, blk + 32 + 2 * r, 2);
          mn = static_cast<float>(c10::Half(h, c10::Half::from_bits()));
        }
        const uint8_t* q = blk + SB;  // row r's 4-byte chunk c at 64 * c + 4 * r
        float* dst = row + b * kBlock;
        if (fmt == kQ8_0) {
          for (int64_t e = 0; e < kBlock; ++e)
            dst[e] = d * static_cast<float>(static_cast<int8_t>(q[64 * (e / 4) + 4 * r + e % 4] ^ 0x80));
        } else {
          for (int64_t e = 0; e < 16; ++e) {
            const uint8_t byte = q[64 * (e / 4) + 4 * r + e % 4];
            const float lo = static_cast<float>(byte & 0x0F), hi = static_cast<float>(byte >> 4);
            if (fmt == kQ4_0) {
              dst[e] = d * (lo - 8.f);
              dst[e + 16] = d * (hi - 8.f);
            } else {
              dst[e] = d * lo + mn;
              dst[e + 16] = d * hi + mn;
            }
          }
        }
      }
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshlm_kernels, m) {
  m.def("quant_linear_many(Tensor x, Tensor[] ws, int[] fmts, int[] ns, Tensor?[] bs) -> Tensor[]");
  m.impl("quant_linear_many", c10::DispatchKey::CPU, TORCH_FN(quant_linear_many));
  m.def("packed_rows(Tensor w, int fmt, Tensor ids) -> Tensor");
  m.impl("packed_rows", c10::DispatchKey::CPU, TORCH_FN(packed_rows));
}
