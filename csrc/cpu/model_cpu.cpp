// The DynaLay model's inference loop in one call (dynalay_C::run_model), and the agent's
// decision kernel (dynalay_C::agent_decide) that the Python loop's inference shares.
//
// run_model mirrors DynaLay.run (dynalay/models/dynalay.py) for the greedy policy and for a
// forced action table (static, truncation, early exit), with compaction, no hard budget and no
// gradient.  The batch is cut into chunks (chunk_rows: sizes only, never the thread count);
// each chunk runs on one thread through the encoder and every step:
//   - the LayerNorm and the head (plus the agent's projection): per row on AVX2, the LayerNorm
//     folded into the head's weights once per call (head_rows, fold_head);
//   - the agent's decision (decide_rows);
//   - compaction of the rows that stop (in place in the chunk's own state buffer);
//   - one dynamic_step for the rows that go on (one block per group);
//   - the history update.
// At the end come the FLOPs per row.  This replaced ~40 Python-level ATen calls per step
// (~1.4 ms per batch of 256 on the 2-core CI machine).  The Python loop takes the same actions
// and spends the same iterations; its logits agree to rounding (tests/test_model_fused.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "solver_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>
#ifdef DYNALAY_X86
#include <immintrin.h>
#endif

namespace dynalay {
namespace {

using Tensor = at::Tensor;

// The first argmax of one row of logits l[0..C) (NaN wins), and the maximum, in double.
template <typename S>
inline double row_max(const S* l, int64_t C, int64_t& pred) {
  pred = 0;
  double mx = static_cast<double>(l[0]);
  for (int64_t j = 1; j < C; ++j) {
    const double v = static_cast<double>(l[j]);
    if (v > mx || (std::isnan(v) && !std::isnan(mx))) { mx = v; pred = j; }
  }
  return mx;
}

// Softmax statistics of one row of logits l[0..C): pred = the first argmax, s = the sum of
// exp(l - max) (so the max probability is 1 / s) and ez = the sum of exp(l - max) (l - max)
// (for the entropy); exp in the input precision, sums in double.
template <typename S>
inline void softmax_stats(const S* l, int64_t C, int64_t& pred, double& s, double& ez) {
  const double mx = row_max(l, C, pred);
  s = 0.0;
  ez = 0.0;
  for (int64_t j = 0; j < C; ++j) {
    const double z = static_cast<double>(l[j]) - mx;
    const double e = static_cast<double>(std::exp(static_cast<S>(z)));
    s += e;
    ez += e * z;
  }
}

// y[m] = b[m] + sum_i x[i] w[i * M + m] for m in [m0, M) in blocks of KB outputs held in registers,
// in double and in a fixed order: the even terms onto b, the odd terms apart, then their sum
// (two chains: the sums are short, so their latency, not the FMAs, sets the pace); returns
// where the blocks stopped.
template <int KB>
__attribute__((always_inline)) inline int64_t affine_blocks(const double* x, int64_t N, const double* w,
                                                            const double* b, int64_t M, int64_t m0, double* y) {
  for (; m0 + KB <= M; m0 += KB) {
    double e[KB], o[KB];
    for (int q = 0; q < KB; ++q) {
      e[q] = b[m0 + q];
      o[q] = 0.0;
    }
    int64_t i = 0;
    for (; i + 2 <= N; i += 2) {
      const double x0 = x[i], x1 = x[i + 1];
      const double* w0 = w + i * M + m0;
      const double* w1 = w0 + M;
      for (int q = 0; q < KB; ++q) {
        e[q] += w0[q] * x0;
        o[q] += w1[q] * x1;
      }
    }
    if (i < N)
      for (int q = 0; q < KB; ++q) e[q] += w[i * M + m0 + q] * x[i];
    for (int q = 0; q < KB; ++q) y[m0 + q] = e[q] + o[q];
  }
  return m0;
}

#ifdef DYNALAY_X86
// affine_blocks<4 * V> in AVX2 lanes (the same sums in the same order, one FMA per term).
template <int V>
__attribute__((target("avx2,fma"))) int64_t affine_blocks_avx2(const double* x, int64_t N, const double* w,
                                                               const double* b, int64_t M, int64_t m0, double* y) {
  for (; m0 + 4 * V <= M; m0 += 4 * V) {
    __m256d e[V], o[V];
    for (int v = 0; v < V; ++v) {
      e[v] = _mm256_loadu_pd(b + m0 + 4 * v);
      o[v] = _mm256_setzero_pd();
    }
    int64_t i = 0;
    for (; i + 2 <= N; i += 2) {
      const __m256d x0 = _mm256_set1_pd(x[i]), x1 = _mm256_set1_pd(x[i + 1]);
      const double* w0 = w + i * M + m0;
      const double* w1 = w0 + M;
      for (int v = 0; v < V; ++v) {
        e[v] = _mm256_fmadd_pd(_mm256_loadu_pd(w0 + 4 * v), x0, e[v]);
        o[v] = _mm256_fmadd_pd(_mm256_loadu_pd(w1 + 4 * v), x1, o[v]);
      }
    }
    if (i < N) {
      const __m256d xi = _mm256_set1_pd(x[i]);
      for (int v = 0; v < V; ++v) e[v] = _mm256_fmadd_pd(_mm256_loadu_pd(w + i * M + m0 + 4 * v), xi, e[v]);
    }
    for (int v = 0; v < V; ++v) _mm256_storeu_pd(y + m0 + 4 * v, _mm256_add_pd(e[v], o[v]));
  }
  return m0;
}
#endif

// y (M) = b + x (N) w (N, M), double: 16, then 4, then 1 output at a time (kAvx2: AVX2 lanes).
template <bool kAvx2>
__attribute__((always_inline)) inline void affine(const double* x, int64_t N, const double* w, const double* b,
                                                  int64_t M, double* y) {
  int64_t m = 0;
#ifdef DYNALAY_X86
  if constexpr (kAvx2) {
    m = affine_blocks_avx2<4>(x, N, w, b, M, m, y);
    m = affine_blocks_avx2<1>(x, N, w, b, M, m, y);
  }
#endif
  m = affine_blocks<16>(x, N, w, b, M, m, y);
  m = affine_blocks<4>(x, N, w, b, M, m, y);
  affine_blocks<1>(x, N, w, b, M, m, y);
}

// The confidence feature in log-odds (conf_mode 1, head_stats(..., "logodds")): log(p / (1 - p)) of
// the max probability p = 1 / sum_j e_j (e_j = exp(l_j - max)) is -log(sum_{j != pred} e_j),
// summed without the argmax's term (no cancellation in 1 - p), clipped to [-6, 6] and divided by 3
// so that it spreads the confident range (p = 0.8 .. 0.998) the stopping decisions turn on.
template <typename S>
inline double conf_logodds(const S* e, int64_t C, int64_t pred) {
  double so = 0.0;
  for (int64_t j = 0; j < C; ++j)
    if (j != pred) so += static_cast<double>(e[j]);
  const double v = -std::log(so);
  return std::isnan(v) ? v : std::min(6.0, std::max(-6.0, v)) / 3.0;  // NaN stays NaN, as in torch.clamp
}

// The agent's weights for step t in the layout decide_rows reads: the input layer transposed to
// double (wt: F x A), the output layer (wo: A x NA), and the bias terms folded (b_in = inp_b +
// step_emb[t], b_out = out_b + step_bias[t]).  Built once per call and step, not per chunk.
struct DecideWeights {
  int64_t F = 0, A = 0, NA = 0;
  std::vector<double> wt, b_in, wo, b_out;
};

template <typename S>
DecideWeights prepare_decide(const S* inp_w, const S* inp_b, const S* emb, int64_t F, int64_t A, const S* out_w,
                             const S* out_b, const S* bias, int64_t NA) {
  DecideWeights d;
  d.F = F;
  d.A = A;
  d.NA = NA;
  d.wt.resize(F * A);
  d.b_in.resize(A);
  d.wo.resize(A * NA);
  d.b_out.resize(NA);
  for (int64_t k = 0; k < A; ++k) {
    for (int64_t i = 0; i < F; ++i) d.wt[i * A + k] = static_cast<double>(inp_w[k * F + i]);
    d.b_in[k] = static_cast<double>(inp_b[k]) + static_cast<double>(emb[k]);
  }
  for (int64_t m = 0; m < NA; ++m) {
    for (int64_t k = 0; k < A; ++k) d.wo[k * NA + m] = static_cast<double>(out_w[m * A + k]);
    d.b_out[m] = static_cast<double>(out_b[m]) + static_cast<double>(bias[m]);
  }
  return d;
}

// A thread's working buffers for decide_rows (kept across its calls: no allocation per step).
template <typename S>
struct DecideScratch {
  std::vector<S> e, u;
  std::vector<double> mxs, f, acc, g, ud;
};

// The agent's decision for rows [r0, r1): from the head's logits (n, C), the state projection
// (n, P) or none, the history (n, HD) and the previous prediction, the introspection features
//   f = [proj, confidence (max probability, or conf_logodds with conf_mode 1), normalised entropy,
//        prediction changed, history]
// then g = out_w tanh(inp_w f + inp_b + step_emb[t]) + out_b + step_bias[t] (+ nop_bias on
// NOP) and the action argmax g (first maximum).  Policy.forward's arithmetic: sums in double
// in a fixed order (the softmax statistics as softmax_stats), exp and tanh in the input
// precision, each over all the rows in one vectorised call; the weights come prepared
// (prepare_decide).  Rows do not interact: the Python loop in inference (the agent_decide op)
// and run_model's chunks compute the same decisions.
template <typename S, bool kAvx2>
__attribute__((always_inline)) inline void decide_rows_body(int64_t r0, int64_t r1, const S* logits, int64_t ls,
                                                            int64_t C, const S* proj, int64_t ps, int64_t P,
                                                            const S* hist, int64_t HD, const int64_t* prev_pred,
                                                            const DecideWeights& w, DecideScratch<S>& sc,
                                                            double nop_bias, int64_t conf_mode, int64_t* act,
                                                            S* conf_out, int64_t* pred_out) {
  const int64_t F = P + 3 + HD, n = r1 - r0, A = w.A, NA = w.NA;
  if (n <= 0) return;
  TORCH_CHECK(w.F == F, "dynalay: internal error: agent weights prepared for ", w.F, " features, not ", F);
  const double inv_log_c = 1.0 / std::log(static_cast<double>(C));
  sc.f.resize(F);
  sc.acc.resize(A);
  sc.ud.resize(A);
  sc.g.resize(NA);
  sc.e.resize(n * C);
  sc.u.resize(n * A);
  sc.mxs.resize(n);
  double *f = sc.f.data(), *acc = sc.acc.data(), *ud = sc.ud.data(), *g = sc.g.data();
  // the softmax of every row: shifted logits l - max, then one vectorised exp over the rows
  for (int64_t r = r0; r < r1; ++r) {
    const S* l = logits + r * ls;
    int64_t pred;
    const double mx = row_max(l, C, pred);
    S* er = sc.e.data() + (r - r0) * C;
    for (int64_t j = 0; j < C; ++j) er[j] = static_cast<S>(static_cast<double>(l[j]) - mx);
    pred_out[r] = pred;
    sc.mxs[r - r0] = mx;
  }
  exp_inplace(n * C, sc.e.data());
  for (int64_t r = r0; r < r1; ++r) {
    const S* l = logits + r * ls;
    const S* er = sc.e.data() + (r - r0) * C;
    const double mx = sc.mxs[r - r0];
    double s = 0.0, ez = 0.0;  // sum of exp(l - max) and of exp(l - max) (l - max), as softmax_stats
    for (int64_t j = 0; j < C; ++j) {
      const double ej = static_cast<double>(er[j]);
      s += ej;
      ez += ej * (static_cast<double>(l[j]) - mx);
    }
    const double pmax = 1.0 / s;
    const double conf = conf_mode == 1 ? conf_logodds(er, C, pred_out[r]) : pmax;
    for (int64_t p = 0; p < P; ++p) f[p] = static_cast<double>(proj[r * ps + p]);
    f[P] = conf;
    f[P + 1] = (std::log(s) - ez * pmax) * inv_log_c;
    f[P + 2] = pred_out[r] != prev_pred[r] ? 1.0 : 0.0;
    for (int64_t k = 0; k < HD; ++k) f[P + 3 + k] = static_cast<double>(hist[r * HD + k]);
    affine<kAvx2>(f, F, w.wt.data(), w.b_in.data(), A, acc);
    S* ur = sc.u.data() + (r - r0) * A;
    for (int64_t k = 0; k < A; ++k) ur[k] = static_cast<S>(acc[k]);
    conf_out[r] = static_cast<S>(conf);
  }
  tanh_inplace(n * A, sc.u.data());
  for (int64_t r = r0; r < r1; ++r) {
    const S* ur = sc.u.data() + (r - r0) * A;
    for (int64_t k = 0; k < A; ++k) ud[k] = static_cast<double>(ur[k]);
    affine<kAvx2>(ud, A, w.wo.data(), w.b_out.data(), NA, g);
    g[NA - 1] += nop_bias;
    int64_t best = 0;
    for (int64_t m = 1; m < NA; ++m)
      if (g[m] > g[best]) best = m;
    act[r] = best;
  }
}

#define DYNALAY_DECIDE_ARGS                                                                                    \
  int64_t r0, int64_t r1, const S *logits, int64_t ls, int64_t C, const S *proj, int64_t ps, int64_t P,          \
      const S *hist, int64_t HD, const int64_t *prev_pred, const DecideWeights &w, DecideScratch<S> &sc,         \
      double nop_bias, int64_t conf_mode, int64_t *act, S *conf_out, int64_t *pred_out
#define DYNALAY_DECIDE_PASS \
  r0, r1, logits, ls, C, proj, ps, P, hist, HD, prev_pred, w, sc, nop_bias, conf_mode, act, conf_out, pred_out

#ifdef DYNALAY_X86
// The same code compiled for AVX2/FMA, chosen at run time (the extension targets baseline x86-64):
// the hidden units' sums run four doubles wide.  Results differ from the baseline build by FMA
// rounding only; every caller on a machine takes the same build, so they agree.
template <typename S>
__attribute__((target("avx2,fma"))) void decide_rows_avx2(DYNALAY_DECIDE_ARGS) {
  decide_rows_body<S, true>(DYNALAY_DECIDE_PASS);
}
const bool kDecideAVX2 = cpu_has_avx2_fma();  // and head_rows
const bool kHasAVX512F = kDecideAVX2 && __builtin_cpu_supports("avx512f");
#endif

template <typename S>
void decide_rows(DYNALAY_DECIDE_ARGS) {
#ifdef DYNALAY_X86
  if (kDecideAVX2) return decide_rows_avx2<S>(DYNALAY_DECIDE_PASS);
#endif
  decide_rows_body<S, false>(DYNALAY_DECIDE_PASS);
}

// The agent_decide op: (actions, conf, pred) for every row of `logits` (see decide_rows).
std::tuple<Tensor, Tensor, Tensor> agent_decide_cpu(const Tensor& logits, const c10::optional<Tensor>& proj,
                                                    const Tensor& hist, const Tensor& prev_pred, at::TensorList agent,
                                                    int64_t t, double nop_bias, int64_t conf_mode) {
  TORCH_CHECK(conf_mode == 0 || conf_mode == 1,
              "dynalay: conf_mode must be 0 (max probability) or 1 (log-odds), got ", conf_mode);
  TORCH_CHECK(logits.dim() == 2 && hist.dim() == 2 && hist.size(0) == logits.size(0),
              "dynalay: agent_decide needs logits (n, C) and hist (n, HD)");
  TORCH_CHECK(prev_pred.dim() == 1 && prev_pred.size(0) == logits.size(0) && prev_pred.scalar_type() == at::kLong,
              "dynalay: prev_pred must be (n,) int64");
  TORCH_CHECK(agent.size() == 6, "dynalay: agent weights are [inp_w, inp_b, step_emb, out_w, out_b, step_bias]");
  const int64_t n = logits.size(0), C = logits.size(1), HD = hist.size(1);
  const bool has_proj = proj.has_value() && proj->defined();
  const int64_t P = has_proj ? proj->size(1) : 0;
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "dynalay: agent_decide runs float32 or float64");
  const int64_t A = agent[0].size(0), NA = agent[3].size(0), T = agent[2].size(0);
  TORCH_CHECK(agent[0].dim() == 2 && agent[0].size(1) == P + 3 + HD, "dynalay: inp_w must be (A, P + 3 + HD)");
  TORCH_CHECK(agent[3].dim() == 2 && agent[3].size(1) == A && agent[5].size(0) == T && agent[5].size(1) == NA,
              "dynalay: out_w must be (L + 1, A), step_bias (T, L + 1)");
  TORCH_CHECK(t >= 0 && t < T, "dynalay: step ", t, " out of range [0, ", T, ")");
  for (const Tensor& w : agent) TORCH_CHECK(w.scalar_type() == dt, "dynalay: agent weights must have the logits' dtype");
  TORCH_CHECK(!has_proj || (proj->scalar_type() == dt && proj->size(0) == n), "dynalay: proj must be (n, P)");
  TORCH_CHECK(hist.scalar_type() == dt, "dynalay: hist must have the logits' dtype");
  Tensor act = at::empty({n}, logits.options().dtype(at::kLong));
  Tensor conf = at::empty({n}, logits.options());
  Tensor pred = at::empty({n}, logits.options().dtype(at::kLong));
  const Tensor lg = logits.stride(1) == 1 ? logits : logits.contiguous();
  const Tensor pj = has_proj ? (proj->stride(1) == 1 ? *proj : proj->contiguous()) : Tensor();
  const Tensor hc = hist.contiguous(), pp = prev_pred.contiguous();
  std::vector<Tensor> w;
  for (const Tensor& x : agent) w.push_back(x.contiguous());
  AT_DISPATCH_FLOATING_TYPES(dt, "dynalay_agent_decide", [&] {
    using S = scalar_t;
    const DecideWeights dw = prepare_decide<S>(w[0].data_ptr<S>(), w[1].data_ptr<S>(), w[2].data_ptr<S>() + t * A,
                                               P + 3 + HD, A, w[3].data_ptr<S>(), w[4].data_ptr<S>(),
                                               w[5].data_ptr<S>() + t * NA, NA);
    at::parallel_for(0, n, 128, [&](int64_t r0, int64_t r1) {
      DecideScratch<S> sc;
      decide_rows<S>(r0, r1, lg.data_ptr<S>(), lg.stride(0), C, has_proj ? pj.data_ptr<S>() : nullptr,
                     has_proj ? pj.stride(0) : 0, P, hc.data_ptr<S>(), HD, pp.data_ptr<int64_t>(), dw, sc, nop_bias,
                     conf_mode, act.data_ptr<int64_t>(), conf.data_ptr<S>(), pred.data_ptr<int64_t>());
    });
  });
  return {act, conf, pred};
}

// Everything a chunk of rows needs (read-only) and the outputs it writes (its rows only).
struct RunArgs {
  Tensor enc_w, enc_b, U, W, b, ln_w, ln_b, w_head, b_head, forced, ones;  // ones: unfolded head only
  std::vector<Tensor> agent;  // contiguous
  std::vector<DecideWeights> decide;  // the agent's weights per step (prepare_decide)
  double tol, damping, anderson_lam, eps, ln_eps, nop_bias, lam_feature;
  int64_t max_iter, anderson_m, T, L, H, C, P, HD, D, conf_mode;
  c10::string_view solver;
  c10::optional<double> exit_threshold;
  bool use_agent;
  Tensor fin;  // (B, C) outputs, written at the chunk's rows only
  int64_t *layers, *iters, *actions;
  int32_t* step_iters;
  // the LayerNorm folded into the head's rows (fold_head; float on AVX2 only): wg (K, H), sg, cb (K)
  std::vector<float> wg;
  std::vector<double> sg, cb;
  bool w_finite = true;  // W holds no NaN/Inf: the solves from 0 may skip their first GEMM
  bool head_avx512 = false;  // ln_proj_rows2_avx512 (the CPU has AVX-512F, DYNALAY_CPU_NO_AVX512 unset)
};

#ifdef DYNALAY_X86
// The head's rows k0 .. k0 + 3 for the kernels below, which compute four outputs per pass (a
// block past K repeats its last row); returns how many are real.
inline int64_t head_block(const float* W, int64_t H, int64_t K, int64_t k0, const float* w[4]) {
  const int64_t nk = std::min<int64_t>(4, K - k0);
  for (int q = 0; q < 4; ++q) w[q] = W + (k0 + std::min<int64_t>(q, nk - 1)) * H;
  return nk;
}

// The LayerNorm's mean and 1 / std of a row of H values from their sum and sum of squares.
inline void ln_stats(double sum, double sumsq, int64_t H, double ln_eps, double& mean, double& rs) {
  const double hd = static_cast<double>(H);
  mean = sum / hd;
  rs = 1.0 / std::sqrt(std::max(0.0, sumsq / hd - mean * mean) + ln_eps);
}

// The head (and the agent's projection) with its LayerNorm folded in, for one float row x (H):
// LN(x)_j = (x_j - m) rs g_j + beta_j, so
//   out[k] = rs (x . wg[k] - m sg[k]) + cb[k],  wg[k][j] = g_j w[k][j],  sg[k] = sum_j wg[k][j],
//   cb[k] = beta . w[k] + b[k]
// (fold_head, once per call).  One pass over the row: the row's sum and sum of squares ride along
// with the first four dot products (no normalised copy of the row, no separate statistics);
// mean and variance in double from float lanes, as row_dot.  Every term uses x_j - x_0 (the
// LayerNorm and the folded formula are invariant to a shift of the row): without it a row whose
// values are nearly equal (saturated tanh states) lost its variance and its centred dot products
// to cancellation in E[x^2] - E[x]^2 and x . wg - m sg.  Same value as the LayerNorm then the
// projection up to float rounding (checked against the Python loop, tests/test_model_fused.py).
__attribute__((target("avx2,fma"))) void ln_proj_row_avx2(const float* x, int64_t K, int64_t H, const float* W,
                                                          const double* sg, const double* cb, double ln_eps,
                                                          float* out) {
  double mean = 0.0, rs = 0.0;
  float dots[4];
  const float c = x[0];  // the shift (see above)
  const __m256 cv = _mm256_set1_ps(c);
  for (int64_t k0 = 0; k0 < K; k0 += 4) {
    const float* w[4];
    const int64_t nk = head_block(W, H, K, k0, w);
    const bool stats = k0 == 0;
    __m256 lo[4], hi[4];
    for (int q = 0; q < 4; ++q) lo[q] = hi[q] = _mm256_setzero_ps();
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), q0 = _mm256_setzero_ps(), q1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= H; j += 16) {
      const __m256 x0 = _mm256_sub_ps(_mm256_loadu_ps(x + j), cv), x1 = _mm256_sub_ps(_mm256_loadu_ps(x + j + 8), cv);
      for (int q = 0; q < 4; ++q) {
        lo[q] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w[q] + j), lo[q]);
        hi[q] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w[q] + j + 8), hi[q]);
      }
      if (stats) {
        s0 = _mm256_add_ps(s0, x0);
        s1 = _mm256_add_ps(s1, x1);
        q0 = _mm256_fmadd_ps(x0, x0, q0);
        q1 = _mm256_fmadd_ps(x1, x1, q1);
      }
    }
    alignas(32) float t[8];
    for (int q = 0; q < nk; ++q) {
      _mm256_store_ps(t, _mm256_add_ps(lo[q], hi[q]));
      float acc = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
      for (int64_t jj = j; jj < H; ++jj) acc += (x[jj] - c) * w[q][jj];
      dots[q] = acc;
    }
    if (stats) {
      alignas(32) float ts[8], tq[8];
      _mm256_store_ps(ts, _mm256_add_ps(s0, s1));
      _mm256_store_ps(tq, _mm256_add_ps(q0, q1));
      double sum = 0.0, sumsq = 0.0;
      for (int q = 0; q < 8; ++q) {
        sum += ts[q];
        sumsq += tq[q];
      }
      for (int64_t jj = j; jj < H; ++jj) {
        const float d = x[jj] - c;
        sum += d;
        sumsq += static_cast<double>(d) * d;
      }
      ln_stats(sum, sumsq, H, ln_eps, mean, rs);
    }
    for (int q = 0; q < nk; ++q)
      out[k0 + q] = static_cast<float>(rs * (static_cast<double>(dots[q]) - mean * sg[k0 + q]) + cb[k0 + q]);
  }
}

// ln_proj_row_avx2 for two rows at once on AVX-512 (chosen at run time, head_rows): the weight
// loads are shared by the two rows, 16 floats per lane vector, a masked load for a tail of
// H % 16.  The two rows' sums never mix, so a row's result does not depend on its partner (a lone
// row is passed twice).  Measured 1.5x faster than two calls of the AVX2 kernel at H = 256,
// K = 10 (2-core CI machine).
// The 16 float lanes of v summed in double, in a fixed order (as the AVX2 kernel sums its lanes).
__attribute__((target("avx512f"))) inline double reduce_add_pd(__m512 v) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  double s = 0.0;
  for (int i = 0; i < 16; ++i) s += t[i];
  return s;
}

__attribute__((target("avx512f"))) void ln_proj_rows2_avx512(const float* x0, const float* x1, int64_t K, int64_t H,
                                                            const float* W, const double* sg, const double* cb,
                                                            double ln_eps, float* out0, float* out1) {
  double mean[2] = {0.0, 0.0}, rs[2] = {0.0, 0.0};
  const int64_t nb = (H + 15) / 16;
  const __mmask16 tail = H % 16 == 0 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (H % 16)) - 1u);
  const __m512 c0 = _mm512_set1_ps(x0[0]), c1 = _mm512_set1_ps(x1[0]);  // the shifts (see ln_proj_row_avx2)
  for (int64_t k0 = 0; k0 < K; k0 += 4) {
    const float* w[4];
    const int64_t nk = head_block(W, H, K, k0, w);
    const bool stats = k0 == 0;
    __m512 a0[4], a1[4];
    for (int q = 0; q < 4; ++q) a0[q] = a1[q] = _mm512_setzero_ps();
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), q0 = _mm512_setzero_ps(), q1 = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t j = 16 * b;
      const __mmask16 m = b + 1 < nb ? static_cast<__mmask16>(0xFFFF) : tail;
      const __m512 v0 = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x0 + j), c0);
      const __m512 v1 = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x1 + j), c1);
      for (int q = 0; q < 4; ++q) {
        const __m512 wv = _mm512_maskz_loadu_ps(m, w[q] + j);
        a0[q] = _mm512_fmadd_ps(v0, wv, a0[q]);
        a1[q] = _mm512_fmadd_ps(v1, wv, a1[q]);
      }
      if (stats) {
        s0 = _mm512_add_ps(s0, v0);
        s1 = _mm512_add_ps(s1, v1);
        q0 = _mm512_fmadd_ps(v0, v0, q0);
        q1 = _mm512_fmadd_ps(v1, v1, q1);
      }
    }
    if (stats) {
      ln_stats(reduce_add_pd(s0), reduce_add_pd(q0), H, ln_eps, mean[0], rs[0]);
      ln_stats(reduce_add_pd(s1), reduce_add_pd(q1), H, ln_eps, mean[1], rs[1]);
    }
    for (int q = 0; q < nk; ++q) {
      const double d0 = reduce_add_pd(a0[q]), d1 = reduce_add_pd(a1[q]);
      out0[k0 + q] = static_cast<float>(rs[0] * (d0 - mean[0] * sg[k0 + q]) + cb[k0 + q]);
      out1[k0 + q] = static_cast<float>(rs[1] * (d1 - mean[1] * sg[k0 + q]) + cb[k0 + q]);
    }
  }
}

// fold_head's arrays for ln_proj_row_avx2 from the LayerNorm (g, beta) and the head's rows (w, b).
void fold_head(RunArgs& A) {
  const int64_t K = A.w_head.size(0), H = A.H;
  const float* w = A.w_head.data_ptr<float>();
  const float* bh = A.b_head.data_ptr<float>();
  const float* g = A.ln_w.data_ptr<float>();
  const float* beta = A.ln_b.data_ptr<float>();
  A.wg.resize(K * H);
  A.sg.assign(K, 0.0);
  A.cb.assign(K, 0.0);
  for (int64_t k = 0; k < K; ++k) {
    double c = 0.0;
    for (int64_t j = 0; j < H; ++j) {
      const float v = g[j] * w[k * H + j];
      A.wg[k * H + j] = v;
      A.sg[k] += v;
      c += static_cast<double>(beta[j]) * w[k * H + j];
    }
    A.cb[k] = c + bh[k];
  }
}
#endif

// The head (and the agent's projection) on n states: out (n, K) = LN(x) w_head[:K]^T + b_head[:K]
// (K = C: the head's logits; K = C + P: and the agent's projections).  Float rows on AVX2: one
// pass per row with the LayerNorm folded into the weights (ln_proj_row_avx2: a handful of
// outputs, where a BLAS call per step runs at a fraction of its speed).  Otherwise the
// LayerNorm per row (mean and variance in double) into zbuf (n, H), then one GEMM.
template <typename S, bool kAvx2>
__attribute__((always_inline)) inline void head_rows_body(const RunArgs& A, const S* x, int64_t n, int64_t K,
                                                          std::vector<S>& zbuf, S* out) {
  const int64_t H = A.H;
  if (n <= 0) return;
#ifdef DYNALAY_X86
  if constexpr (kAvx2 && std::is_same<S, float>::value) {
    if (A.head_avx512) {
      for (int64_t i = 0; i + 1 < n; i += 2)
        ln_proj_rows2_avx512(x + i * H, x + (i + 1) * H, K, H, A.wg.data(), A.sg.data(), A.cb.data(), A.ln_eps,
                             out + i * K, out + (i + 1) * K);
      if (n % 2 == 1) {  // the last row alone: twice, the copy's outputs into zbuf
        zbuf.resize(K);
        const S* xl = x + (n - 1) * H;
        ln_proj_rows2_avx512(xl, xl, K, H, A.wg.data(), A.sg.data(), A.cb.data(), A.ln_eps, out + (n - 1) * K,
                             zbuf.data());
      }
      return;
    }
    for (int64_t i = 0; i < n; ++i)
      ln_proj_row_avx2(x + i * H, K, H, A.wg.data(), A.sg.data(), A.cb.data(), A.ln_eps, out + i * K);
    return;
  }
#endif
  zbuf.resize(n * H);
  const S* g = A.ln_w.data_ptr<S>();
  const S* bb = A.ln_b.data_ptr<S>();
  const S* ones = A.ones.data_ptr<S>();
  const S* bh = A.b_head.data_ptr<S>();
  for (int64_t i = 0; i < n; ++i) {
    const S* xi = x + i * H;
    const double mean = row_dot(xi, ones, H) / static_cast<double>(H);
    const double var = std::max(0.0, row_dot(xi, xi, H) / static_cast<double>(H) - mean * mean);
    const S m = static_cast<S>(mean), rs = static_cast<S>(1.0 / std::sqrt(var + A.ln_eps));
    S* z = zbuf.data() + i * H;
    for (int64_t j = 0; j < H; ++j) z[j] = (xi[j] - m) * rs * g[j] + bb[j];
  }
  rows_times_wt(n, K, H, zbuf.data(), A.w_head.data_ptr<S>(), out);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < K; ++k) out[i * K + k] += bh[k];
}

#ifdef DYNALAY_X86
template <typename S>
__attribute__((target("avx2,fma"))) void head_rows_avx2(const RunArgs& A, const S* x, int64_t n, int64_t K,
                                                        std::vector<S>& zbuf, S* out) {
  head_rows_body<S, true>(A, x, n, K, zbuf, out);
}
#endif

template <typename S>
void head_rows(const RunArgs& A, const S* x, int64_t n, int64_t K, std::vector<S>& zbuf, S* out) {
#ifdef DYNALAY_X86
  if (kDecideAVX2) return head_rows_avx2<S>(A, x, n, K, zbuf, out);
#endif
  head_rows_body<S, false>(A, x, n, K, zbuf, out);
}

// Max probability of the softmax of l[0..C) (the early-exit confidence; the agent's feature).
template <typename S>
double max_prob(const S* l, int64_t C) {
  int64_t pred;
  double s, ez;
  softmax_stats(l, C, pred, s, ez);
  return 1.0 / s;
}

// DynaLay.run on rows [r0, r1) of x: the encoder, then every step of the loop (module docstring of
// dynalay/models/dynalay.py) on one thread; the rows that stop leave the chunk.  Per-row work is
// plain loops over the chunk's own buffers; the solve is one dynamic_step per step.
// rps[t] += rows solved at step t.
template <typename S>
void run_rows(const RunArgs& A, const Tensor& x, int64_t r0, int64_t r1, int64_t* rps) {
  const int64_t T = A.T, L = A.L, H = A.H, C = A.C, P = A.P, HD = A.HD, K = C + P, D = A.D;
  const auto opt = x.options();
  const auto i64 = opt.dtype(at::kLong);
  int64_t n = r1 - r0;
  std::vector<int64_t> rows(n), a(n), pred(n), prev_pred(n, -1), ridx, sidx, sidx_row;
  for (int64_t i = 0; i < n; ++i) rows[i] = r0 + i;
  std::vector<S> hist, conf(n), lg(n * K), zbuf, tmp, xs;
  std::vector<double> hn(n);
  bool hn_known = false;
  DecideScratch<S> dsc;
  if (A.use_agent) {
    hist.assign(n * HD, S(0));
    for (int64_t i = 0; i < n; ++i) hist[i * HD + HD - 1] = static_cast<S>(A.lam_feature);
  }
  const bool head_every_state = A.use_agent || A.exit_threshold.has_value();
  // the encoder: h0 = tanh(x enc_w^T + enc_b)
  Tensor hs = at::empty({n, H}, opt);
  {
    S* hp0 = hs.data_ptr<S>();
    rows_times_wt(n, H, D, x.data_ptr<S>() + r0 * D, A.enc_w.data_ptr<S>(), hp0);
    const S* eb = A.enc_b.data_ptr<S>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < H; ++j) hp0[i * H + j] += eb[j];
    tanh_inplace(n * H, hp0);
  }
  S* fin = A.fin.data_ptr<S>();
  const int64_t* forced = A.use_agent ? nullptr : A.forced.data_ptr<int64_t>();
  for (int64_t t = 0; t <= T; ++t) {
    const bool last = t == T;
    const S* hp = hs.data_ptr<S>();
    // ---- the head (and the agent's projection) on the current states
    if (head_every_state) head_rows<S>(A, hp, n, K, zbuf, lg.data());
    // ---- decide
    if (last) {
      std::fill(a.begin(), a.begin() + n, L);
    } else if (A.use_agent) {
      decide_rows<S>(0, n, lg.data(), K, C, P > 0 ? lg.data() + C : nullptr, K, P, hist.data(), HD,
                     prev_pred.data(), A.decide[t], dsc, A.nop_bias, A.conf_mode, a.data(), conf.data(), pred.data());
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = forced[rows[i] * T + t];
        TORCH_CHECK(v >= 0 && v <= L, "dynalay: forced actions must lie in [0, ", L, "], got ", v);
        a[i] = v;
        if (A.exit_threshold.has_value() && max_prob(lg.data() + i * K, C) >= *A.exit_threshold) a[i] = L;
      }
    }
    // ---- rows that stop now: their prediction is the head on their current state; the
    // others move to the front of every per-row buffer, in order
    int64_t w_ = 0;
    ridx.clear();
    sidx.clear();
    sidx_row.clear();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = rows[i];
      if (!last) A.actions[row * T + t] = a[i];
      if (a[i] == L) {
        if (head_every_state) {
          std::copy(lg.data() + i * K, lg.data() + i * K + C, fin + row * C);
        } else {  // static / truncation: the head only runs where a row ends (below)
          sidx.push_back(i);
          sidx_row.push_back(row);
        }
        continue;
      }
      ridx.push_back(i);
      if (w_ != i) {
        rows[w_] = row;
        a[w_] = a[i];
        if (A.use_agent) {
          std::copy(hist.data() + i * HD, hist.data() + (i + 1) * HD, hist.data() + w_ * HD);
          conf[w_] = conf[i];
          pred[w_] = pred[i];
          hn[w_] = hn[i];
        }
      }
      ++w_;
    }
    if (!sidx.empty()) {  // the head on the rows that stop, in one pass (gathered unless all stop)
      const int64_t ns = static_cast<int64_t>(sidx.size());
      const S* xsp = hp;
      if (ns < n) {
        xs.resize(ns * H);
        for (int64_t j = 0; j < ns; ++j) std::copy(hp + sidx[j] * H, hp + (sidx[j] + 1) * H, xs.data() + j * H);
        xsp = xs.data();
      }
      tmp.resize(ns * C);
      head_rows<S>(A, xsp, ns, C, zbuf, tmp.data());
      for (int64_t j = 0; j < ns; ++j) std::copy(tmp.data() + j * C, tmp.data() + (j + 1) * C, fin + sidx_row[j] * C);
    }
    const int64_t n_run = w_;
    if (last || n_run == 0) break;
    if (n_run < n) {  // the running rows' states to the front, in place: hs is this chunk's own buffer
      S* hw = hs.data_ptr<S>();
      for (int64_t j = 0; j < n_run; ++j)
        if (ridx[j] != j) std::memcpy(hw + j * H, hw + ridx[j] * H, sizeof(S) * H);
      hs = hs.narrow(0, 0, n_run);
    }
    n = n_run;
    rps[t] += n;
    // ---- one dynamic_step; one block per group: this chunk runs on one thread (the same
    // blocking with any thread count)
    Tensor at_ = at::from_blob(a.data(), {n}, i64);
    auto r = dynamic_step_blocked(hs, at_, A.U, A.W, A.b, A.tol, A.max_iter, A.solver, A.damping, A.anderson_m,
                                  A.anderson_lam, A.eps, 1, A.w_finite);
    const Tensor h1 = std::get<0>(r);
    const int32_t* itp = std::get<1>(r).data_ptr<int32_t>();
    const bool* cvp = std::get<3>(r).data_ptr<bool>();
    for (int64_t i = 0; i < n; ++i) {
      A.layers[rows[i]] += 1;
      A.iters[rows[i]] += itp[i];
      A.step_iters[rows[i] * T + t] = itp[i];
    }
    if (A.use_agent) {
      const S* x0 = hs.data_ptr<S>();
      const S* x1 = h1.data_ptr<S>();
      const S use_inc = static_cast<S>(1.0 / static_cast<double>(T));
      const S it_scale = static_cast<S>(1.0 / static_cast<double>(A.max_iter));
      for (int64_t i = 0; i < n; ++i) {
        // relative state change ||h1 - h0|| / ||h0|| from two reductions (||h0|| is carried)
        const double n0 = hn_known ? hn[i] : std::sqrt(row_dot(x0 + i * H, x0 + i * H, H));
        const double n1 = std::sqrt(row_dot(x1 + i * H, x1 + i * H, H));
        const double d2 = std::max(0.0, n1 * n1 + n0 * n0 - 2.0 * row_dot(x1 + i * H, x0 + i * H, H));
        hn[i] = n1;
        S* row = hist.data() + i * HD;
        row[a[i]] += use_inc;                                // layer-use counts / T
        for (int64_t l = 0; l < L; ++l) row[L + l] = S(0);  // last action one-hot
        row[L + a[i]] = S(1);
        row[2 * L] = static_cast<S>(itp[i]) * it_scale;     // last solve's iters / max_iter
        row[2 * L + 1] = cvp[i] ? S(1) : S(0);              // last converged
        row[2 * L + 2] = static_cast<S>(std::sqrt(d2) / (n0 + 1e-6));  // relative state change
        row[2 * L + 3] = conf[i];                           // max probability on the previous state
        prev_pred[i] = pred[i];
      }
      hn_known = true;
    }
    hs = h1;
  }
}

// Rows per chunk: the batch is cut into chunks that threads run through every step on their
// own (no barrier between the small ops of a step; the ops of a chunk run serially on its
// thread).  Like the solve's blocking it depends on B and H only, never on the thread count.
// Up to 128 rows: the solves late in the loop get few rows per chunk, and each dynamic_step
// call has a fixed cost (measured on 2 cores, B = 256, H = 256: 128 rows per chunk beat 64 and
// 32 for both DynaLay and the static baseline); at least two chunks, and >= 1 MFLOP per GEMM.
int64_t chunk_rows(int64_t B, int64_t H) {
  // tuning/diagnosis only; read at every call (one getenv per batch), so that one process can
  // time several settings back to back
  const char* force = std::getenv("DYNALAY_CPU_CHUNK_ROWS");
  if (force != nullptr && std::atoll(force) > 0) return std::atoll(force);
  const int64_t min_rows = std::max<int64_t>(16, (int64_t(1) << 20) / (2 * H * H));
  return std::min<int64_t>(B, std::max<int64_t>(min_rows, std::min<int64_t>(128, (B + 1) / 2)));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> run_model_cpu(
    const Tensor& x_, const Tensor& enc_w, const Tensor& enc_b, const Tensor& U, const Tensor& W, const Tensor& b,
    double tol, int64_t max_iter, c10::string_view solver, double damping, int64_t anderson_m, double anderson_lam,
    double eps, const Tensor& ln_w, const Tensor& ln_b, double ln_eps, const Tensor& head_w, const Tensor& head_b,
    at::TensorList agent, double nop_bias, double lam_feature, const c10::optional<Tensor>& forced,
    c10::optional<double> exit_threshold, int64_t T, at::ArrayRef<double> costs, int64_t conf_mode) {
  TORCH_CHECK(x_.dim() == 2 && x_.size(0) > 0, "dynalay: run_model needs x of shape (B, D), B >= 1");
  TORCH_CHECK(conf_mode == 0 || conf_mode == 1,
              "dynalay: conf_mode must be 0 (max probability) or 1 (log-odds), got ", conf_mode);
  const auto dt = x_.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "dynalay: run_model runs float32 or float64");
  const Tensor x = x_.contiguous();
  const int64_t B = x.size(0), D = x.size(1), H = U.size(1), L = U.size(0), C = head_w.size(0);
  TORCH_CHECK(enc_w.dim() == 2 && enc_w.size(0) == H && enc_w.size(1) == D && enc_b.numel() == H &&
                  enc_w.scalar_type() == dt && enc_b.scalar_type() == dt,
              "dynalay: the encoder weight must be (H, D) and its bias (H,), of x's dtype");
  TORCH_CHECK(costs.size() == 5, "dynalay: costs are [encoder, layer_fixed, per_iter, head, agent] FLOPs");
  TORCH_CHECK(T >= 1, "dynalay: run_model needs max_steps >= 1");
  TORCH_CHECK(head_w.dim() == 2 && head_w.size(1) == H && head_w.scalar_type() == dt,
              "dynalay: head weight must be (C, H) of x's dtype");
  TORCH_CHECK(U.scalar_type() == dt && W.scalar_type() == dt && b.scalar_type() == dt,
              "dynalay: U, W, b must have x's dtype");
  const bool use_agent = !agent.empty();
  const bool has_forced = forced.has_value() && forced->defined();
  TORCH_CHECK(use_agent != has_forced, "dynalay: run_model takes either agent weights or a forced action table");
  TORCH_CHECK(agent.empty() || agent.size() == 6 || agent.size() == 8,
              "dynalay: agent weights are [inp_w, inp_b, step_emb, out_w, out_b, step_bias(, proj_w, proj_b)]");
  TORCH_CHECK(!has_forced || (forced->dim() == 2 && forced->size(0) == B && forced->size(1) == T &&
                              forced->scalar_type() == at::kLong),
              "dynalay: forced must be a (B, max_steps) int64 table");
  TORCH_CHECK(use_agent || nop_bias == 0.0, "dynalay: nop_bias applies to the agent only");
  RunArgs A;
  A.enc_w = enc_w.contiguous(); A.enc_b = enc_b.contiguous(); A.D = D;
  A.U = U; A.W = W; A.b = b;
  // The solves from 0 skip their first GEMM, exact for a finite W (dynamic_step_blocked).  Not
  // scanned here (a scan per call cost ~7% of a batch-1 call): DynaLay.run checks a W it is given
  // (once per version), and the spectral bound's effective weight cannot hold an Inf without
  // NaNs (an Inf makes sigma Inf or NaN, the scale 0 or NaN), which propagate from the second
  // iteration and fail the run's logits check.
  A.w_finite = true;
  A.ln_w = ln_w.contiguous(); A.ln_b = ln_b.contiguous();
  TORCH_CHECK(A.ln_w.numel() == H && A.ln_b.numel() == H && ln_w.scalar_type() == dt && ln_b.scalar_type() == dt,
              "dynalay: LayerNorm weight and bias must be (H,) of h's dtype");
  A.tol = tol; A.damping = damping; A.anderson_lam = anderson_lam; A.eps = eps; A.ln_eps = ln_eps;
  A.nop_bias = nop_bias; A.lam_feature = lam_feature; A.conf_mode = conf_mode;
  A.max_iter = max_iter; A.anderson_m = anderson_m;
  A.T = T; A.L = L; A.H = H; A.C = C; A.HD = 2 * L + 5;  // DynaLayConfig.history_dim
  A.P = agent.size() == 8 ? agent[6].size(0) : 0;
  A.solver = solver; A.exit_threshold = exit_threshold; A.use_agent = use_agent;
  if (use_agent) {
    for (size_t i = 0; i < 6; ++i) {
      TORCH_CHECK(agent[i].scalar_type() == dt, "dynalay: agent weights must have h's dtype");
      A.agent.push_back(agent[i].contiguous());
    }
    TORCH_CHECK(A.agent[0].dim() == 2 && A.agent[0].size(1) == A.P + 3 + A.HD && A.agent[2].size(0) == T &&
                    A.agent[2].size(1) == A.agent[0].size(0) && A.agent[3].size(0) == L + 1 &&
                    A.agent[3].size(1) == A.agent[0].size(0) && A.agent[5].size(0) == T &&
                    A.agent[5].size(1) == L + 1,
                "dynalay: agent weights do not match the model's sizes");
    const int64_t na = A.agent[0].size(0);
    AT_DISPATCH_FLOATING_TYPES(dt, "dynalay_run_model_agent", [&] {
      const auto& w = A.agent;
      for (int64_t t = 0; t < T; ++t)
        A.decide.push_back(prepare_decide<scalar_t>(w[0].data_ptr<scalar_t>(), w[1].data_ptr<scalar_t>(),
                                                    w[2].data_ptr<scalar_t>() + t * na, A.P + 3 + A.HD, na,
                                                    w[3].data_ptr<scalar_t>(), w[4].data_ptr<scalar_t>(),
                                                    w[5].data_ptr<scalar_t>() + t * (L + 1), L + 1));
    });
  } else {
    A.forced = forced->contiguous();
  }
  // the head's rows, then the agent's projection rows: one pass per state computes both
  A.w_head = (A.P > 0 ? at::cat({head_w, agent[6]}) : head_w).contiguous();
  A.b_head = (A.P > 0 ? at::cat({head_b, agent[7]}) : head_b).contiguous();
  TORCH_CHECK(A.w_head.size(1) == H && A.b_head.numel() == C + A.P && A.b_head.scalar_type() == dt,
              "dynalay: head weight (C, H) and bias (C,) of h's dtype");
#ifdef DYNALAY_X86
  if (dt == at::kFloat && kDecideAVX2) {
    fold_head(A);
    // read at every call (one getenv per batch), so that tests can run both kernels in one process
    const char* no512 = std::getenv("DYNALAY_CPU_NO_AVX512");
    A.head_avx512 = kHasAVX512F && !(no512 != nullptr && no512[0] != '\0' && no512[0] != '0');
  }
#endif
  if (A.wg.empty()) A.ones = at::ones({H}, x.options());  // the unfolded LayerNorm's mean (head_rows_body)
  const auto i64 = x.options().dtype(at::kLong);
  A.fin = at::zeros({B, C}, x.options());
  Tensor layers = at::zeros({B}, i64), iters = at::zeros({B}, i64);
  Tensor actions = at::full({B, T}, -1, i64);
  Tensor step_iters = at::zeros({B, T}, x.options().dtype(at::kInt));
  A.layers = layers.data_ptr<int64_t>();
  A.iters = iters.data_ptr<int64_t>();
  A.actions = actions.data_ptr<int64_t>();
  A.step_iters = step_iters.data_ptr<int32_t>();

  const int64_t cr = chunk_rows(B, H);
  const int64_t nc = (B + cr - 1) / cr;
  std::vector<int64_t> rps(nc * T, 0);
  auto run_chunk = [&](int64_t c) {
    AT_DISPATCH_FLOATING_TYPES(dt, "dynalay_run_model", [&] {
      run_rows<scalar_t>(A, x, c * cr, std::min(B, (c + 1) * cr), rps.data() + c * T);
    });
  };
  run_work_list(nc, std::max<int64_t>(1, at::get_num_threads()), run_chunk);
  Tensor rows_per_step = at::zeros({T}, i64);
  int64_t* rpp = rows_per_step.data_ptr<int64_t>();
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t t = 0; t < T; ++t) rpp[t] += rps[c * T + t];
  // FLOPs per row (CostModel.per_sample, same operations in the same order)
  Tensor flops = at::empty({B}, x.options().dtype(at::kDouble));
  double* fp = flops.data_ptr<double>();
  const bool head_every_state = use_agent || exit_threshold.has_value();
  for (int64_t i = 0; i < B; ++i) {
    const double nl = static_cast<double>(A.layers[i]);
    const double hs = head_every_state ? nl + 1.0 : 1.0;
    const double as = use_agent ? std::min(nl + 1.0, static_cast<double>(T)) : 0.0;
    double f = costs[0] + costs[1] * nl;
    f = f + costs[2] * static_cast<double>(A.iters[i]);
    f = f + costs[3] * hs;
    fp[i] = f + costs[4] * as;
  }
  return {A.fin, flops, layers, iters, actions, step_iters, rows_per_step};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynalay_C, CPU, m) {
  m.impl("agent_decide", &agent_decide_cpu);
  m.impl("run_model", &run_model_cpu);
}

}  // namespace dynalay
