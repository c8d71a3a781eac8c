// C++ CPU kernels of dynalay: the grouped fixed-point solve (forward and adjoint map), the
// fused DynaLay step, the one-call implicit backward, grouped linear map and weight gradient,
// and the finite-input check.  Semantics: dynalay/backends/torch_ref.py.
//
// The rows to solve are packed group after group and cut into blocks (solve_packed); the
// threads take blocks from one work list and solve each to the end.  A block iteration is one
// GEMM on its active rows (MKL through at::addmm, single-threaded inside the block) and one
// pass that applies the map's elementwise part, computes each row's relative residual, takes
// the Picard or Anderson step and freezes the rows that met the tolerance; frozen rows are
// written out and compacted away, so an iteration costs work proportional to the rows still
// active.  From z0 = 0 the first f-evaluation needs no GEMM (when W is finite).  The GEMM and the tanh call MKL
// directly when the torch wheel exports it (same kernels as at::addmm / tanh_, no dispatch).  Deterministic and independent
// of the thread count: fixed loop orders, no atomics, a blocking that depends on the group
// sizes only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "solver_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <exception>
#include <functional>
#include <limits>
#include <string>
#include <memory>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef DYNALAY_X86
#include <immintrin.h>
#endif

namespace dynalay {
namespace {

constexpr double kAndersonRestart = 2.0;  // keep in sync with torch_ref.ANDERSON_RESTART

struct Cfg {
  bool adjoint;
  double tol;
  int64_t max_iter;
  bool anderson;
  double damping;
  int64_t m;
  double lam;
  double eps;
  bool z0_zero = false;  // the initial iterate is 0: the first f-evaluation needs no GEMM
  int64_t min_blocks = 4;  // blocks_per_group: split groups for parallelism down to this many blocks
};

// Solve the m x m (or smaller) system A y = rhs in place by Gaussian elimination with
// partial pivoting.  Returns false if a pivot is zero or not finite.
bool small_solve(std::vector<double>& A, std::vector<double>& y, int n) {
  for (int col = 0; col < n; ++col) {
    int piv = col;
    double best = std::abs(A[col * n + col]);
    for (int r = col + 1; r < n; ++r) {
      double v = std::abs(A[r * n + col]);
      if (v > best) { best = v; piv = r; }
    }
    if (!(best > 0.0) || !std::isfinite(best)) return false;
    if (piv != col) {
      for (int j = 0; j < n; ++j) std::swap(A[col * n + j], A[piv * n + j]);
      std::swap(y[col], y[piv]);
    }
    const double inv = 1.0 / A[col * n + col];
    for (int r = col + 1; r < n; ++r) {
      const double f = A[r * n + col] * inv;
      if (f == 0.0) continue;
      for (int j = col; j < n; ++j) A[r * n + j] -= f * A[col * n + j];
      y[r] -= f * y[col];
    }
  }
  for (int r = n - 1; r >= 0; --r) {
    double s = y[r];
    for (int j = r + 1; j < n; ++j) s -= A[r * n + j] * y[j];
    y[r] = s / A[r * n + r];
  }
  return true;
}

// Squared norms of (f - z) and f over 16 independent lanes in the compute type (a single
// accumulator chain is latency-bound and cost more than the GEMM epilogue); lanes are summed
// in double.
template <typename T>
inline void row_norms(const T* __restrict f, const T* __restrict z, int64_t H, double& num, double& den) {
  constexpr int kL = 16;
  T a[kL] = {};
  T b[kL] = {};
  int64_t j = 0;
  for (; j + kL <= H; j += kL) {
#pragma GCC unroll 16
    for (int q = 0; q < kL; ++q) {
      const T fv = f[j + q];
      const T g = fv - z[j + q];
      a[q] += g * g;
      b[q] += fv * fv;
    }
  }
  for (int q = 0; j < H; ++j, ++q) {
    const T fv = f[j];
    const T g = fv - z[j];
    a[q] += g * g;
    b[q] += fv * fv;
  }
  num = 0.0;
  den = 0.0;
  for (int q = 0; q < kL; ++q) {
    num += static_cast<double>(a[q]);
    den += static_cast<double>(b[q]);
  }
}

#ifdef DYNALAY_X86
// AVX2/FMA version for float, chosen at run time (the extension is built for baseline x86-64).
__attribute__((target("avx2,fma"))) void row_norms_avx2(const float* __restrict f, const float* __restrict z,
                                                         int64_t H, double& num, double& den) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= H; j += 16) {
    const __m256 f0 = _mm256_loadu_ps(f + j), f1 = _mm256_loadu_ps(f + j + 8);
    const __m256 g0 = _mm256_sub_ps(f0, _mm256_loadu_ps(z + j));
    const __m256 g1 = _mm256_sub_ps(f1, _mm256_loadu_ps(z + j + 8));
    a0 = _mm256_fmadd_ps(g0, g0, a0);
    a1 = _mm256_fmadd_ps(g1, g1, a1);
    b0 = _mm256_fmadd_ps(f0, f0, b0);
    b1 = _mm256_fmadd_ps(f1, f1, b1);
  }
  alignas(32) float ta[8], tb[8];
  _mm256_store_ps(ta, _mm256_add_ps(a0, a1));
  _mm256_store_ps(tb, _mm256_add_ps(b0, b1));
  num = 0.0;
  den = 0.0;
  for (int q = 0; q < 8; ++q) {
    num += ta[q];
    den += tb[q];
  }
  for (; j < H; ++j) {
    const float g = f[j] - z[j];
    num += static_cast<double>(g) * g;
    den += static_cast<double>(f[j]) * f[j];
  }
}

const bool kHasAVX2 = cpu_has_avx2_fma();

template <>
inline void row_norms<float>(const float* __restrict f, const float* __restrict z, int64_t H, double& num,
                             double& den) {
  if (kHasAVX2) {
    row_norms_avx2(f, z, H, num, den);
    return;
  }
  double a = 0.0, b = 0.0;
  for (int64_t j = 0; j < H; ++j) {
    const float g = f[j] - z[j];
    a += static_cast<double>(g) * g;
    b += static_cast<double>(f[j]) * f[j];
  }
  num = a;
  den = b;
}
#endif

// Dot product accumulated in double (float: AVX2 lanes when available).
template <typename T>
inline double dot(const T* __restrict a, const T* __restrict b, int64_t H) {
  double s[4] = {0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 4 <= H; j += 4)
    for (int q = 0; q < 4; ++q) s[q] += static_cast<double>(a[j + q]) * static_cast<double>(b[j + q]);
  for (; j < H; ++j) s[0] += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  return (s[0] + s[2]) + (s[1] + s[3]);
}

#ifdef DYNALAY_X86
__attribute__((target("avx2,fma"))) double dot_avx2(const float* __restrict a, const float* __restrict b,
                                                     int64_t H) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= H; j += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(s0, s1));
  double s = 0.0;
  for (int q = 0; q < 8; ++q) s += t[q];
  for (; j < H; ++j) s += static_cast<double>(a[j]) * b[j];
  return s;
}

template <>
inline double dot<float>(const float* __restrict a, const float* __restrict b, int64_t H) {
  if (kHasAVX2) return dot_avx2(a, b, H);
  double s = 0.0;
  for (int64_t j = 0; j < H; ++j) s += static_cast<double>(a[j]) * b[j];
  return s;
}
#endif

// Per-row Anderson state: history of residuals G and of X (m slots each, a ring), where X
// holds the iterates x_j, or f(x_j) = x_j + g_j when damping is 1 (the mix then reads one
// array instead of two: this step is memory-bound),
// the Gram matrix of G (updated incrementally: one new row per step), the number of valid
// (most recent) slots and the previous residual norm.
template <typename T>
struct AndersonState {
  int64_t m = 0, H = 0;
  int64_t cap = 0;  // history in use: min(m, H) (see init)
  std::vector<T> X, G;
  std::vector<double> gram;
  std::vector<int64_t> count;
  std::vector<double> prev_gn;

  // More than H residuals are linearly dependent.  Without a ridge (lam = 0) the Gram matrix is
  // then singular and the mix follows rounding noise; with one, the minimum-norm mix spreads its
  // weight over stale iterates (H = 8, ||W|| = 0.95, tol 1e-8: 39 iterations at m = 32 against
  // 16 at m = 8 and Picard's 22).  So at most H pairs are mixed (as in torch_ref).
  void init(int64_t n, int64_t m_, int64_t H_, double /*lam*/) {
    m = m_;
    H = H_;
    cap = std::min(m_, H_);
    X.assign(static_cast<size_t>(n * m * H), T(0));
    G.assign(static_cast<size_t>(n * m * H), T(0));
    gram.assign(static_cast<size_t>(n * m * m), 0.0);
    count.assign(n, 0);
    prev_gn.assign(n, std::numeric_limits<double>::infinity());
  }
  void move_row(int64_t to, int64_t from) {
    std::memcpy(X.data() + to * m * H, X.data() + from * m * H, sizeof(T) * m * H);
    std::memcpy(G.data() + to * m * H, G.data() + from * m * H, sizeof(T) * m * H);
    std::memcpy(gram.data() + to * m * m, gram.data() + from * m * m, sizeof(double) * m * m);
    count[to] = count[from];
    prev_gn[to] = prev_gn[from];
  }

  // Push (z, f - z) for row r at `slot`; if `mix`, write the mixed iterate into z and return
  // true (false: the caller takes the plain step).  Scratch vectors are per thread.
  bool step(int64_t r, int64_t slot, T* z, const T* f, double gn, bool mix, double lam, T damping, bool exact,
            std::vector<double>& A, std::vector<double>& y, std::vector<int64_t>& sl) {
    T* Xr = X.data() + r * m * H;
    T* Gr = G.data() + r * m * H;
    double* Gm = gram.data() + r * m * m;
    if (gn > kAndersonRestart * prev_gn[r]) count[r] = 0;  // safeguard: residual blew up, restart
    prev_gn[r] = gn;
    T* xs = Xr + slot * H;
    T* gs = Gr + slot * H;
    if (exact) {
      for (int64_t j = 0; j < H; ++j) {
        xs[j] = f[j];
        gs[j] = f[j] - z[j];
      }
    } else {
      for (int64_t j = 0; j < H; ++j) {
        xs[j] = z[j];
        gs[j] = f[j] - z[j];
      }
    }
    count[r] = std::min<int64_t>(count[r] + 1, cap);
    const int cnt = static_cast<int>(count[r]);
    sl.resize(cnt);
    for (int q = 0; q < cnt; ++q) sl[q] = ((slot - q) % m + m) % m;
    for (int q = 0; q < cnt; ++q) {
      const double v = dot(gs, Gr + sl[q] * H, H);
      Gm[slot * m + sl[q]] = v;
      Gm[sl[q] * m + slot] = v;
    }
    if (!mix) return false;
    A.assign(static_cast<size_t>(cnt * cnt), 0.0);
    double trace = 0.0;
    for (int p = 0; p < cnt; ++p) {
      for (int q = 0; q < cnt; ++q) A[p * cnt + q] = Gm[sl[p] * m + sl[q]];
      trace += A[p * cnt + p];
    }
    const double reg = lam * trace / cnt + 1e-300;  // ridge relative to the residual scale
    for (int p = 0; p < cnt; ++p) A[p * cnt + p] += reg;
    y.assign(cnt, 1.0);
    if (!small_solve(A, y, cnt)) return false;
    double s = 0.0;
    for (int p = 0; p < cnt; ++p) s += y[p];
    if (!(s != 0.0) || !std::isfinite(s)) return false;
    for (int p = 0; p < cnt; ++p) {
      y[p] /= s;
      if (!std::isfinite(y[p])) return false;
    }
    for (int64_t j = 0; j < H; ++j) z[j] = T(0);
    for (int p = 0; p < cnt; ++p) {
      const T a = static_cast<T>(y[p]);
      const T* xp = Xr + sl[p] * H;
      const T* gp = Gr + sl[p] * H;
      if (exact) {
        for (int64_t j = 0; j < H; ++j) z[j] += a * xp[j];
      } else {
        for (int64_t j = 0; j < H; ++j) z[j] += a * (xp[j] + damping * gp[j]);
      }
    }
    return true;
  }
};

// The two calls of every solve iteration, P = C + Z M (rows: P, C, Z are (na, H) with row
// stride H) and P = tanh(P), go straight to MKL when the torch wheel exports its ILP64 entry
// points (x86 wheels built with MKL; weak symbols, null elsewhere): the same kernels that
// at::addmm_out and at::tanh_ reach (same transposition, beta = 1 after the copy of C, the
// VML mode of ATen's vml.h), without ~8 us of dispatch per iteration, which is most of an
// iteration for a few rows.  DYNALAY_CPU_ATEN_BLAS=1 forces the ATen calls (tests compare).
}  // namespace
}  // namespace dynalay
extern "C" {
void sgemm_64(const char*, const char*, const int64_t*, const int64_t*, const int64_t*, const float*, const float*,
              const int64_t*, const float*, const int64_t*, const float*, float*, const int64_t*) __attribute__((weak));
void dgemm_64(const char*, const char*, const int64_t*, const int64_t*, const int64_t*, const double*, const double*,
              const int64_t*, const double*, const int64_t*, const double*, double*, const int64_t*)
    __attribute__((weak));
void vmsTanh_64(int64_t, const float*, float*, int64_t) __attribute__((weak));
void vmdTanh_64(int64_t, const double*, double*, int64_t) __attribute__((weak));
void vmsExp_64(int64_t, const float*, float*, int64_t) __attribute__((weak));
void vmdExp_64(int64_t, const double*, double*, int64_t) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}
namespace dynalay {
namespace {

constexpr int64_t kVmlMode = 0x2 | 0x140000 | 0x100;  // VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE
const bool kDirectMkl = sgemm_64 != nullptr && dgemm_64 != nullptr && vmsTanh_64 != nullptr &&
                        vmdTanh_64 != nullptr && std::getenv("DYNALAY_CPU_ATEN_BLAS") == nullptr;

inline void mkl_gemm(const char* ta, const char* tb, const int64_t* m, const int64_t* n, const int64_t* k,
                     const float* alpha, const float* a, const int64_t* lda, const float* b, const int64_t* ldb,
                     const float* beta, float* c, const int64_t* ldc) {
  sgemm_64(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void mkl_gemm(const char* ta, const char* tb, const int64_t* m, const int64_t* n, const int64_t* k,
                     const double* alpha, const double* a, const int64_t* lda, const double* b, const int64_t* ldb,
                     const double* beta, double* c, const int64_t* ldc) {
  dgemm_64(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
// Called from a thread of an OpenMP region (the solve's blocks, run_model's chunks), MKL and VML
// would start their own threads (the caller's max-active-levels does not stop them): measured
// 4.0 ms instead of 2.8 ms for a (512, 256) solve on 2 cores.  This guard keeps them serial
// there, as ATen's own calls are.
struct MklSerialInRegion {
  int prev = -1;
  MklSerialInRegion() {
#ifdef _OPENMP
    if (MKL_Set_Num_Threads_Local != nullptr && omp_in_parallel()) prev = MKL_Set_Num_Threads_Local(1);
#endif
  }
  ~MklSerialInRegion() {
    if (prev >= 0) MKL_Set_Num_Threads_Local(prev);
  }
};

// x = fn(x) in place through a VML entry point (kVmlMode), serial inside a parallel region.
template <typename T>
inline void vml_inplace(void (*fn)(int64_t, const T*, T*, int64_t), int64_t n, T* x) {
  MklSerialInRegion serial;
  fn(n, x, x, kVmlMode);
}
inline void mkl_tanh(int64_t n, float* x) { vml_inplace(vmsTanh_64, n, x); }
inline void mkl_tanh(int64_t n, double* x) { vml_inplace(vmdTanh_64, n, x); }
const bool kVmlExp = kDirectMkl && vmsExp_64 != nullptr && vmdExp_64 != nullptr;
inline void mkl_exp(int64_t n, float* x) { vml_inplace(vmsExp_64, n, x); }
inline void mkl_exp(int64_t n, double* x) { vml_inplace(vmdExp_64, n, x); }

// P += Z M for `na` rows (P, Z: (na, H) with row stride H; M: (H, H) at `M` with strides s0, s1,
// row-major or a transposed view).  False: not handled here (P untouched).
template <typename T>
bool direct_gemm_acc(int64_t na, int64_t H, T* P, const T* Z, const T* M, int64_t s0, int64_t s1) {
  if (!kDirectMkl || na < 1) return false;
  char ta;
  int64_t lda;
  if (s1 == 1 && s0 >= H) {  // row-major M: its buffer read column-major is M^T, as needed
    ta = 'N';
    lda = s0;
  } else if (s0 == 1 && s1 >= H) {  // a transposed view: its buffer read column-major is M
    ta = 'T';
    lda = s1;
  } else {
    return false;
  }
  // row-major P = Z M  <=>  column-major P^T = M^T Z^T
  const char tb = 'N';
  const int64_t m = H, n = na, k = H, ld = H;
  const T one = 1;
  MklSerialInRegion serial;
  mkl_gemm(&ta, &tb, &m, &n, &k, &one, M, &lda, Z, &ld, &one, P, &ld);
  return true;
}

// The matrix of one group (row-major z @ M): its data and strides, and the tensor it views
// (used only by the ATen fallback, when MKL is not reachable directly).
template <typename T>
struct GroupMat {
  const T* p;
  int64_t s0, s1;
  const at::Tensor* all;  // (L, H, H)
  int64_t layer;
};

// P = C + Z M for `na` rows: straight to MKL when it can, else at::addmm_out on views.
template <typename T>
void block_addmm(int64_t na, int64_t H, T* P, T* C, T* Z, const GroupMat<T>& M) {
  if (kDirectMkl && na >= 1) {
    std::memcpy(P, C, sizeof(T) * na * H);
    if (direct_gemm_acc<T>(na, H, P, Z, M.p, M.s0, M.s1)) return;  // else: a layout MKL is not given
  }
  const auto opt = M.all->options();
  at::Tensor Pn = at::from_blob(P, {na, H}, opt);
  at::addmm_out(Pn, at::from_blob(C, {na, H}, opt), at::from_blob(Z, {na, H}, opt), (*M.all)[M.layer]);
}

// One block of rows of a group, solved to the end by the calling thread: C (n,H), D (n,H) or
// null, Z (n,H) are private, contiguous and compacted in place; `ids` are the global row
// numbers; `and_state` (Anderson only) is indexed from `and_off`.  Each iteration is one GEMM
// on the active rows (single-threaded here: blocks run in parallel) and one fused pass.  Raw
// buffers only: no tensor is made per block (a few microseconds each, per block and step).
template <typename T>
void solve_block(T* C, T* D, T* Z, int64_t n, int64_t H, const GroupMat<T>& M, int64_t* ids,
                 AndersonState<T>* and_state, int64_t and_off, const Cfg& cfg, T* out_z, int32_t* out_iters,
                 T* out_res, bool* out_conv) {
  if (n == 0) return;
  std::unique_ptr<T[]> p_buf(new T[n * H]);  // not zero-filled: every active row is written before it is read
  T* P = p_buf.get();
  std::vector<uint8_t> done(n, 0);
  std::vector<double> A, y;
  std::vector<int64_t> sl;
  const bool has_d = D != nullptr;
  const T damping = static_cast<T>(cfg.damping);
  const bool exact_step = cfg.damping == 1.0;
  const bool swap_step = exact_step && !cfg.anderson;  // every active row's new iterate is f: swap Z, P
  int64_t na = n;
  for (int64_t k = 1; k <= cfg.max_iter && na > 0; ++k) {
    if (k == 1 && cfg.z0_zero) {
      std::memcpy(P, C, sizeof(T) * na * H);  // C + 0 M: one GEMM of ~10 saved
    } else {
      block_addmm<T>(na, H, P, C, Z, M);
    }
    if (!cfg.adjoint) {
      if (kDirectMkl) mkl_tanh(na * H, P);
      else at::from_blob(P, {na, H}, M.all->options()).tanh_();
    }
    T* Zp = Z;
    T* Pp = P;
    const T* Dp = D;
    const int64_t slot = cfg.anderson ? (k - 1) % cfg.m : 0;
    bool any_done = false;
    for (int64_t r = 0; r < na; ++r) {
      T* z = Zp + r * H;
      T* f = Pp + r * H;
      if (cfg.adjoint) {
        const T* d = Dp + r * H;
        for (int64_t j = 0; j < H; ++j) f[j] = f[j] * d[j];
      }
      double num, den;
      row_norms(f, z, H, num, den);
      const double gn = std::sqrt(num);
      const double res = gn / (std::sqrt(den) + cfg.eps);
      const bool fin = res < cfg.tol;
      const int64_t row = ids[r];
      out_iters[row] = static_cast<int32_t>(k);
      out_res[row] = static_cast<T>(res);
      bool mixed = false;
      if (cfg.anderson)
        mixed = and_state->step(and_off + r, slot, z, f, gn, !fin, cfg.lam, damping, exact_step, A, y, sl);
      if (!mixed && !swap_step) {
        if (exact_step) {
          std::memcpy(z, f, sizeof(T) * H);
        } else {
          for (int64_t j = 0; j < H; ++j) z[j] = z[j] + damping * (f[j] - z[j]);
        }
      }
      if (fin) {
        std::memcpy(out_z + row * H, swap_step ? f : z, sizeof(T) * H);
        out_conv[row] = true;
        done[r] = 1;
        any_done = true;
      }
    }
    if (swap_step) std::swap(Z, P);
    if (any_done) {  // compact the rows still active to the front, in order
      T* Zw = Z;
      T* Cw = C;
      T* Dw = D;
      int64_t w = 0;
      for (int64_t r = 0; r < na; ++r) {
        if (done[r]) continue;
        if (w != r) {
          std::memcpy(Zw + w * H, Zw + r * H, sizeof(T) * H);
          std::memcpy(Cw + w * H, Cw + r * H, sizeof(T) * H);
          if (has_d) std::memcpy(Dw + w * H, Dw + r * H, sizeof(T) * H);
          if (cfg.anderson) and_state->move_row(and_off + w, and_off + r);
          ids[w] = ids[r];
        }
        ++w;
      }
      std::fill(done.begin(), done.begin() + na, 0);
      na = w;
    }
  }
  for (int64_t r = 0; r < na; ++r) std::memcpy(out_z + ids[r] * H, Z + r * H, sizeof(T) * H);
}

// Rows still to solve, laid out group after group ("packed" order): row p of C/D/Z belongs
// to layer `layer_of` its group and to global row ids[p].  The groups are cut into blocks
// that threads solve independently to the end (like the GPU tiles): a block's iterate,
// constant term and GEMM output stay in cache across iterations and no thread waits for
// another between iterations.  All the blocks of all the groups form one work list, taken
// largest first by whichever thread is free (the groups of a DynaLay step differ in size
// and in convergence speed).  Results do not depend on the schedule.  The blocking can change
// a row's last bits (MKL rounds a GEMM of fewer than ~10 rows with another kernel), which is
// why it depends on the group sizes only.
struct Block {
  int64_t layer, r0, len;
};

// Blocks per group: ~128 KiB of iterate per block (8 to 256 rows); when the whole work list
// has fewer than 4 blocks, the largest groups are split further as long as every block keeps
// at least kMinBlockFlops of work per iteration (small GEMMs are slow, and a parallel region
// costs more than a small split saves).  The blocking depends on the group sizes and H only,
// never on the thread count: the GEMM's rounding can depend on its row count, and results
// must be the same with 1 thread or 64.
std::vector<int64_t> blocks_per_group(const std::vector<int64_t>& sizes, int64_t H, int64_t kMinBlocks) {
  constexpr int64_t kMinBlockFlops = int64_t(1) << 21;
  const int64_t flops_per_row = 2 * H * H;
  // ~128 KiB of iterate per block; above H = 256 at least 128 rows: there each block's GEMM streams
  // all of W (H*H, no longer in L2) every iteration, and taller blocks read it fewer times
  const int64_t by_cache = (32768 + H - 1) / H;
  const int64_t target = std::max<int64_t>(8, std::min<int64_t>(256, H > 256 ? std::max<int64_t>(by_cache, 128)
                                                                              : by_cache));
  const int64_t min_rows = std::max<int64_t>(8, (kMinBlockFlops + flops_per_row - 1) / flops_per_row);
  static const char* force = std::getenv("DYNALAY_CPU_BLOCK_ROWS");  // tuning/diagnosis only
  const int64_t forced = force != nullptr ? std::atoll(force) : 0;
  std::vector<int64_t> nb(sizes.size(), 0);
  int64_t total = 0;
  for (size_t g = 0; g < sizes.size(); ++g) {
    const int64_t bm = forced > 0 ? forced : target;
    nb[g] = sizes[g] > 0 ? (sizes[g] + bm - 1) / bm : 0;
    total += nb[g];
  }
  while (forced <= 0 && total < kMinBlocks) {
    // split the group with the largest blocks (first such group on ties), if they stay big enough
    int64_t best = -1, best_rows = 0;
    for (size_t g = 0; g < sizes.size(); ++g) {
      if (nb[g] == 0) continue;
      const int64_t rows = (sizes[g] + nb[g] - 1) / nb[g];
      if (rows > best_rows) { best_rows = rows; best = static_cast<int64_t>(g); }
    }
    if (best < 0 || sizes[best] / (nb[best] + 1) < min_rows) break;
    ++nb[best];
    ++total;
  }
  return nb;
}

// C, D (or undefined), Z: (n, H) private, contiguous, packed; offsets (L+1): group l is packed
// rows [offsets[l], offsets[l+1]); M (L, H, H): the matrix each group's GEMM multiplies by
// (row-major z @ M[l]).
template <typename T>
void solve_packed(at::Tensor C, at::Tensor D, at::Tensor Z, const at::Tensor& M, const std::vector<int64_t>& offsets,
                  std::vector<int64_t>& ids, const Cfg& cfg, T* out_z, int32_t* out_iters, T* out_res,
                  bool* out_conv) {
  const int64_t n = C.size(0);
  const int64_t H = C.size(1);
  if (n == 0) return;
  const int64_t L = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<int64_t> sizes(L);
  for (int64_t l = 0; l < L; ++l) sizes[l] = offsets[l + 1] - offsets[l];
  const std::vector<int64_t> nb_g = blocks_per_group(sizes, H, cfg.min_blocks);
  std::vector<Block> blocks;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t g0 = offsets[l], gn = sizes[l];
    if (gn == 0) continue;
    const int64_t bm = (gn + nb_g[l] - 1) / nb_g[l];
    for (int64_t r = 0; r < gn; r += bm) blocks.push_back({l, g0 + r, std::min(bm, gn - r)});
  }
  AndersonState<T> and_state;
  if (cfg.anderson) and_state.init(n, cfg.m, H, cfg.lam);
  const at::Tensor Mc = M.detach();
  TORCH_CHECK(C.is_contiguous() && Z.is_contiguous() && (!D.defined() || D.is_contiguous()),
              "dynalay: internal error: the packed solve needs contiguous buffers");
  T* cp = C.data_ptr<T>();
  T* zp = Z.data_ptr<T>();
  T* dp = D.defined() ? D.data_ptr<T>() : nullptr;
  const T* mp = Mc.data_ptr<T>();
  auto run_block = [&](const Block& bk) {
    const GroupMat<T> gm{mp + bk.layer * Mc.stride(0), Mc.stride(1), Mc.stride(2), &Mc, bk.layer};
    solve_block<T>(cp + bk.r0 * H, dp != nullptr ? dp + bk.r0 * H : nullptr, zp + bk.r0 * H, bk.len, H, gm,
                   ids.data() + bk.r0, cfg.anderson ? &and_state : nullptr, bk.r0, cfg, out_z, out_iters, out_res,
                   out_conv);
  };
  const int64_t nb = static_cast<int64_t>(blocks.size());
  // largest first (stable: ties keep the packed order)
  std::stable_sort(blocks.begin(), blocks.end(), [](const Block& a, const Block& b) { return a.len > b.len; });
  run_work_list(nb, threads, [&](int64_t i) { run_block(blocks[i]); });
}

// Stable counting sort of the rows by action: offsets (L+2), perm (B).
void group_rows(const at::Tensor& actions, int64_t L, std::vector<int64_t>& offsets, std::vector<int64_t>& perm) {
  const int64_t B = actions.size(0);
  auto a = actions.contiguous();
  const int64_t* ap = a.data_ptr<int64_t>();
  offsets.assign(L + 2, 0);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t v = ap[i];
    TORCH_CHECK(v >= 0 && v <= L, "dynalay: actions must lie in [0, ", L, "], got ", v);
    offsets[v + 1]++;
  }
  for (int64_t l = 0; l <= L; ++l) offsets[l + 1] += offsets[l];
  perm.assign(B, 0);
  std::vector<int64_t> pos(offsets.begin(), offsets.end() - 1);
  for (int64_t i = 0; i < B; ++i) perm[pos[ap[i]]++] = i;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fp_solve_cpu(
    const at::Tensor& c, const at::Tensor& W, const c10::optional<at::Tensor>& d,
    const c10::optional<at::Tensor>& actions, const c10::optional<at::Tensor>& z0, bool adjoint, double tol,
    int64_t max_iter, c10::string_view solver, double damping, int64_t anderson_m, double anderson_lam,
    double eps) {
  TORCH_CHECK(c.dim() == 2, "dynalay: c must be (B, H)");
  TORCH_CHECK(W.dim() == 3 && W.size(1) == c.size(1) && W.size(2) == c.size(1), "dynalay: W must be (L, H, H)");
  TORCH_CHECK(c.scalar_type() == W.scalar_type(), "dynalay: c and W dtypes differ");
  TORCH_CHECK(solver == "picard" || solver == "anderson", "dynalay: unknown solver");
  TORCH_CHECK(!adjoint || (d.has_value() && d->defined()), "dynalay: the adjoint map needs d");
  const int64_t B = c.size(0), L = W.size(0);
  Cfg cfg{adjoint, tol, max_iter, solver == "anderson", damping, anderson_m, anderson_lam, eps};
  at::Tensor cc = c.contiguous();
  at::Tensor out_z = (z0.has_value() && z0->defined()) ? z0->contiguous().clone() : at::zeros_like(cc);
  at::Tensor iters = at::zeros({B}, c.options().dtype(at::kInt));
  at::Tensor res = at::zeros({B}, c.options());
  at::Tensor conv = at::zeros({B}, c.options().dtype(at::kBool));
  const bool grouped = actions.has_value() && actions->defined();
  TORCH_CHECK(grouped || L == 1, "dynalay: W with several layers needs actions");

  const bool has_z0 = z0.has_value() && z0->defined();
  // skipping the first GEMM from z0 = 0 is exact only for a finite W (W 0 is NaN otherwise: an Inf
  // in W with check="none" gave finite rows flagged converged where the reference gives NaN)
  cfg.z0_zero = !has_z0 && all_finite(W);
  std::vector<int64_t> offsets, perm;
  if (grouped) {
    TORCH_CHECK(actions->dim() == 1 && actions->size(0) == B && actions->scalar_type() == at::kLong,
                "dynalay: actions must be (B,) int64");
    group_rows(*actions, L, offsets, perm);
    bool* cp = conv.data_ptr<bool>();
    for (int64_t i = offsets[L]; i < offsets[L + 1]; ++i) cp[perm[i]] = true;  // NOP rows
    offsets.pop_back();  // offsets[0..L]: the solved groups
    perm.resize(offsets[L]);
  } else {
    offsets = {0, B};
    perm.resize(B);
    for (int64_t i = 0; i < B; ++i) perm[i] = i;
  }
  const int64_t n = offsets.back();
  // private packed copies (the solve compacts them in place)
  at::Tensor rows = at::from_blob(perm.data(), {n}, at::TensorOptions().dtype(at::kLong));
  at::Tensor C = grouped ? cc.index_select(0, rows) : cc.clone();
  at::Tensor D = adjoint ? (grouped ? d->index_select(0, rows) : d->contiguous().clone()) : at::Tensor();
  at::Tensor Z = has_z0 ? (grouped ? z0->index_select(0, rows) : out_z.clone()) : at::zeros_like(C);
  at::Tensor M = adjoint ? W : W.transpose(1, 2);

  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "dynalay_fp_solve_cpu", [&] {
    solve_packed<scalar_t>(C, D, Z, M, offsets, perm, cfg, out_z.data_ptr<scalar_t>(), iters.data_ptr<int32_t>(),
                           res.data_ptr<scalar_t>(), conv.data_ptr<bool>());
  });
  return {out_z, iters, res, conv};
}

// Rows perm[from..to) of dst (row length H) get the same rows of src, or zeros when src is
// null: the NOP rows of the fused step (h passes through) and of its backward (g passes through;
// 0 for fixed_point).  Threads split the rows; each row is written once.
template <typename T>
void pass_rows(T* dst, const T* src, const std::vector<int64_t>& perm, int64_t from, int64_t to, int64_t H,
               bool* flag = nullptr) {
  at::parallel_for(from, to, std::max<int64_t>(1, 65536 / H), [&](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i) {
      const int64_t r = perm[i];
      if (src != nullptr) std::memcpy(dst + r * H, src + r * H, sizeof(T) * H);
      else std::memset(dst + r * H, 0, sizeof(T) * H);
      if (flag != nullptr) flag[r] = true;
    }
  });
}

}  // namespace

void run_work_list(int64_t n, int64_t threads, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  if (n == 1 || threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
#ifdef _OPENMP
  // Each item's GEMMs must run on its own thread: MKL would otherwise open a nested OpenMP team
  // per item (measured: 2 threads 23.5 ms -> 13.8 ms for B=4096, H=128, L=4).  Restored below.
  const int prev_levels = omp_get_max_active_levels();
  omp_set_max_active_levels(1);
  std::exception_ptr error;
  std::atomic<int64_t> next{0};  // work-list cursor (scheduling only: results do not depend on it)
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(threads, n)))
  {
    // OpenMP workers do not inherit the caller's dispatch state: run the items' ATen calls
    // below autograd, as the op itself is (its inputs may require grad)
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = next++; i < n; i = next++) {
      try {
        fn(i);
      } catch (...) {  // an exception must not leave an OpenMP region: keep the first, rethrow below
#pragma omp critical(dynalay_work_list_error)
        if (!error) error = std::current_exception();
        next = n;
      }
    }
  }
  omp_set_max_active_levels(prev_levels);
  if (error) std::rethrow_exception(error);
#else
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = i0; i < i1; ++i) fn(i);
  });
#endif
}

bool cpu_has_avx2_fma() {
#ifdef DYNALAY_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

double row_dot(const float* a, const float* b, int64_t n) { return dot<float>(a, b, n); }
double row_dot(const double* a, const double* b, int64_t n) { return dot<double>(a, b, n); }

namespace {
template <typename T>
void rows_times_wt_impl(int64_t n, int64_t K, int64_t H, const T* X, const T* W, T* out) {
  if (n < 1 || K < 1) return;
  if (kDirectMkl) {  // column-major: out^T (K, n) = W (K, H) X^T
    MklSerialInRegion serial;
    const char ta = 'T', tb = 'N';
    const T one = 1, zero = 0;
    mkl_gemm(&ta, &tb, &K, &n, &H, &one, W, &H, X, &H, &zero, out, &K);
    return;
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < K; ++k) out[i * K + k] = static_cast<T>(dot<T>(X + i * H, W + k * H, H));
}
// x = f(x) elementwise: through VML when `vml` (one vectorised call), else element by element.
template <typename T, typename Vml, typename F>
void map_inplace(bool vml, Vml vml_fn, F f, int64_t n, T* x) {
  if (vml) return vml_fn(n, x);
  for (int64_t i = 0; i < n; ++i) x[i] = f(x[i]);
}
}  // namespace

void rows_times_wt(int64_t n, int64_t K, int64_t H, const float* X, const float* W, float* out) {
  rows_times_wt_impl(n, K, H, X, W, out);
}
void rows_times_wt(int64_t n, int64_t K, int64_t H, const double* X, const double* W, double* out) {
  rows_times_wt_impl(n, K, H, X, W, out);
}
void tanh_inplace(int64_t n, float* x) {
  map_inplace(kDirectMkl, [](int64_t m, float* y) { mkl_tanh(m, y); }, [](float v) { return std::tanh(v); }, n, x);
}
void tanh_inplace(int64_t n, double* x) {
  map_inplace(kDirectMkl, [](int64_t m, double* y) { mkl_tanh(m, y); }, [](double v) { return std::tanh(v); }, n, x);
}
void exp_inplace(int64_t n, float* x) {
  map_inplace(kVmlExp, [](int64_t m, float* y) { mkl_exp(m, y); }, [](float v) { return std::exp(v); }, n, x);
}
void exp_inplace(int64_t n, double* x) {
  map_inplace(kVmlExp, [](int64_t m, double* y) { mkl_exp(m, y); }, [](double v) { return std::exp(v); }, n, x);
}

// One DynaLay step, fused: group once, inj = h U[l]^T + b[l] straight into the packed
// constant term, solve every group, copy the NOP rows of h.  h_new is never zero-filled:
// every row is written exactly once (by its block or by the NOP copy).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dynamic_step_blocked(
    const at::Tensor& h, const at::Tensor& actions, const at::Tensor& U, const at::Tensor& W, const at::Tensor& b,
    double tol, int64_t max_iter, c10::string_view solver, double damping, int64_t anderson_m, double anderson_lam,
    double eps, int64_t min_blocks, bool w_finite) {
  TORCH_CHECK(h.dim() == 2, "dynalay: h must be (B, H)");
  const int64_t B = h.size(0), H = h.size(1), L = U.size(0);
  TORCH_CHECK(U.dim() == 3 && U.size(1) == H && U.size(2) == H, "dynalay: U must be (L, H, H)");
  TORCH_CHECK(W.dim() == 3 && W.size(0) == L && W.size(1) == H && W.size(2) == H, "dynalay: W must be (L, H, H)");
  TORCH_CHECK(b.dim() == 2 && b.size(0) == L && b.size(1) == H, "dynalay: b must be (L, H)");
  TORCH_CHECK(h.scalar_type() == U.scalar_type() && h.scalar_type() == W.scalar_type() &&
                  h.scalar_type() == b.scalar_type(), "dynalay: h, U, W, b dtypes differ");
  TORCH_CHECK(actions.dim() == 1 && actions.size(0) == B && actions.scalar_type() == at::kLong,
              "dynalay: actions must be (B,) int64");
  TORCH_CHECK(solver == "picard" || solver == "anderson", "dynalay: unknown solver");
  Cfg cfg{false, tol, max_iter, solver == "anderson", damping, anderson_m, anderson_lam, eps, w_finite, min_blocks};
  at::Tensor hc = h.contiguous();
  std::vector<int64_t> offsets, perm;
  group_rows(actions, L, offsets, perm);
  at::Tensor out = at::empty_like(hc);
  at::Tensor iters = at::zeros({B}, h.options().dtype(at::kInt));
  at::Tensor res = at::zeros({B}, h.options());
  at::Tensor conv = at::zeros({B}, h.options().dtype(at::kBool));
  const int64_t n = offsets[L];
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "dynalay_dynamic_step_cpu", [&] {
    using T = scalar_t;
    const T* hp = hc.data_ptr<T>();
    T* op = out.data_ptr<T>();
    bool* cp = conv.data_ptr<bool>();
    pass_rows(op, hp, perm, n, B, H, cp);  // NOP rows: pass through, converged, no work
    if (n == 0) return;
    offsets.pop_back();
    perm.resize(n);
    bool identity = n == B;  // every row on one layer, in order (the DynaLay loop's usual case): no gather
    for (int64_t i = 0; identity && i < n; ++i) identity = perm[i] == i;
    at::Tensor X = identity ? hc : hc.index_select(0, at::from_blob(perm.data(), {n}, at::TensorOptions().dtype(at::kLong)));
    at::Tensor C = at::empty_like(X);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t g0 = offsets[l], gn = offsets[l + 1] - offsets[l];
      if (gn == 0) continue;
      // inj = b[l] + X U[l]^T: the bias in every row, then the GEMM straight to MKL (as the
      // solve's iterations: no dispatcher call, no tensor views per group)
      T* cp_l = C.data_ptr<T>() + g0 * H;
      const T* bp = b.data_ptr<T>() + l * b.stride(0);
      const int64_t bs = b.stride(1);
      for (int64_t j = 0; j < H; ++j) cp_l[j] = bp[j * bs];
      for (int64_t r = 1; r < gn; ++r) std::memcpy(cp_l + r * H, cp_l, sizeof(T) * H);
      const T* ul = U.data_ptr<T>() + l * U.stride(0);  // U[l]^T: strides swapped
      if (!direct_gemm_acc<T>(gn, H, cp_l, X.data_ptr<T>() + g0 * H, ul, U.stride(2), U.stride(1))) {
        at::Tensor Cl = C.narrow(0, g0, gn);
        at::addmm_out(Cl, b[l], X.narrow(0, g0, gn), U[l].t());
      }
    }
    at::Tensor Z = at::zeros_like(C);
    solve_packed<T>(C, at::Tensor(), Z, W.transpose(1, 2), offsets, perm, cfg, op, iters.data_ptr<int32_t>(),
                    res.data_ptr<T>(), cp);
  });
  return {out, iters, res, conv};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dynamic_step_cpu(
    const at::Tensor& h, const at::Tensor& actions, const at::Tensor& U, const at::Tensor& W, const at::Tensor& b,
    double tol, int64_t max_iter, c10::string_view solver, double damping, int64_t anderson_m, double anderson_lam,
    double eps) {
  return dynamic_step_blocked(h, actions, U, W, b, tol, max_iter, solver, damping, anderson_m, anderson_lam, eps, 4,
                              all_finite(W));
}

// The implicit (IFT) backward in one call: with d = 1 - z*^2, solve u = d * (g + u W[l]) for
// every row with a layer (same freeze rule as the forward), then every reduction the autograd
// formula needs, on the packed rows and per group (no atomics, fixed order):
//   fixed_point  (h undefined): dx = u (0 on NOP rows),           dW[l] = u_l^T z_l
//   dynamic_step (h, U given):  dx = u U[l] (g on NOP rows),      dW[l] = u_l^T z_l,
//                               dU[l] = u_l^T h_l,  db[l] = sum of u_l.
// Outputs not asked for are empty.  iters/res/conv: the adjoint solve's per-row statistics
// (NOP rows: 0, 0, true).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> implicit_backward_cpu(
    const at::Tensor& z, const at::Tensor& g, const at::Tensor& W, const c10::optional<at::Tensor>& actions,
    const c10::optional<at::Tensor>& h, const c10::optional<at::Tensor>& U, bool want_x, bool want_W, bool want_U,
    bool want_b, double tol, int64_t max_iter, c10::string_view solver, double damping, int64_t anderson_m,
    double anderson_lam, double eps) {
  TORCH_CHECK(z.dim() == 2 && g.sizes() == z.sizes(), "dynalay: z and g must be (B, H)");
  const int64_t B = z.size(0), H = z.size(1), L = W.size(0);
  TORCH_CHECK(W.dim() == 3 && W.size(1) == H && W.size(2) == H, "dynalay: W must be (L, H, H)");
  TORCH_CHECK(z.scalar_type() == g.scalar_type() && z.scalar_type() == W.scalar_type(), "dynalay: z, g, W dtypes differ");
  TORCH_CHECK(solver == "picard" || solver == "anderson", "dynalay: unknown solver");
  const bool grouped = actions.has_value() && actions->defined();
  const bool step = h.has_value() && h->defined();
  TORCH_CHECK(grouped || L == 1, "dynalay: W with several layers needs actions");
  TORCH_CHECK(!step || (grouped && U.has_value() && U->defined() && h->sizes() == z.sizes() && U->size(0) == L &&
                        U->size(1) == H && U->size(2) == H && h->scalar_type() == z.scalar_type() &&
                        U->scalar_type() == z.scalar_type()),
              "dynalay: the dynamic_step backward needs actions, h (B, H) and U (L, H, H) of z's dtype");
  Cfg cfg{true, tol, max_iter, solver == "anderson", damping, anderson_m, anderson_lam, eps, all_finite(W)};
  std::vector<int64_t> offsets, perm;
  if (grouped) {
    TORCH_CHECK(actions->dim() == 1 && actions->size(0) == B && actions->scalar_type() == at::kLong,
                "dynalay: actions must be (B,) int64");
    group_rows(*actions, L, offsets, perm);
  } else {
    offsets = {0, B, B};
    perm.resize(B);
    for (int64_t i = 0; i < B; ++i) perm[i] = i;
  }
  const int64_t n = offsets[L];
  at::Tensor gc = g.contiguous();
  at::Tensor iters = at::zeros({B}, z.options().dtype(at::kInt));
  at::Tensor res = at::zeros({B}, z.options());
  at::Tensor conv = at::ones({B}, z.options().dtype(at::kBool));
  const auto none = [&] { return at::empty({0}, z.options()); };  // an output not asked for (outputs never alias)
  at::Tensor dx = want_x ? at::empty({B, H}, z.options()) : none();
  at::Tensor dW = want_W ? at::zeros({L, H, H}, z.options()) : none();
  at::Tensor dU = want_U ? at::zeros({L, H, H}, z.options()) : none();
  at::Tensor db = want_b ? at::zeros({L, H}, z.options()) : none();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "dynalay_implicit_backward_cpu", [&] {
    using T = scalar_t;
    if (want_x) {  // NOP rows: dynamic_step passes g through (h_new = h), fixed_point gives 0
      const T* gp = gc.data_ptr<T>();
      T* xp = dx.data_ptr<T>();
      pass_rows(xp, step ? gp : nullptr, perm, n, B, H);
    }
    if (n == 0) return;
    std::vector<int64_t> off(offsets.begin(), offsets.begin() + L + 1);
    std::vector<int64_t> rows_v(perm.begin(), perm.begin() + n);
    at::Tensor rows = at::from_blob(rows_v.data(), {n}, at::TensorOptions().dtype(at::kLong));
    at::Tensor Zp = grouped ? z.index_select(0, rows) : z.contiguous();
    at::Tensor C = grouped ? gc.index_select(0, rows) : gc.clone();
    at::Tensor D = at::empty_like(Zp);
    {
      const T* zp = Zp.data_ptr<T>();
      T* dp = D.data_ptr<T>();
      at::parallel_for(0, n * H, 16384, [&](int64_t a, int64_t e) {
        for (int64_t i = a; i < e; ++i) dp[i] = T(1) - zp[i] * zp[i];
      });
    }
    // the packed solve writes its results in packed order (ids = 0..n-1), unpacked below
    at::Tensor u = at::empty_like(Zp);
    at::Tensor it_p = at::zeros({n}, iters.options());
    at::Tensor res_p = at::zeros({n}, res.options());
    at::Tensor conv_p = at::zeros({n}, conv.options());
    std::vector<int64_t> ids(n);
    for (int64_t i = 0; i < n; ++i) ids[i] = i;
    solve_packed<T>(C, D, at::zeros_like(C), W, off, ids, cfg, u.data_ptr<T>(), it_p.data_ptr<int32_t>(),
                    res_p.data_ptr<T>(), conv_p.data_ptr<bool>());
    if (grouped) {
      iters.index_copy_(0, rows, it_p);
      res.index_copy_(0, rows, res_p);
      conv.index_copy_(0, rows, conv_p);
    } else {
      iters.copy_(it_p);
      res.copy_(res_p);
      conv.copy_(conv_p);
    }
    at::Tensor Xp = step && want_U ? h->index_select(0, rows) : at::Tensor();
    at::Tensor dxp = (want_x && step) ? at::empty_like(u) : at::Tensor();
    for (int64_t l = 0; l < L; ++l) {
      const int64_t g0 = off[l], gn = off[l + 1] - off[l];
      if (gn == 0) continue;
      at::Tensor ul = u.narrow(0, g0, gn);
      if (want_W) {
        at::Tensor o = dW[l];
        at::mm_out(o, ul.t(), Zp.narrow(0, g0, gn));
      }
      if (want_U) {
        at::Tensor o = dU[l];
        at::mm_out(o, ul.t(), Xp.narrow(0, g0, gn));
      }
      if (want_b) {
        at::Tensor o = db[l];
        at::sum_out(o, ul, {0});
      }
      if (want_x && step) {
        at::Tensor dl = dxp.narrow(0, g0, gn);
        at::mm_out(dl, ul, (*U)[l]);
      }
    }
    if (want_x) {
      const at::Tensor& src = step ? dxp : u;
      if (grouped) dx.index_copy_(0, rows, src);
      else dx.copy_(src);
    }
  });
  return {dx, dW, dU, db, iters, res, conv};
}

// Index of the first tensor of `ts` holding a NaN or an Inf, or -1: one vectorised pass per
// tensor (x - x is 0 for finite x and NaN otherwise; the sum of a chunk is NaN iff the chunk
// holds a non-finite value), chunks in parallel.  Replaces isfinite(t).all(), which costs ~30x
// more on CPU.
#ifdef DYNALAY_X86
__attribute__((target("avx2"))) bool chunk_non_finite_avx2(const float* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256 v0 = _mm256_loadu_ps(p + i), v1 = _mm256_loadu_ps(p + i + 8);
    const __m256 v2 = _mm256_loadu_ps(p + i + 16), v3 = _mm256_loadu_ps(p + i + 24);
    a0 = _mm256_add_ps(a0, _mm256_sub_ps(v0, v0));
    a1 = _mm256_add_ps(a1, _mm256_sub_ps(v1, v1));
    a2 = _mm256_add_ps(a2, _mm256_sub_ps(v2, v2));
    a3 = _mm256_add_ps(a3, _mm256_sub_ps(v3, v3));
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float tot = 0.f;
  for (int q = 0; q < 8; ++q) tot += t[q];
  for (; i < n; ++i) tot += p[i] - p[i];
  return tot != tot;
}
#endif

template <typename scalar_t>
bool chunk_non_finite(const scalar_t* p, int64_t n) {
#ifdef DYNALAY_X86
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (kHasAVX2) return chunk_non_finite_avx2(p, n);
  }
#endif
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  acc_t acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int q = 0; q < 16; ++q) {
      const acc_t v = static_cast<acc_t>(p[i + q]);
      acc[q] += v - v;
    }
  acc_t tot = 0;
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(p[i]);
    tot += v - v;
  }
  for (int q = 0; q < 16; ++q) tot += acc[q];
  return tot != tot;
}

int64_t first_non_finite_cpu(at::TensorList ts) {
  for (size_t k = 0; k < ts.size(); ++k) {
    // a permuted dense tensor (a transpose) is scanned in place: the order of the elements does not
    // matter here, and copying it first cost 17x the scan (a transposed (4, 256, 256) W)
    const at::Tensor t = ts[k].is_non_overlapping_and_dense() ? ts[k] : ts[k].contiguous();
    const int64_t n = t.numel();
    if (n == 0 || !at::isFloatingType(t.scalar_type())) continue;
    std::atomic<bool> bad{false};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "dynalay_first_non_finite", [&] {
      const scalar_t* p = t.const_data_ptr<scalar_t>();
      auto scan = [&](int64_t a, int64_t e) {
        constexpr int64_t kChunk = 16384;
        for (int64_t c = a; c < e && !bad.load(std::memory_order_relaxed); c += kChunk)
          if (chunk_non_finite(p + c, std::min(e, c + kChunk) - c)) bad.store(true, std::memory_order_relaxed);
      };
      if (n < 262144) scan(0, n);  // a parallel region costs more than it saves below ~1 MiB
      else at::parallel_for(0, n, 131072, scan);
    });
    if (bad.load()) return static_cast<int64_t>(k);
  }
  return -1;
}

}  // namespace

bool all_finite(const at::Tensor& t) { return first_non_finite_cpu({t}) < 0; }

namespace {

at::Tensor grouped_linear_cpu(const at::Tensor& x, const at::Tensor& U, const c10::optional<at::Tensor>& b,
                              const at::Tensor& actions, bool transpose) {
  TORCH_CHECK(x.dim() == 2 && U.dim() == 3, "dynalay: grouped_linear expects x (B,K), U (L,N,K)");
  const int64_t L = U.size(0);
  const int64_t N = transpose ? U.size(2) : U.size(1);
  at::Tensor y = at::zeros({x.size(0), N}, x.options());
  std::vector<int64_t> offsets, perm;
  group_rows(actions, L, offsets, perm);
  for (int64_t layer = 0; layer < L; ++layer) {
    const int64_t n = offsets[layer + 1] - offsets[layer];
    if (n == 0) continue;
    at::Tensor rows = at::from_blob(perm.data() + offsets[layer], {n}, at::TensorOptions().dtype(at::kLong)).clone();
    at::Tensor xr = x.index_select(0, rows);
    at::Tensor Ul = transpose ? U[layer] : U[layer].t();
    at::Tensor yr = (b.has_value() && b->defined()) ? at::addmm((*b)[layer], xr, Ul) : at::mm(xr, Ul);
    y.index_copy_(0, rows, yr);
  }
  return y;
}

at::Tensor grouped_wgrad_cpu(const at::Tensor& u, const at::Tensor& x, const c10::optional<at::Tensor>& actions,
                             int64_t num_layers) {
  TORCH_CHECK(u.dim() == 2 && x.dim() == 2 && u.size(0) == x.size(0), "dynalay: grouped_wgrad expects u (B,N), x (B,K)");
  if (!actions.has_value() || !actions->defined()) return at::mm(u.t(), x).unsqueeze(0);
  at::Tensor out = at::zeros({num_layers, u.size(1), x.size(1)}, u.options());
  std::vector<int64_t> offsets, perm;
  group_rows(*actions, num_layers, offsets, perm);
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    const int64_t n = offsets[layer + 1] - offsets[layer];
    if (n == 0) continue;
    at::Tensor rows = at::from_blob(perm.data() + offsets[layer], {n}, at::TensorOptions().dtype(at::kLong)).clone();
    out[layer].copy_(at::mm(u.index_select(0, rows).t(), x.index_select(0, rows)));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynalay_C, CPU, m) {
  m.impl("fp_solve", &fp_solve_cpu);
  m.impl("dynamic_step", &dynamic_step_cpu);
  m.impl("first_non_finite", &first_non_finite_cpu);
  m.impl("implicit_backward", &implicit_backward_cpu);
  m.impl("grouped_linear", &grouped_linear_cpu);
  m.impl("grouped_wgrad", &grouped_wgrad_cpu);
}

}  // namespace dynalay
