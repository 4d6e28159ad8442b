// Fused elementwise ops of a decoder layer, fp32 or bf16, each replacing a chain of small ATen calls.
// At batch-1 decode every ATen call costs microseconds of dispatch for nanoseconds of work, and a layer
// made ~50 of them; these ops do the same arithmetic in one call each, rounding where the reference
// (Hugging Face transformers' op-by-op PyTorch) rounds: bf16 results are rounded after every op that
// returns a bf16 tensor there. Built with -ffp-contract=off so a * b + c is never fused into an FMA.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

template <typename T>
inline float f(T v) { return static_cast<float>(v); }

// Rounds to T (identity for float): what storing an fp32 result into a T tensor does.
template <typename T>
inline float r(float v) { return static_cast<float>(static_cast<T>(v)); }

// out = w * (x * rsqrt(mean(x^2) + eps)).to(T), the normalization in fp32, per row of K.
template <typename T>
void rms_norm_rows(const T* x, const T* w, T* out, int64_t rows, int64_t K, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const T* xi = x + i * K;
      float acc[16] = {0.f};
      for (int64_t k = 0; k < K; ++k) acc[k & 15] += f(xi[k]) * f(xi[k]);
      float ss = 0.f;
      for (float a : acc) ss += a;
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(K) + eps);
      T* oi = out + i * K;
      for (int64_t k = 0; k < K; ++k) oi[k] = static_cast<T>(f(w[k]) * r<T>(f(xi[k]) * inv));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "rms_norm: x and w must be contiguous");
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

// In place, rotate-half RoPE: x = x * cos + cat(-x2, x1) * sin, per token t and head, cos/sin [T, D].
template <typename T>
void rope_rows(T* x, const T* cos, const T* sin, int64_t T_, int64_t H, int64_t D) {
  const int64_t half = D / 2;
  at::parallel_for(0, T_ * H, 64, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      T* xi = x + i * D;
      const T* c = cos + (i / H) * D;
      const T* s = sin + (i / H) * D;
      float lo[512], hi[512];  // D <= 1024, checked by the caller
      for (int64_t d = 0; d < half; ++d) {
        lo[d] = f(xi[d]);
        hi[d] = f(xi[d + half]);
      }
      for (int64_t d = 0; d < half; ++d) {
        // first half: x1 * cos - x2 * sin; second: x2 * cos + x1 * sin (-x2 is exact in any dtype)
        xi[d] = static_cast<T>(r<T>(lo[d] * f(c[d])) + r<T>(-hi[d] * f(s[d])));
        xi[d + half] = static_cast<T>(r<T>(hi[d] * f(c[d + half])) + r<T>(lo[d] * f(s[d + half])));
      }
    }
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshlm_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
  m.impl("rope_", c10::DispatchKey::CPU, TORCH_FN(rope_));
}
