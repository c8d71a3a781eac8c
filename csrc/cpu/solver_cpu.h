// Entry points of csrc/cpu/solver_cpu.cpp used by the other CPU kernels (csrc/cpu/model_cpu.cpp).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <tuple>

#if defined(__x86_64__) || defined(_M_X64)
#define DYNALAY_X86 1
#endif

namespace dynalay {

// Whether the CPU has AVX2 and FMA: the AVX2 builds of the row loops are chosen at run time
// (the extension itself targets baseline x86-64).
bool cpu_has_avx2_fma();

// dynalay_C::dynamic_step with an explicit blocking: groups are split into at least
// `min_blocks` blocks when they are big enough (the op uses 4, for its threads; a caller that
// runs it on one thread of its own parallel region passes 1).
// `w_finite`: W holds no NaN/Inf (all_finite(W)); only then may the solve from z0 = 0 skip its
// first GEMM (W 0 is NaN where a row of W is not finite, as the reference computes it).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dynamic_step_blocked(
    const at::Tensor& h, const at::Tensor& actions, const at::Tensor& U, const at::Tensor& W, const at::Tensor& b,
    double tol, int64_t max_iter, c10::string_view solver, double damping, int64_t anderson_m, double anderson_lam,
    double eps, int64_t min_blocks, bool w_finite);

// Whether a floating tensor holds no NaN and no Inf (one vectorised pass; dynalay_C::first_non_finite).
bool all_finite(const at::Tensor& t);

// fn(i) for every i in [0, n): threads (up to `threads`) take items from one work list, each item
// runs whole on one thread with nested parallelism off (MKL and ATen stay serial inside it), the
// first exception is rethrown.  Serial when n == 1, threads == 1 or already in a parallel region.
void run_work_list(int64_t n, int64_t threads, const std::function<void(int64_t)>& fn);

// Dot product of two rows, accumulated in double (float: AVX2/FMA lanes when the CPU has them).
double row_dot(const float* a, const float* b, int64_t n);
double row_dot(const double* a, const double* b, int64_t n);

// out (n, K) = X (n, H) W^T for row-major X and W (K, H): one MKL GEMM when the wheel exports
// it (solver_cpu.cpp), else dot products.
void rows_times_wt(int64_t n, int64_t K, int64_t H, const float* X, const float* W, float* out);
void rows_times_wt(int64_t n, int64_t K, int64_t H, const double* X, const double* W, double* out);
// x = tanh(x) elementwise (MKL VML, ATen's accuracy mode, when exported; else std::tanh).
void tanh_inplace(int64_t n, float* x);
void tanh_inplace(int64_t n, double* x);
// x = exp(x) elementwise (MKL VML in the same mode, when exported; else std::exp).
void exp_inplace(int64_t n, float* x);
void exp_inplace(int64_t n, double* x);

}  // namespace dynalay
