// A whole decode step of a Llama-family stage in one call: for M rows, each the next token of its own
// sequence (its own block table and position), every layer of the stage: residual add + RMSNorm, the
// q/k/v products, RoPE + KV-cache write, paged attention over the row's block table (GQA), o_proj,
// add + RMSNorm, gate/up, SiLU * up, down; then the last residual add.
//
// The arithmetic is that of the per-op path, the same functions (quant.h: products, fused.h: norm,
// SiLU, RoPE, attend.h: paged attention), rounding to the model's dtype T where that path stores a T
// tensor, so a row gets the same bits through either path (and the engine's batch invariance holds
// across a step taken here and a mixed step taken op by op).
//
// Threads: ONE OpenMP parallel region for the whole step. Inside it the products' 16-row groups are split
// across threads, attention by (row, KV head); a barrier separates dependent phases (6 per layer). The
// elementwise work between products (norms, x quantized for the next product, SiLU * up) is small: below
// kSharedRows rows each thread does it for every row into its own buffers (the residual stream too), which
// saves a barrier per phase; from kSharedRows rows on the rows are shared out, with a barrier after each
// such phase. A row's result never depends on the other rows or the thread count (attention keeps a
// sequence in one task, in the per-op kernel's order; splitting its context would change its sums).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <omp.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "attend.h"
#include "fused.h"
#include "quant.h"

namespace {

using namespace meshlm_quant;
using meshlm_fused::f;

constexpr int64_t kSharedRows = 8;  // from this many rows on, the elementwise work is shared out by rows

struct Layer {
  const void* ln1;  // input_layernorm weight [H], T
  const void* ln2;  // post_attention_layernorm weight [H], T
  Job q, k, v, o, gate, up, down;  // out pointers set per call
  void* kp;  // this layer's pools [S, Hkv, D], T
  void* vp;
};

// The residual stream and the next product's input: every thread's own (each computes every row) or one
// shared set (each computes its rows, then a barrier).
template <typename T>
struct Rows {
  std::vector<T> res, xin;  // residual stream [M, H]; the next product's input [M, K]
  QX qx[3];  // xin quantized, for K = H, Hq * D, I
  std::vector<float> xf;  // xin widened to fp32 (bf16 models with float weights)

  void reserve(const T* x, int64_t M, int64_t H, int64_t QD, int64_t I) {
    res.assign(x, x + M * H);
    xin.resize(M * std::max({H, QD, I}));
    if (std::is_same<T, c10::BFloat16>::value) xf.resize(xin.size());
    qx_reserve(qx[0], M, H);
    qx_reserve(qx[1], M, QD);
    qx_reserve(qx[2], M, I);
  }
  const float* widened() const {
    if constexpr (std::is_same<T, float>::value) return xin.data();
    else return xf.data();
  }
};

class DecodeStack : public torch::CustomClassHolder {
 public:
  // tensors: per layer ln1, ln2, then q, k, v, o, gate, up, down weights (packed), then their 7 biases
  // (an empty tensor: none); then the K and V pools [L, S, Hkv, D]. meta: L, H, I, Hq, Hkv, D, block size,
  // then per layer the 7 weights' format codes.
  DecodeStack(std::vector<at::Tensor> tensors, std::vector<int64_t> meta, double eps, double scale)
      : eps_(static_cast<float>(eps)), scale_(static_cast<float>(scale)) {
    TORCH_CHECK(meta.size() >= 7, "DecodeStack: meta too short");
    L_ = meta[0], H_ = meta[1], I_ = meta[2], Hq_ = meta[3], Hkv_ = meta[4], D_ = meta[5], bs_ = meta[6];
    TORCH_CHECK(static_cast<int64_t>(meta.size()) == 7 + 7 * L_ && static_cast<int64_t>(tensors.size()) == 16 * L_ + 2,
                "DecodeStack: 16 tensors and 7 formats per layer, then the two pools");
    TORCH_CHECK(Hkv_ > 0 && Hq_ % Hkv_ == 0 && D_ % 2 == 0 && D_ <= 1024, "DecodeStack: head counts or head_dim");
    const at::Tensor &kp = tensors[16 * L_], &vp = tensors[16 * L_ + 1];
    dtype_ = kp.scalar_type();
    TORCH_CHECK(dtype_ == at::kFloat || dtype_ == at::kBFloat16, "DecodeStack: fp32 or bf16 pools");
    TORCH_CHECK(kp.is_contiguous() && vp.is_contiguous() && kp.dim() == 4 && kp.sizes() == vp.sizes() &&
                    kp.size(0) == L_ && kp.size(2) == Hkv_ && kp.size(3) == D_ && vp.scalar_type() == dtype_,
                "DecodeStack: pools [L, S, Hkv, D] of one dtype");
    nslots_ = kp.size(1);
    const int64_t N[7] = {Hq_ * D_, Hkv_ * D_, Hkv_ * D_, H_, I_, I_, H_};
    const int64_t K[7] = {H_, H_, H_, Hq_ * D_, H_, H_, I_};
    for (int64_t l = 0; l < L_; ++l) {
      const at::Tensor* t = tensors.data() + 16 * l;
      Layer lay{};
      for (int i = 0; i < 2; ++i)
        TORCH_CHECK(t[i].scalar_type() == dtype_ && t[i].is_contiguous() && t[i].numel() == H_,
                    "DecodeStack: norm weights [H] in the pools' dtype");
      lay.ln1 = t[0].data_ptr();
      lay.ln2 = t[1].data_ptr();
      Job* jobs[7] = {&lay.q, &lay.k, &lay.v, &lay.o, &lay.gate, &lay.up, &lay.down};
      for (int i = 0; i < 7; ++i) {
        const int fmt = static_cast<int>(meta[7 + 7 * l + i]);
        const at::Tensor& w = t[2 + i];
        TORCH_CHECK(fmt >= kQ4_0 && fmt <= kBF16, "DecodeStack: unknown format ", fmt);
        TORCH_CHECK(fmt == kF32 || K[i] % (fmt == kBF16 ? 2 : kBlock) == 0, "DecodeStack: K does not fit format");
        TORCH_CHECK(w.is_contiguous() && w.sizes() == at::IntArrayRef(packed_shape(fmt, N[i], K[i])),
                    "DecodeStack: layer ", l, " weight ", i, " is not packed for its shape");
        at::Tensor b = t[9 + i];
        const float* bias = nullptr;
        if (b.numel()) {
          TORCH_CHECK(b.numel() == N[i], "DecodeStack: a bias of the wrong length");
          b = b.to(at::kFloat).contiguous();
          keep_.push_back(b);
          bias = b.data_ptr<float>();
        }
        *jobs[i] = Job{w.data_ptr(), fmt, N[i], bias, nullptr};
      }
      lay.kp = static_cast<char*>(kp.data_ptr()) + l * kp.stride(0) * kp.element_size();
      lay.vp = static_cast<char*>(vp.data_ptr()) + l * vp.stride(0) * vp.element_size();
      layers_.push_back(lay);
    }
    keep_.insert(keep_.end(), tensors.begin(), tensors.end());
  }

  // x [M, H]; cos, sin [M, D] (x's dtype); slots [M] (each row's KV write); tables [M, W]; starts, lens [M]
  // (row m attends to its tokens [starts[m], lens[m])) -> the stage's output [M, H] (residual added).
  at::Tensor run(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_, const at::Tensor& slots_,
                 const at::Tensor& tables_, const at::Tensor& starts_, const at::Tensor& lens_) {
    const at::Tensor x = x_.contiguous(), cos = cos_.contiguous(), sin = sin_.contiguous();
    const at::Tensor slots = slots_.contiguous(), tables = tables_.contiguous();
    const at::Tensor starts = starts_.contiguous(), lens = lens_.contiguous();
    TORCH_CHECK(x.dim() == 2 && x.size(1) == H_ && x.scalar_type() == dtype_, "DecodeStack.run: x [M, H] of the pools' dtype");
    const int64_t M = x.size(0);
    TORCH_CHECK(cos.numel() == M * D_ && sin.numel() == M * D_ && cos.scalar_type() == dtype_ &&
                    sin.scalar_type() == dtype_, "DecodeStack.run: cos and sin [M, D] in x's dtype");
    for (const at::Tensor* t : {&slots, &tables, &starts, &lens})
      TORCH_CHECK(t->scalar_type() == at::kLong && t->size(0) == M, "DecodeStack.run: int64 slots, tables, starts, lens of M rows");
    TORCH_CHECK(tables.dim() == 2, "DecodeStack.run: tables [M, W]");
    const int64_t W = tables.size(1);
    const int64_t *sl = slots.data_ptr<int64_t>(), *tb = tables.data_ptr<int64_t>();
    const int64_t *st = starts.data_ptr<int64_t>(), *ln = lens.data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m) {
      TORCH_CHECK(sl[m] >= 0 && sl[m] < nslots_, "DecodeStack.run: a write slot outside the pool");
      TORCH_CHECK(0 <= st[m] && st[m] < ln[m] && ln[m] <= W * bs_, "DecodeStack.run: a row's token range");
      for (int64_t i = st[m] / bs_; i < (ln[m] + bs_ - 1) / bs_; ++i)
        TORCH_CHECK(tb[m * W + i] >= 0 && (tb[m * W + i] + 1) * bs_ <= nslots_, "DecodeStack.run: a block outside the pool");
    }
    at::Tensor out = at::empty({M, H_}, x.options());
    if (M == 0) return out;
    if (dtype_ == at::kFloat)
      step<float>(x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), sl, tb, W, st, ln, M,
                  out.data_ptr<float>());
    else
      step<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), cos.data_ptr<c10::BFloat16>(), sin.data_ptr<c10::BFloat16>(),
                          sl, tb, W, st, ln, M, out.data_ptr<c10::BFloat16>());
    return out;
  }

 private:
  // Rows [r0, r1) of xin [M, K] made ready for the jobs: quantized into qx and/or widened, as their
  // formats need; then, with shared rows, a barrier.
  template <typename T>
  static void prepare(Rows<T>& p, QX& qx, int64_t K, int64_t r0, int64_t r1, std::initializer_list<Job> jobs,
                      bool shared) {
    bool quantized = false, floats = false;
    for (const Job& j : jobs) (j.fmt >= kF32 ? floats : quantized) = true;
    if (quantized)
      for (int64_t m = r0; m < r1; ++m)
        for (int64_t b = 0; b < qx.nb; ++b) quantize_block(p.xin.data(), m, b, qx);
    if constexpr (std::is_same<T, c10::BFloat16>::value)
      if (floats)
        for (int64_t i = r0 * K; i < r1 * K; ++i) p.xf[i] = static_cast<float>(p.xin[i]);
    if (shared) {
#pragma omp barrier
    }
  }

  // This thread's share of the jobs' 16-row groups (one run over all of them, split evenly).
  template <typename T>
  static void products(const Rows<T>& p, const QX& qx, int64_t M, std::initializer_list<Job> jobs, int tid, int nt) {
    int64_t total = 0;
    for (const Job& j : jobs) total += (j.N + kGroup - 1) / kGroup;
    const int64_t g0 = total * tid / nt, g1 = total * (tid + 1) / nt;
    int64_t base = 0;
    for (const Job& j : jobs) {
      const int64_t G = (j.N + kGroup - 1) / kGroup;
      for (int64_t g = std::max(g0, base); g < std::min(g1, base + G); ++g)
        run_group_any(j, g - base, qx, p.widened(), M, std::is_same<T, c10::BFloat16>::value);
      base += G;
    }
  }

  template <typename T>
  void step(const T* x, const T* cos, const T* sin, const int64_t* sl, const int64_t* tb, int64_t W,
            const int64_t* st, const int64_t* ln, int64_t M, T* out) {
    const int64_t H = H_, I = I_, D = D_, Hq = Hq_, Hkv = Hkv_, G = Hq / Hkv, QD = Hq * D, KD = Hkv * D;
    // shared: the products' outputs (each written by the groups' owners, read by all after a barrier)
    std::vector<T> q(M * QD), k(M * KD), v(M * KD), att(M * QD), o(M * H), gate(M * I), up(M * I), down(M * H);
    const int nt = std::max(1, at::get_num_threads());
    // A few rows: every thread does the elementwise work of every row (no barrier); many: each its rows.
    const bool shared = nt > 1 && M >= kSharedRows;
    // Attention tasks: a row's KV heads in as few ranges as keep every thread busy (a range reads each
    // position's rows of all its heads together, contiguous in the pool; a head's sums do not depend on it).
    const int64_t want = std::min(Hkv, (nt + M - 1) / M);  // ranges per row
    const int64_t hper = (Hkv + want - 1) / want, hchunks = (Hkv + hper - 1) / hper;  // the last may be shorter
    Rows<T> common;
    if (shared) common.reserve(x, M, H, QD, I);
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), n = omp_get_num_threads();
      Rows<T> own;
      if (!shared) own.reserve(x, M, H, QD, I);
      Rows<T>& p = shared ? common : own;
      const int64_t r0 = shared ? M * tid / n : 0, r1 = shared ? M * (tid + 1) / n : M;
      std::vector<float> qf(QD), of(QD);  // one row's q and attention output [Hq, D] in fp32
      for (int64_t l = 0; l < L_; ++l) {
        Layer lay = layers_[l];
        const T* ln1 = static_cast<const T*>(lay.ln1);
        // residual (+ the last layer's down), then input_layernorm, into xin
        for (int64_t m = r0; m < r1; ++m) {
          T* r = p.res.data() + m * H;
          if (l)
            for (int64_t c = 0; c < H; ++c) r[c] = static_cast<T>(f(down[m * H + c]) + f(r[c]));
          meshlm_fused::norm_row(r, ln1, p.xin.data() + m * H, H, eps_);
        }
        lay.q.out = q.data(), lay.k.out = k.data(), lay.v.out = v.data();
        prepare(p, p.qx[0], H, r0, r1, {lay.q, lay.k, lay.v}, shared);
        products(p, p.qx[0], M, {lay.q, lay.k, lay.v}, tid, n);
#pragma omp barrier
        // (row, KV head) tasks: RoPE of k and the group's q heads and the K/V write; a barrier; then attention
        // by (row, range of KV heads).
        // Two passes: rows of one sequence (a speculative verification step) attend to each other's new K/V.
        for (int64_t task = tid; task < M * Hkv; task += n) {
          const int64_t m = task / Hkv, h = task % Hkv;
          const T *c = cos + m * D, *s = sin + m * D;
          T* kh = k.data() + m * KD + h * D;
          meshlm_fused::rope_one(kh, c, s, D);
          T* kp = static_cast<T*>(lay.kp) + (sl[m] * Hkv + h) * D;
          T* vp = static_cast<T*>(lay.vp) + (sl[m] * Hkv + h) * D;
          std::memcpy(kp, kh, D * sizeof(T));
          std::memcpy(vp, v.data() + m * KD + h * D, D * sizeof(T));
          for (int64_t g = h * G; g < (h + 1) * G; ++g) meshlm_fused::rope_one(q.data() + m * QD + g * D, c, s, D);
        }
#pragma omp barrier
        for (int64_t task = tid; task < M * hchunks; task += n) {
          const int64_t m = task / hchunks, h0 = task % hchunks * hper, h1 = std::min(Hkv, h0 + hper);
          for (int64_t g = h0 * G; g < h1 * G; ++g) {
            const T* qh = q.data() + m * QD + g * D;
            for (int64_t d = 0; d < D; ++d) qf[g * D + d] = f(qh[d]);
          }
          meshlm_attend::attend_any(qf.data(), static_cast<const T*>(lay.kp), static_cast<const T*>(lay.vp),
                                    tb + m * W, st[m], ln[m], bs_, Hkv, h0, h1, G, D, scale_, of.data());
          for (int64_t i = h0 * G * D; i < h1 * G * D; ++i) att[m * QD + i] = static_cast<T>(of[i]);
        }
#pragma omp barrier
        std::copy(att.begin() + r0 * QD, att.begin() + r1 * QD, p.xin.begin() + r0 * QD);
        lay.o.out = o.data();
        prepare(p, p.qx[1], QD, r0, r1, {lay.o}, shared);
        products(p, p.qx[1], M, {lay.o}, tid, n);
#pragma omp barrier
        const T* ln2 = static_cast<const T*>(lay.ln2);
        for (int64_t m = r0; m < r1; ++m) {
          T* r = p.res.data() + m * H;
          for (int64_t c = 0; c < H; ++c) r[c] = static_cast<T>(f(o[m * H + c]) + f(r[c]));
          meshlm_fused::norm_row(r, ln2, p.xin.data() + m * H, H, eps_);
        }
        lay.gate.out = gate.data(), lay.up.out = up.data();
        prepare(p, p.qx[0], H, r0, r1, {lay.gate, lay.up}, shared);
        products(p, p.qx[0], M, {lay.gate, lay.up}, tid, n);
#pragma omp barrier
        for (int64_t m = r0; m < r1; ++m)
          for (int64_t i0 = 0; i0 < I; i0 += 16)
            meshlm_fused::silu_mul_block(gate.data() + m * I, up.data() + m * I, p.xin.data() + m * I, i0,
                                         std::min<int64_t>(16, I - i0));
        lay.down.out = down.data();
        prepare(p, p.qx[2], I, r0, r1, {lay.down}, shared);
        products(p, p.qx[2], M, {lay.down}, tid, n);
#pragma omp barrier
      }
      for (int64_t i = r0 * H; i < r1 * H; ++i)
        if (shared || tid == 0) out[i] = static_cast<T>(f(p.res[i]) + f(down[i]));
    }
  }

  std::vector<at::Tensor> keep_;  // the weights, biases (fp32) and pools the pointers point into
  std::vector<Layer> layers_;
  int64_t L_, H_, I_, Hq_, Hkv_, D_, bs_, nslots_;
  float eps_, scale_;
  at::ScalarType dtype_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshlm_kernels, m) {
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, double, double>())
      .def("run", &DecodeStack::run);
}
