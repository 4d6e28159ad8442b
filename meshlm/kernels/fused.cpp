// Fused elementwise ops of a decoder layer, fp32 or bf16, each replacing a chain of small ATen calls.
// At batch-1 decode every ATen call costs microseconds of dispatch for nanoseconds of work, and a layer
// made ~50 of them; these ops do the same arithmetic in one call each, rounding where the reference
// (Hugging Face transformers' op-by-op PyTorch) rounds: bf16 results are rounded after every op that
// returns a bf16 tensor there. Built with -ffp-contract=off so a * b + c is never fused into an FMA.
// The ops: RMSNorm (alone, and after the residual add), SiLU(gate) * up, RoPE, and RoPE of q and k with
// the KV-cache write of k and v; and greedy sampling's argmax over a step's logits. Each works on one
// token's row at a time, so a row's result never depends on the other rows of the batch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <tuple>

#include "fused.h"

namespace {

using namespace meshlm_fused;

template <typename T>
void rms_norm_rows(const T* x, const T* w, T* out, int64_t rows, int64_t K, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) norm_row(x + i * K, w, out + i * K, K, eps);
  });
}

// h = (x + y).to(T), out = rms_norm(h): the residual add and the next norm in one pass per row.
template <typename T>
void add_rms_norm_rows(const T* x, const T* y, const T* w, T* h, T* out, int64_t rows, int64_t K, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      T* hi = h + i * K;
      for (int64_t k = 0; k < K; ++k) hi[k] = static_cast<T>(f(x[i * K + k]) + f(y[i * K + k]));
      norm_row(hi, w, out + i * K, K, eps);
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();  // no copy when contiguous already
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and w must share a dtype");
  const int64_t K = x.size(-1);
  TORCH_CHECK(w.numel() == K, "rms_norm: w must have x's last dimension");
  at::Tensor out = at::empty_like(x);
  const int64_t rows = K ? x.numel() / K : 0;
  if (x.scalar_type() == at::kBFloat16)
    rms_norm_rows(x.data_ptr<c10::BFloat16>(), w.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(),
                  rows, K, static_cast<float>(eps));
  else if (x.scalar_type() == at::kFloat)
    rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), rows, K,
                  static_cast<float>(eps));
  else
    TORCH_CHECK(false, "rms_norm: fp32 or bf16 only");
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_, const at::Tensor& y_, const at::Tensor& w_,
                                                 double eps) {
  const at::Tensor x = x_.contiguous(), y = y_.contiguous(), w = w_.contiguous();
  TORCH_CHECK(x.sizes() == y.sizes(), "add_rms_norm: x and y must have one shape");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && x.scalar_type() == w.scalar_type(),
              "add_rms_norm: x, y and w must share a dtype");
  const int64_t K = x.size(-1);
  TORCH_CHECK(w.numel() == K, "add_rms_norm: w must have x's last dimension");
  at::Tensor h = at::empty_like(x), out = at::empty_like(x);
  const int64_t rows = K ? x.numel() / K : 0;
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == at::kBFloat16)
    add_rms_norm_rows(x.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), w.data_ptr<c10::BFloat16>(),
                      h.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, K, e);
  else if (x.scalar_type() == at::kFloat)
    add_rms_norm_rows(x.data_ptr<float>(), y.data_ptr<float>(), w.data_ptr<float>(), h.data_ptr<float>(),
                      out.data_ptr<float>(), rows, K, e);
  else
    TORCH_CHECK(false, "add_rms_norm: fp32 or bf16 only");
  return {h, out};
}

template <typename T>
void silu_mul_elems(const T* g, const T* u, T* out, int64_t n) {
  at::parallel_for(0, (n + 15) / 16, 256, [&](int64_t a, int64_t b) {
    for (int64_t blk = a; blk < b; ++blk) silu_mul_block(g, u, out, blk * 16, std::min<int64_t>(16, n - blk * 16));
  });
}

at::Tensor silu_mul(const at::Tensor& g_, const at::Tensor& u_) {
  const at::Tensor g = g_.contiguous(), u = u_.contiguous();
  TORCH_CHECK(g.sizes() == u.sizes(), "silu_mul: gate and up must have one shape");
  TORCH_CHECK(g.scalar_type() == u.scalar_type(), "silu_mul: gate and up must share a dtype");
  at::Tensor out = at::empty_like(g);
  if (g.scalar_type() == at::kBFloat16)
    silu_mul_elems(g.data_ptr<c10::BFloat16>(), u.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(),
                   g.numel());
  else if (g.scalar_type() == at::kFloat)
    silu_mul_elems(g.data_ptr<float>(), u.data_ptr<float>(), out.data_ptr<float>(), g.numel());
  else
    TORCH_CHECK(false, "silu_mul: fp32 or bf16 only");
  return out;
}

// In place, rotate-half RoPE per token t and head, cos/sin [T, D].
template <typename T>
void rope_rows(T* x, const T* cos, const T* sin, int64_t T_, int64_t H, int64_t D) {
  at::parallel_for(0, T_ * H, 64, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) rope_one(x + i * D, cos + (i / H) * D, sin + (i / H) * D, D);
  });
}

void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "rope_: x [T, H, D] contiguous");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), "rope_: cos and sin [T, D] contiguous");
  const int64_t T_ = x.size(0), H = x.size(1), D = x.size(2);
  TORCH_CHECK(D % 2 == 0 && D <= 1024, "rope_: an even head_dim of at most 1024");
  TORCH_CHECK(cos.numel() == T_ * D && sin.numel() == T_ * D, "rope_: cos and sin must be [T, D]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rope_: cos and sin must have x's dtype");
  if (x.scalar_type() == at::kBFloat16)
    rope_rows(x.data_ptr<c10::BFloat16>(), cos.data_ptr<c10::BFloat16>(), sin.data_ptr<c10::BFloat16>(), T_, H, D);
  else if (x.scalar_type() == at::kFloat)
    rope_rows(x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), T_, H, D);
  else
    TORCH_CHECK(false, "rope_: fp32 or bf16 only");
}

// q [T, Hq*D] and k [T, Hkv*D] rotated in place (rope_rows), then rows t of k and v [T, Hkv*D] copied to
// slot slots[t] of the pools [S, Hkv, D]: RoPE and the KV-cache write of one layer in one call.
template <typename T>
void rope_store_rows(T* q, T* k, const T* v, const T* cos, const T* sin, T* kp, T* vp, const int64_t* slots,
                     int64_t T_, int64_t Hq, int64_t Hkv, int64_t D) {
  rope_rows(q, cos, sin, T_, Hq, D);
  rope_rows(k, cos, sin, T_, Hkv, D);
  const int64_t row = Hkv * D;
  for (int64_t t = 0; t < T_; ++t) {
    std::memcpy(kp + slots[t] * row, k + t * row, row * sizeof(T));
    std::memcpy(vp + slots[t] * row, v + t * row, row * sizeof(T));
  }
}

void rope_store_(at::Tensor& q, at::Tensor& k, const at::Tensor& v_, const at::Tensor& cos_, const at::Tensor& sin_,
                 at::Tensor& kp, at::Tensor& vp, const at::Tensor& slots_) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && kp.is_contiguous() && vp.is_contiguous(),
              "rope_store_: q, k and the pools (written in place) must be contiguous");
  const at::Tensor v = v_.contiguous(), cos = cos_.contiguous(), sin = sin_.contiguous(), slots = slots_.contiguous();
  TORCH_CHECK(kp.dim() == 3 && kp.sizes() == vp.sizes(), "rope_store_: pools [S, Hkv, D] of one shape");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1, "rope_store_: slots [T] int64");
  const int64_t T_ = slots.numel(), S = kp.size(0), Hkv = kp.size(1), D = kp.size(2);
  TORCH_CHECK(D % 2 == 0 && D <= 1024, "rope_store_: an even head_dim of at most 1024");
  TORCH_CHECK(k.numel() == T_ * Hkv * D && v.numel() == k.numel(), "rope_store_: k and v must be [T, Hkv * D]");
  TORCH_CHECK(T_ && q.numel() % (T_ * D) == 0, "rope_store_: q must be [T, Hq * D]");
  TORCH_CHECK(cos.numel() == T_ * D && sin.numel() == T_ * D, "rope_store_: cos and sin must be [T, D]");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&k, &v, &cos, &sin, &kp, &vp})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "rope_store_: one dtype for q, k, v, cos, sin and pools");
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T_; ++t) TORCH_CHECK(s[t] >= 0 && s[t] < S, "rope_store_: slot out of the pool");
  const int64_t Hq = q.numel() / (T_ * D);
  if (q.scalar_type() == at::kBFloat16)
    rope_store_rows(q.data_ptr<c10::BFloat16>(), k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(),
                    cos.data_ptr<c10::BFloat16>(), sin.data_ptr<c10::BFloat16>(), kp.data_ptr<c10::BFloat16>(),
                    vp.data_ptr<c10::BFloat16>(), s, T_, Hq, Hkv, D);
  else if (q.scalar_type() == at::kFloat)
    rope_store_rows(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), cos.data_ptr<float>(),
                    sin.data_ptr<float>(), kp.data_ptr<float>(), vp.data_ptr<float>(), s, T_, Hq, Hkv, D);
  else
    TORCH_CHECK(false, "rope_store_: fp32 or bf16 only");
}

// The first index of the largest value of a fp32 row, as torch.argmax gives it (-inf rows included), or -1
// when the row holds a NaN (torch's rule for NaN is left to torch). 16 lanes keep each its first largest
// (a strict >), then the lanes' largest value with the smallest index wins, then the tail.
int64_t argmax_row(const float* x, int64_t V) {
  int64_t i = 0, bi = 0;
  float bv = x[0];
  bool nan = false;
  if (V >= 16) {
    __m512 best = _mm512_loadu_ps(x);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), at = idx;
    __mmask16 unord = _mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q);
    const __m512i step = _mm512_set1_epi32(16);
    for (i = 16; i + 16 <= V; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      at = _mm512_add_epi32(at, step);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
      best = _mm512_mask_blend_ps(gt, best, v);
      idx = _mm512_mask_blend_epi32(gt, idx, at);
      unord |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    nan = unord != 0;
    alignas(64) float bvs[16];
    alignas(64) int32_t bis[16];
    _mm512_store_ps(bvs, best);
    _mm512_store_si512(bis, idx);
    bv = bvs[0], bi = bis[0];
    for (int l = 1; l < 16; ++l)
      if (bvs[l] > bv || (bvs[l] == bv && bis[l] < bi)) bv = bvs[l], bi = bis[l];
  }
  for (; i < V; ++i) {
    nan |= std::isnan(x[i]);
    if (x[i] > bv) bv = x[i], bi = i;
  }
  return nan ? -1 : bi;
}

// x [K, V] fp32 -> int64 [K]: argmax_row of each row.
at::Tensor argmax_rows(const at::Tensor& x_) {
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat && x_.size(1) > 0 && x_.size(1) < (1LL << 31),
              "argmax_rows: x [K, V] fp32 with 0 < V < 2^31");
  const at::Tensor x = x_.contiguous();
  const int64_t K = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({K}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) o[k] = argmax_row(x.data_ptr<float>() + k * V, V);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshlm_kernels, m) {
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.impl("argmax_rows", c10::DispatchKey::CPU, TORCH_FN(argmax_rows));
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("add_rms_norm(Tensor x, Tensor y, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor g, Tensor u) -> Tensor");
  m.def("rope_store_(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor cos, Tensor sin, Tensor(c!) kp, Tensor(d!) vp, "
        "Tensor slots) -> ()");
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
  m.impl("add_rms_norm", c10::DispatchKey::CPU, TORCH_FN(add_rms_norm));
  m.impl("silu_mul", c10::DispatchKey::CPU, TORCH_FN(silu_mul));
  m.impl("rope_store_", c10::DispatchKey::CPU, TORCH_FN(rope_store_));
  m.impl("rope_", c10::DispatchKey::CPU, TORCH_FN(rope_));
}
