// dynalay CUDA kernels: the extern "C" launcher API (host-includable, no torch headers).
//
// This header is included by the torch glue (csrc/cuda/ops_cuda.cpp, compiled by the host
// C++ compiler) and by the kernel files (kernels/*.cu, compiled by nvcc).  The part below
// `#if defined(__CUDACC__)` holds device helpers shared by the .cu files; the host compiler
// never sees it.
//
// Conventions (see kernels/README.md):
//  * every launcher takes raw device pointers and sizes (in a params struct), a cudaStream_t,
//    and returns the cudaError_t of its launch (cudaGetLastError after the launch); it never
//    synchronizes and never allocates;
//  * "storage" arrays (c, M, z0, z, x, U, b, y) are float32, float16 or bfloat16 according to
//    the launcher's suffix (_f32, _f16, _bf16); all arithmetic is float32;
//  * row indices and row*H offsets are int64;
//  * grouped ops take the routing of dynalay/ops/dispatch.py route_impl: `perm` (B,) int64,
//    `offsets` (L+2,) int64 (group l is perm[offsets[l] : offsets[l+1]], NOP rows last), and for
//    the tile-based ops `tile_layer` / `tile_row_start` (num_tiles,) int32 (-1: spare tile).
//    perm == NULL means the identity (and then offsets may be NULL: one group of all B rows).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// ---------------------------------------------------------------------------------------------
// Grouped fixed-point solve (Picard with damping), per row i of layer l = a_i:
//   forward (adjoint == 0): f(z) = tanh(z M[l] + c_i)          with M = W^T (pass W^T contiguous,
//                           or W itself with m_is_w = 1 where dynalay_fp_solve_takes_w(H) says so)
//   adjoint (adjoint == 1): f(u) = d_i * (c_i + u M[l])         with M = W
//                           (d_is_z = 1: the d array holds z* and d_i = 1 - z*_i^2, rounded as
//                           torch's 1 - z*z: product, then difference)
// z <- z + damping (f - z) (exactly f when exact_step), frozen once
// ||f - z||_2 / (||f||_2 + eps) < tol; see dynalay/backends/torch_ref.py.
// ---------------------------------------------------------------------------------------------
typedef struct DynalayFpSolveParams {
  const void* c;                  // (B, H) storage type
  const void* M;                  // (L, H, H) storage type, M[l][k][n]
  const float* d;                 // (B, H) float32, adjoint only (else NULL); z* when d_is_z
  const void* z0;                 // (B, H) storage type or NULL (start from 0)
  void* z;                        // (B, H) storage type, out (rows of the tiles only)
  int32_t* iters;                 // (B,) out
  float* residual;                // (B,) out
  uint8_t* converged;             // (B,) out (0/1, torch.bool)
  const int64_t* perm;            // (B,) or NULL (identity, non-grouped: tile t = rows [t*BM, t*BM+BM))
  const int32_t* tile_layer;      // (num_tiles,) or NULL (non-grouped)
  const int32_t* tile_row_start;  // (num_tiles,) or NULL
  const int64_t* offsets;         // (L+2,) or NULL
  int64_t B;
  int32_t H;                      // 1 .. 1024
  int32_t L;
  int32_t num_tiles;              // grouped: len(tile_layer) = cdiv(B, block_m) + L; ignored otherwise
  int32_t block_m;                // must equal dynalay_fp_solve_block_m(H)
  int32_t max_iter;               // >= 0
  int32_t exact_step;             // 1 when damping == 1 (z <- f exactly)
  int32_t adjoint;                // 0: forward map, 1: adjoint map (needs d)
  int32_t d_is_z;                 // adjoint: d holds z*, the kernel uses 1 - z*^2
  int32_t m_is_w;                 // M holds W[l] (not W[l]^T): only where dynalay_fp_solve_takes_w(H)
  float damping;
  double tol;
  double eps;
} DynalayFpSolveParams;

// Rows per tile (BM) the solve kernels use for this H (route with this block_m); -1 if H is
// out of range [1, 1024].
int dynalay_fp_solve_block_m(int32_t H);

// 1 when the solve for this H loads M into shared memory itself and so accepts m_is_w = 1 (the
// forward then needs no transposed copy of W), else 0.
int dynalay_fp_solve_takes_w(int32_t H);

cudaError_t dynalay_fp_solve_f32(const DynalayFpSolveParams* p, cudaStream_t stream);
cudaError_t dynalay_fp_solve_f16(const DynalayFpSolveParams* p, cudaStream_t stream);
cudaError_t dynalay_fp_solve_bf16(const DynalayFpSolveParams* p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Grouped linear map: y_i = x_i U[a_i]^T + b[a_i] (transpose == 0, U (L, N, K)) or
// y_i = x_i U[a_i] (+ b[a_i]) (transpose == 1, U (L, K, N)).  Only rows of the tiles are
// written (the caller zero-fills y for NOP rows).  fp32 accumulation, fixed order.
// ---------------------------------------------------------------------------------------------
typedef struct DynalayGroupedLinearParams {
  const void* x;                  // (B, K) storage type
  const void* U;                  // (L, N, K) or (L, K, N) storage type
  const void* b;                  // (L, N) storage type or NULL
  void* y;                        // (B, N) storage type, out
  const int64_t* perm;            // (B,)
  const int32_t* tile_layer;      // (num_tiles,)
  const int32_t* tile_row_start;  // (num_tiles,)
  const int64_t* offsets;         // (L+2,)
  int64_t B;
  int32_t K;
  int32_t N;
  int32_t L;
  int32_t num_tiles;
  int32_t block_m;                // must equal dynalay_grouped_linear_block_m()
  int32_t transpose;
} DynalayGroupedLinearParams;

int dynalay_grouped_linear_block_m(void);

cudaError_t dynalay_grouped_linear_f32(const DynalayGroupedLinearParams* p, cudaStream_t stream);
cudaError_t dynalay_grouped_linear_f16(const DynalayGroupedLinearParams* p, cudaStream_t stream);
cudaError_t dynalay_grouped_linear_bf16(const DynalayGroupedLinearParams* p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Grouped weight gradient: out[l] = sum over the rows i of group l (in perm order) of
// u_i^T x_i  -> (L, N, K) float32.  No atomics: each group is cut into `splits` contiguous
// parts; each (layer, part, 64x64 tile) block sums its rows in order into `workspace`
// (L*splits*N*K floats) and a second kernel adds the parts in order.  With splits == 1 the
// blocks write `out` directly (workspace may be NULL).  Every element of `out` is written.
// ---------------------------------------------------------------------------------------------
typedef struct DynalayGroupedWgradParams {
  const float* u;                 // (B, N)
  const float* x;                 // (B, K)
  float* out;                     // (L, N, K)
  float* workspace;               // (L * splits * N * K) when splits > 1
  const int64_t* perm;            // (B,) or NULL (identity; then offsets NULL and L == 1)
  const int64_t* offsets;         // (L+2,) or NULL
  int64_t B;
  int32_t N;
  int32_t K;
  int32_t L;
  int32_t splits;                 // >= 1, from dynalay_grouped_wgrad_splits
} DynalayGroupedWgradParams;

// How many parts to cut each group into on the current device (>= 1).
int dynalay_grouped_wgrad_splits(int64_t B, int32_t N, int32_t K, int32_t L);

cudaError_t dynalay_grouped_wgrad_f32(const DynalayGroupedWgradParams* p, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

// ---------------------------------------------------------------------------------------------
// Device helpers shared by the kernel files (nvcc only).
// ---------------------------------------------------------------------------------------------
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace dynalay {

// Storage types.  16-bit values are handled as raw bits (unsigned short) with explicit
// conversion intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
struct F32 {
  using S = float;
  static __device__ __forceinline__ float to_float(S v) { return v; }
  static __device__ __forceinline__ S from_float(float f) { return f; }
};
struct F16 {
  using S = unsigned short;
  static __device__ __forceinline__ float to_float(S v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ S from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};
struct BF16 {
  using S = unsigned short;
  static __device__ __forceinline__ float to_float(S v) { return __uint_as_float(static_cast<unsigned>(v) << 16); }
  static __device__ __forceinline__ S from_float(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

// Read-only (non-coherent cache) load converted to float.
template <class Tag>
__device__ __forceinline__ float ldg_f(const typename Tag::S* p) {
  return Tag::to_float(__ldg(p));
}

// tanh that stays accurate (<= 2 ulp) under --use_fast_math, which would otherwise turn tanhf
// into tanh.approx.f32 (relative error ~5e-4).  This is the sequence libdevice's tanhf uses
// without fast math, written with explicit-rounding intrinsics and PTX so no flag changes it.
__device__ __forceinline__ float ex2_approx_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float rcp_approx_ftz(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float tanh_accurate(float x) {
  const float ax = fabsf(x);
  // |x| >= 0.6: 1 - 2 / (exp(2|x|) + 1), saturating to 1 for |x| >= 9.0109
  const float e = ex2_approx_ftz(__fmul_rn(ax, __int_as_float(0x4038AA3B)));  // 2 / ln 2
  float big = __fmaf_rn(rcp_approx_ftz(__fadd_rn(e, 1.0f)), -2.0f, 1.0f);
  big = (ax >= __int_as_float(0x41102CB4)) ? 1.0f : big;
  big = copysignf(big, x);
  // |x| < 0.6: odd minimax polynomial x + x^3 P(x^2)
  const float x2 = __fmul_rn(x, x);
  float q = __fmaf_rn(__int_as_float(0x3C80F082), x2, __int_as_float(0xBD563CAE));
  q = __fmaf_rn(q, x2, __int_as_float(0x3E085941));
  q = __fmaf_rn(q, x2, __int_as_float(0xBEAAA9ED));
  q = __fmul_rn(q, x2);
  const float small = __fmaf_rn(q, x, x);
  return (ax >= __int_as_float(0x3F19999A)) ? big : small;  // 0.6
}

// a / b for a >= 0 (or NaN/inf) and b > 0, in double, without the division subroutine that
// ptxas would call (and spill around): reciprocal estimate, two Newton steps, one correction.
// Within an ulp or so of a / b; 0 for a == 0 (also when b is below the ftz range).
__device__ __forceinline__ double div_nonneg(double a, double b) {
  if (a == 0.0) return 0.0;
  if (isinf(a)) return a;
  double y;
  asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(y) : "d"(b));
  double e = fma(-b, y, 1.0);
  y = fma(y, e, y);
  e = fma(-b, y, 1.0);
  y = fma(y, e, y);
  const double q = a * y;
  return fma(fma(-b, q, a), y, q);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace dynalay
#endif  // __CUDACC__
