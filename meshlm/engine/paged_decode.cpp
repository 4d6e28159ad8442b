// Paged decode attention on the CPU: the ops over a batch of decodes, whole (paged_decode) or a partial with
// its log-sum-exp (paged_decode_lse, a context-parallel rank's shard). The arithmetic is in
// meshlm/kernels/attend.h, shared with the whole-stack decode op of meshlm/kernels/decode.cpp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "../kernels/attend.h"

namespace {

using namespace meshlm_attend;

// q [B, Hq, D]; k_pool, v_pool [slots, Hkv, D] (contiguous); tables [B, max_blocks] int64;
// starts, lens [B] int64 (attend to tokens [starts[b], lens[b]) of table b; an empty range gives out 0)
// -> out [B, Hq, D] fp32, and, when lse is defined ([B, Hq] fp32), each query head's log-sum-exp.
at::Tensor attend_batch(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& tables, const at::Tensor& starts, const at::Tensor& lens,
                        int64_t block_size, double scale, float* lse) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && k_pool.sizes() == v_pool.sizes(), "bad shapes");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.scalar_type() == v_pool.scalar_type());
  TORCH_CHECK(tables.scalar_type() == at::kLong && starts.scalar_type() == at::kLong &&
              lens.scalar_type() == at::kLong, "tables, starts and lens must be int64");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_pool.size(1);
  TORCH_CHECK(k_pool.size(2) == D && Hq % Hkv == 0, "head_dim or head counts disagree");
  const int64_t G = Hq / Hkv, max_blocks = tables.size(1);
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  const at::Tensor tab = tables.contiguous(), st = starts.contiguous(), ln = lens.contiguous();
  at::Tensor out = at::empty({B, Hq, D}, q.options().dtype(at::kFloat));
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t *tp = tab.data_ptr<int64_t>(), *sp = st.data_ptr<int64_t>(), *lp = ln.data_ptr<int64_t>();
  // A task is a whole sequence when there are enough sequences to share out, else one KV head of one.
  const int64_t split = B >= 2 * at::get_num_threads() ? 1 : Hkv;
  auto run = [&](auto* kbase, auto* vbase) {
    at::parallel_for(0, B * split, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / split, h0 = split == 1 ? 0 : task % split, h1 = split == 1 ? Hkv : h0 + 1;
        attend_any(qp + b * Hq * D, kbase, vbase, tp + b * max_blocks, sp[b], lp[b], block_size, Hkv, h0, h1, G,
                   D, static_cast<float>(scale), op + b * Hq * D, lse ? lse + b * Hq : nullptr);
      }
    });
  };
  if (k_pool.scalar_type() == at::kFloat) {
    run(k_pool.data_ptr<float>(), v_pool.data_ptr<float>());
  } else if (k_pool.scalar_type() == at::kBFloat16) {
    run(k_pool.data_ptr<c10::BFloat16>(), v_pool.data_ptr<c10::BFloat16>());
  } else {
    TORCH_CHECK(false, "paged_decode takes float32 or bfloat16 pools");
  }
  return out;
}

// The decode op: attend_batch's output in q's dtype.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& tables, const at::Tensor& starts, const at::Tensor& lens,
                        int64_t block_size, double scale) {
  const at::Tensor out = attend_batch(q, k_pool, v_pool, tables, starts, lens, block_size, scale, nullptr);
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

// The partial op (a context-parallel rank's shard): out [B, Hq, D] fp32 and lse [B, Hq] fp32, for an exact
// log-sum-exp merge with the other ranks' partials.
std::tuple<at::Tensor, at::Tensor> paged_decode_lse(const at::Tensor& q, const at::Tensor& k_pool,
                                                    const at::Tensor& v_pool, const at::Tensor& tables,
                                                    const at::Tensor& starts, const at::Tensor& lens,
                                                    int64_t block_size, double scale) {
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  at::Tensor out = attend_batch(q, k_pool, v_pool, tables, starts, lens, block_size, scale, lse.data_ptr<float>());
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY(meshlm_paged, m) {
  m.def("paged_decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor tables, Tensor starts, Tensor lens, "
        "int block_size, float scale) -> Tensor");
  m.def("paged_decode_lse(Tensor q, Tensor k_pool, Tensor v_pool, Tensor tables, Tensor starts, Tensor lens, "
        "int block_size, float scale) -> (Tensor, Tensor)");
  m.impl("paged_decode", c10::DispatchKey::CPU, TORCH_FN(paged_decode));
  m.impl("paged_decode_lse", c10::DispatchKey::CPU, TORCH_FN(paged_decode_lse));
}
