// Paged decode attention on the CPU: each sequence's one new query token attends over its cached keys and
// values where they lie in the block pool, so nothing is gathered or copied. One task per (sequence, KV
// head): the G query heads of the group read each key and value row once (grouped-query attention with no
// repeat), scores are taken a block at a time and folded into an online softmax in fp32. A sequence's
// result depends only on its own data, in a fixed order, so it is the same alone and inside any batch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <cstdint>
#include <limits>
#include <vector>

namespace {

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

inline void prefetch_rows(const void* p, int64_t rows, int64_t stride_bytes, int64_t row_bytes) {
#ifdef __AVX512F__
  const char* c = static_cast<const char*>(p);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch(c + r * stride_bytes + o, _MM_HINT_T0);
#endif
}

// One sequence, KV heads [h0, h1): q [Hq, D] fp32 -> out [Hq, D] fp32 over tokens [first, ctx). Block by
// block, every head of the range reads the block's rows (contiguous in the pool) while they sit in L1;
// the next block's rows are prefetched first. Each head's arithmetic is the same whatever h0 and h1 are.
template <typename T>
void attend(const float* q, const T* kp, const T* vp, const int64_t* table, int64_t first, int64_t ctx,
            int64_t bs, int64_t Hkv, int64_t h0, int64_t h1, int64_t G, int64_t D, float scale, float* out) {
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
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t j = 0; j < D; ++j) out[(q0 + i) * D + j] /= l[i];
}

// q [B, Hq, D]; k_pool, v_pool [slots, Hkv, D] (contiguous); tables [B, max_blocks] int64;
// starts, lens [B] int64 (attend to tokens [starts[b], lens[b])) -> [B, Hq, D] in q's dtype.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& tables, const at::Tensor& starts, const at::Tensor& lens,
                        int64_t block_size, double scale) {
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
        attend(qp + b * Hq * D, kbase, vbase, tp + b * max_blocks, sp[b], lp[b], block_size, Hkv, h0, h1, G,
               D, static_cast<float>(scale), op + b * Hq * D);
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
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY(meshlm_paged, m) {
  m.def("paged_decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor tables, Tensor starts, Tensor lens, "
        "int block_size, float scale) -> Tensor");
  m.impl("paged_decode", c10::DispatchKey::CPU, TORCH_FN(paged_decode));
}
