// Grouped fixed-point solve: one thread block per tile of BM rows of ONE layer.
//
// Semantics: dynalay/backends/torch_ref.py (fp_solve, solver="picard").  Per row:
//   z = z0 (or 0); for k = 1..max_iter: f = f(z); r = ||f - z|| / (||f|| + eps);
//   iters = k; residual = r; z = z + damping (f - z) (z = f when exact_step);
//   if r < tol: converged, freeze the row.
//
// Design (see kernels/README.md):
//  * the iterate z of the tile lives in shared memory as float32 (BM x HP, HP = H rounded up
//    to 4 so that a thread reads 4 consecutive k of a row as one float4);
//  * threads form a TX x TY grid: thread (tx, ty) owns columns n = tx + j*TX (j < CPT) of rows
//    r = ty + i*TY (i < RPT = BM/TY) and keeps p[r][n] = sum_k z[r][k] M[k][n] in registers;
//    M[k][n] is read coalesced across tx, from shared memory when it fits (MSMEM) or through
//    the read-only cache (L2) otherwise; z[r][k] is a shared-memory broadcast;
//  * per-row norms: each thread sums its columns (float), a warp reduces with shuffles, the
//    warps of a row meet in shared memory and are added in fixed order in double: every thread
//    owning a row computes the same residual bit for bit, so the freeze decision needs no
//    broadcast and each thread keeps the active flags of its rows in a register bitmask;
//  * two barriers per iteration; the loop ends when no row of the tile is active
//    (__syncthreads_or) or at max_iter.  No atomics, no host synchronization, fixed order:
//    deterministic.
#include "dynalay_kernels.cuh"

#include <cstdlib>
#include <string>

namespace dynalay {
namespace {

constexpr int kMaxH = 1024;
// Keep M in shared memory when it takes at most this much (more would cut occupancy).
constexpr size_t kMsmemMaxBytes = 72 * 1024;

// The tile this block solves: its layer and the positions [start, end) of its rows (in `perm`
// order when grouped; end may cut the tile short).  False for a spare tile of the grouped grid.
__device__ __forceinline__ bool tile_of_block(const DynalayFpSolveParams& p, int BM, int& layer, int64_t& start,
                                              int64_t& end) {
  if (p.tile_layer != nullptr) {
    layer = p.tile_layer[blockIdx.x];
    if (layer < 0) return false;
    start = p.tile_row_start[blockIdx.x];
    end = p.offsets[layer + 1];
  } else {
    layer = 0;
    start = static_cast<int64_t>(blockIdx.x) * BM;
    end = p.B;
  }
  return true;
}

// The adjoint's d at `off`: d itself, or 1 - z*^2 when d holds z* (product, then difference, each
// rounded: the bits of torch's `1 - z * z`, whatever contraction the compiler would do).
__device__ __forceinline__ float load_d(const DynalayFpSolveParams& p, int64_t off) {
  const float v = __ldg(p.d + off);
  return p.d_is_z ? __fsub_rn(1.0f, __fmul_rn(v, v)) : v;
}

// acc[j] += z[k..k+3] . m[0..3][j] for one row, in fixed k order.
template <int CPT>
__device__ __forceinline__ void fma_row4(float (&acc)[CPT], const float4 zv, const float (&m)[4][CPT]) {
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    acc[j] = fmaf(zv.x, m[0][j], acc[j]);
    acc[j] = fmaf(zv.y, m[1][j], acc[j]);
    acc[j] = fmaf(zv.z, m[2][j], acc[j]);
    acc[j] = fmaf(zv.w, m[3][j], acc[j]);
  }
}

template <class Tag, int BM, int TX, int TY, int CPT, bool MSMEM>
__global__ void __launch_bounds__(TX * TY) fp_solve_kernel(const DynalayFpSolveParams p) {
  using S = typename Tag::S;
  constexpr int NT = TX * TY;
  constexpr int RPT = BM / TY;
  constexpr int NWR = TX / 32;  // warps per row group
  static_assert(BM % TY == 0, "BM must be a multiple of TY");
  static_assert(TX % 32 == 0, "TX must be a multiple of the warp size");
  static_assert(RPT <= 32, "at most 32 rows per thread (bitmask)");

  __shared__ int64_t row_s[BM];
  __shared__ double red_s[2][NWR][BM];
  __shared__ int iters_s[BM];
  __shared__ float res_s[BM];
  extern __shared__ float4 dyn_smem[];

  const int H = p.H;
  const int HP = (H + 3) & ~3;
  float* z_s = reinterpret_cast<float*>(dyn_smem);
  S* M_s = reinterpret_cast<S*>(z_s + static_cast<size_t>(BM) * HP);

  const int tid = threadIdx.x;
  const int tx = tid % TX;
  const int ty = tid / TX;
  const int lane = tid & 31;
  const int wr = tx >> 5;

  int layer;
  int64_t start, end;
  if (!tile_of_block(p, BM, layer, start, end)) return;  // spare tile (block-uniform)
  if (tid < BM) {
    const int64_t pos = start + tid;
    row_s[tid] = pos < end ? (p.perm != nullptr ? p.perm[pos] : pos) : int64_t(-1);
    iters_s[tid] = 0;
    res_s[tid] = 0.0f;
  }
  const S* Mg = static_cast<const S*>(p.M) + static_cast<int64_t>(layer) * H * H;
  const S* cg = static_cast<const S*>(p.c);
  const S* z0g = static_cast<const S*>(p.z0);
  if (MSMEM) {
    const int HH = H * H;
    for (int e = tid; e < HP * H; e += NT) M_s[e] = e < HH ? __ldg(Mg + e) : S(0);
  }
  __syncthreads();
  for (int e = tid; e < BM * HP; e += NT) {
    const int r = e / HP;
    const int k = e - r * HP;
    const int64_t row = row_s[r];
    float v = 0.0f;
    if (z0g != nullptr && row >= 0 && k < H) v = ldg_f<Tag>(z0g + row * H + k);
    z_s[e] = v;
  }
  unsigned mask = 0;
#pragma unroll
  for (int i = 0; i < RPT; ++i)
    if (row_s[ty + i * TY] >= 0) mask |= 1u << i;

  const bool exact = p.exact_step != 0;
  const bool adj = p.adjoint != 0;  // block-uniform branch in the epilogue only
  const float damp = p.damping;
  int it = 0;
  int any = __syncthreads_or(mask != 0);
  while (any && it < p.max_iter) {
    ++it;
    // ---- p = z M (fp32, fixed k order) ----
    float acc[RPT][CPT];
#pragma unroll
    for (int i = 0; i < RPT; ++i)
#pragma unroll
      for (int j = 0; j < CPT; ++j) acc[i][j] = 0.0f;

#pragma unroll 2
    for (int k = 0; k < HP; k += 4) {
      float m[4][CPT];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
        for (int j = 0; j < CPT; ++j) {
          const int n = tx + j * TX;
          const int kq = k + kk;
          if (MSMEM) {
            m[kk][j] = n < H ? Tag::to_float(M_s[kq * H + n]) : 0.0f;
          } else {
            m[kk][j] = (n < H && kq < H) ? ldg_f<Tag>(Mg + static_cast<int64_t>(kq) * H + n) : 0.0f;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < RPT; ++i)
        fma_row4<CPT>(acc[i], *reinterpret_cast<const float4*>(z_s + (ty + i * TY) * HP + k), m);
    }

    // ---- f = map(p), partial norms of f - z and f ----
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      if (!((mask >> i) & 1u)) continue;  // uniform across the warp: a warp holds one row group
      const int r = ty + i * TY;
      const int64_t row = row_s[r];
      float sn = 0.0f, sd = 0.0f;
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int n = tx + j * TX;
        if (n < H) {
          const int64_t off = row * H + n;
          const float cv = ldg_f<Tag>(cg + off);
          float f;
          if (adj) {
            f = __fmul_rn(load_d(p, off), __fadd_rn(cv, acc[i][j]));
          } else {
            f = tanh_accurate(__fadd_rn(acc[i][j], cv));
          }
          const float g = f - z_s[r * HP + n];
          sn = fmaf(g, g, sn);
          sd = fmaf(f, f, sd);
          acc[i][j] = f;
        }
      }
      sn = warp_sum(sn);
      sd = warp_sum(sd);
      if (lane == 0) {
        red_s[0][wr][r] = static_cast<double>(sn);
        red_s[1][wr][r] = static_cast<double>(sd);
      }
    }
    __syncthreads();

    // ---- residual, step, freeze (every owner of a row reaches the same decision) ----
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      if (!((mask >> i) & 1u)) continue;
      const int r = ty + i * TY;
      double sn = 0.0, sd = 0.0;
#pragma unroll
      for (int w = 0; w < NWR; ++w) {
        sn += red_s[0][w][r];
        sd += red_s[1][w][r];
      }
      const double res = div_nonneg(sqrt(sn), sqrt(sd) + p.eps);
      if (tx == 0) {
        iters_s[r] = it;
        res_s[r] = static_cast<float>(res);
      }
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int n = tx + j * TX;
        if (n < H) {
          float* zp = z_s + r * HP + n;
          *zp = exact ? acc[i][j] : fmaf(damp, acc[i][j] - *zp, *zp);
        }
      }
      if (res < p.tol) mask &= ~(1u << i);
    }
    any = __syncthreads_or(mask != 0);
  }

  // ---- outputs (z_s is final: the last barrier above ordered every write) ----
  S* zg = static_cast<S*>(p.z);
  for (int e = tid; e < BM * H; e += NT) {
    const int r = e / H;
    const int n = e - r * H;
    const int64_t row = row_s[r];
    if (row >= 0) zg[row * H + n] = Tag::from_float(z_s[r * HP + n]);
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int r = ty + i * TY;
      const int64_t row = row_s[r];
      if (row >= 0) {
        p.iters[row] = iters_s[r];
        p.residual[row] = res_s[r];
        p.converged[row] = ((mask >> i) & 1u) ? 0 : 1;
      }
    }
  }
}

// ---- warp-per-rows kernel (H <= 128) ----------------------------------------------------------
// One block per tile of BM = RPT * WARPS rows of one layer; warp w owns rows [w*RPT, w*RPT+RPT) of
// the tile and solves them on its own: lane l owns the CPT contiguous columns [l*CPT, l*CPT+CPT)
// (H <= 32*CPT).  M (converted to float32, zero-padded to KP x 32*CPT) is loaded into shared memory
// once per block; a warp's iterate rows live in shared memory (read as float4 broadcasts in the
// k-loop).  A row's norms are reduced with an xor butterfly, so every lane holds the same sum bit
// for bit and reaches the same freeze decision: no shared-memory reduction and no block barrier
// inside the loop (only __syncwarp), and a warp whose rows have all converged stops computing.
// Same arithmetic order for every row of every tile: deterministic, no atomics.
template <class Tag, int CPT, int RPT, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) fp_solve_warp_kernel(const DynalayFpSolveParams p) {
  using S = typename Tag::S;
  constexpr int HC = 32 * CPT;
  constexpr int BM = RPT * WARPS;
  static_assert(CPT == 1 || CPT == 2 || CPT == 4, "CPT must be 1, 2 or 4");
  static_assert(RPT >= 1 && RPT <= 32, "at most 32 rows per warp (bitmask)");
  extern __shared__ float4 dyn_smem[];
  const int H = p.H;
  const int KP = (H + 3) & ~3;
  float* M_s = reinterpret_cast<float*>(dyn_smem);                // KP x HC
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  float* zw = M_s + static_cast<size_t>(KP) * HC + static_cast<size_t>(warp) * RPT * KP;  // RPT x KP

  int layer;
  int64_t start, end;
  if (!tile_of_block(p, BM, layer, start, end)) return;  // spare tile (block-uniform)
  const S* Mg = static_cast<const S*>(p.M) + static_cast<int64_t>(layer) * H * H;
  if (p.m_is_w) {
    // Mg is W[l] and M_s[k][n] = W[n][k].  Written directly, the transpose costs a 32-way bank
    // conflict per store (a column of M_s is one bank: HC is a multiple of 32).  Instead each
    // slab of 16 rows of W goes through a staging tile of pitch KP + 1 in the iterates' space
    // (not in use yet): global reads along k (coalesced), shared reads and writes at most 2-way.
    static_assert(BM >= 32, "the staging tile needs 16 (KP + 1) <= BM KP floats");
    float* stage = M_s + static_cast<size_t>(KP) * HC;
    const int P = KP + 1;
    for (int n0 = 0; n0 < HC; n0 += 16) {
      for (int e = tid; e < 16 * KP; e += WARPS * 32) {
        const int r = e / KP;
        const int k = e - r * KP;
        const int n = n0 + r;
        stage[r * P + k] = (k < H && n < H) ? ldg_f<Tag>(Mg + static_cast<int64_t>(n) * H + k) : 0.0f;
      }
      __syncthreads();
      for (int e = tid; e < 16 * KP; e += WARPS * 32) {
        const int k = e >> 4;
        const int r = e & 15;
        M_s[k * HC + n0 + r] = stage[r * P + k];
      }
      __syncthreads();  // the slab is read before the next one (or the iterates) overwrite it
    }
  } else {
    for (int e = tid; e < KP * HC; e += WARPS * 32) {
      const int k = e / HC;
      const int n = e - k * HC;
      M_s[e] = (k < H && n < H) ? ldg_f<Tag>(Mg + static_cast<int64_t>(k) * H + n) : 0.0f;
    }
  }
  int64_t rows[RPT];
  unsigned mask = 0;
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int64_t pos = start + warp * RPT + i;
    rows[i] = pos < end ? (p.perm != nullptr ? p.perm[pos] : pos) : int64_t(-1);
    if (rows[i] >= 0) mask |= 1u << i;
  }
  const S* z0g = static_cast<const S*>(p.z0);
#pragma unroll
  for (int i = 0; i < RPT; ++i)
    for (int k = lane; k < KP; k += 32)
      zw[i * KP + k] = (z0g != nullptr && rows[i] >= 0 && k < H) ? ldg_f<Tag>(z0g + rows[i] * H + k) : 0.0f;
  __syncthreads();  // M_s complete (the last block-wide barrier)

  const S* cg = static_cast<const S*>(p.c);
  const bool exact = p.exact_step != 0;
  const bool adj = p.adjoint != 0;
  const float damp = p.damping;
  int iters_r[RPT];
  float res_r[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    iters_r[i] = 0;
    res_r[i] = 0.0f;
  }
  int it = 0;
  while (mask != 0 && it < p.max_iter) {  // warp-uniform
    ++it;
    float acc[RPT][CPT];
#pragma unroll
    for (int i = 0; i < RPT; ++i)
#pragma unroll
      for (int j = 0; j < CPT; ++j) acc[i][j] = 0.0f;
    if (it > 1 || z0g != nullptr) {  // from z0 = 0 the first product is exactly 0: skip it
#pragma unroll 2
    for (int k = 0; k < KP; k += 4) {
      float m[4][CPT];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const float* mp = M_s + (k + kk) * HC + lane * CPT;
        if constexpr (CPT == 4) {
          const float4 v = *reinterpret_cast<const float4*>(mp);
          m[kk][0] = v.x;
          m[kk][1] = v.y;
          m[kk][2] = v.z;
          m[kk][3] = v.w;
        } else if constexpr (CPT == 2) {
          const float2 v = *reinterpret_cast<const float2*>(mp);
          m[kk][0] = v.x;
          m[kk][1] = v.y;
        } else {
          m[kk][0] = mp[0];
        }
      }
#pragma unroll
      for (int i = 0; i < RPT; ++i) fma_row4<CPT>(acc[i], *reinterpret_cast<const float4*>(zw + i * KP + k), m);
    }
    }
    __syncwarp();  // every lane has read the iterate before any lane rewrites it
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      if (!((mask >> i) & 1u)) continue;  // warp-uniform
      const int64_t row = rows[i];
      float sn = 0.0f, sd = 0.0f;
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int n = lane * CPT + j;
        if (n < H) {
          const int64_t off = row * H + n;
          const float cv = ldg_f<Tag>(cg + off);
          const float f = adj ? __fmul_rn(load_d(p, off), __fadd_rn(cv, acc[i][j]))
                              : tanh_accurate(__fadd_rn(acc[i][j], cv));
          float* zp = zw + i * KP + n;
          const float zo = *zp;
          const float g = f - zo;
          sn = fmaf(g, g, sn);
          sd = fmaf(f, f, sd);
          *zp = exact ? f : fmaf(damp, g, zo);
        }
      }
      sn = warp_sum(sn);  // xor butterfly: the same bits in every lane
      sd = warp_sum(sd);
      const double res = div_nonneg(sqrt(static_cast<double>(sn)), sqrt(static_cast<double>(sd)) + p.eps);
      iters_r[i] = it;
      res_r[i] = static_cast<float>(res);
      if (res < p.tol) mask &= ~(1u << i);
    }
    __syncwarp();  // the new iterate is visible to every lane
  }

  S* zg = static_cast<S*>(p.z);
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    if (rows[i] < 0) continue;
    for (int n = lane; n < H; n += 32) zg[rows[i] * H + n] = Tag::from_float(zw[i * KP + n]);
    if (lane == 0) {
      p.iters[rows[i]] = iters_r[i];
      p.residual[rows[i]] = res_r[i];
      p.converged[rows[i]] = ((mask >> i) & 1u) ? 0 : 1;
    }
  }
}

// Variant of the H <= 128 solve, from DYNALAY_CUDA_SOLVE (read once): "block" (the block kernel
// above), or "r<RPT>w<WARPS>" for the warp kernel: r4w8 (the default), r8w8, r8w4, r16w4; an empty or
// unknown value means the default.  H200 sweep (benchmarks/gpu_tune.py, fp32 fwd, ms, B x H):
//   8192x64 / 8192x128 / 65536x128:  block 0.097/0.246/1.884  r8w8 0.077/0.153/1.135
//   r4w8 0.059/0.121/0.885  r8w4 0.112/0.158/1.167  r16w4 0.145/0.256/1.352
enum Variant { kBlock = 0, kR8W8, kR4W8, kR8W4, kR16W4 };

int variant() {
  static const int v = [] {
    const char* e = std::getenv("DYNALAY_CUDA_SOLVE");
    if (e == nullptr || e[0] == '\0') return static_cast<int>(kR4W8);
    const std::string s(e);
    if (s == "block") return static_cast<int>(kBlock);
    if (s == "r8w8") return static_cast<int>(kR8W8);
    if (s == "r8w4") return static_cast<int>(kR8W4);
    if (s == "r16w4") return static_cast<int>(kR16W4);
    return static_cast<int>(kR4W8);  // "r4w8" and anything unknown
  }();
  return v;
}

int warp_block_m(int v) {
  switch (v) {
    case kR8W8: return 64;
    case kR8W4: return 32;
    case kR16W4: return 64;
    default: return 32;  // kR4W8
  }
}

// ---- configurations by H ----------------------------------------------------------------------
//   H <=   32: BM 32, 32 x 8 threads, 1 column/thread   (M in shared memory)
//   H <=   64: BM 32, 64 x 4 threads, 1 column/thread   (M in shared memory)
//   H <=  128: BM 32, 128 x 2 threads, 1 column/thread  (M in shared memory; if it does not
//              fit on the device, the H <= 256 configuration)
//   H <=  256: BM 32, 128 x 2 threads, 2 columns/thread (M through L2)
//   H <=  512: BM 16, 256 x 1 threads, 2 columns/thread (M through L2)
//   H <= 1024: BM 16, 256 x 1 threads, 4 columns/thread (M through L2)
int block_m_for(int H) {
  if (H < 1 || H > kMaxH) return -1;
  if (H <= 128 && variant() != kBlock) return warp_block_m(variant());
  return H <= 256 ? 32 : 16;
}

// Whether the launch for this H takes the warp kernel, which loads M itself and can read W
// in place of a transposed copy (m_is_w).
bool takes_w(int H) { return H >= 1 && H <= 128 && variant() != kBlock; }

// Launch one solve kernel over the tiles: opt in to `dyn_bytes` of dynamic shared memory (refused
// when it and the kernel's static part exceed the device's per-block limit).
cudaError_t run_kernel(void (*kernel)(DynalayFpSolveParams), const DynalayFpSolveParams& p, cudaStream_t stream,
                       int BM, int threads, size_t dyn_bytes, int smem_optin) {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  if (dyn_bytes + attr.sharedSizeBytes > static_cast<size_t>(smem_optin)) return cudaErrorInvalidConfiguration;
  // The limit is the largest the device allows, the same value on every call: setting this
  // launch's own size instead would let another host thread, launching the same kernel for a
  // larger H, see the limit shrink between its set and its launch.
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             smem_optin - static_cast<int>(attr.sharedSizeBytes));
  if (err != cudaSuccess) return err;
  const int64_t grid = p.tile_layer != nullptr ? static_cast<int64_t>(p.num_tiles) : (p.B + BM - 1) / BM;
  if (grid <= 0) return cudaSuccess;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned>(grid), threads, dyn_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <class Tag, int BM, int TX, int TY, int CPT, bool MSMEM>
cudaError_t run_config(const DynalayFpSolveParams& p, cudaStream_t stream, size_t dyn_bytes, int smem_optin) {
  return run_kernel(fp_solve_kernel<Tag, BM, TX, TY, CPT, MSMEM>, p, stream, BM, TX * TY, dyn_bytes, smem_optin);
}

template <class Tag, int CPT, int RPT, int WARPS>
cudaError_t run_warp(const DynalayFpSolveParams& p, cudaStream_t stream, int smem_optin) {
  const size_t KP = static_cast<size_t>((p.H + 3) & ~3);
  const size_t dyn = (KP * 32 * CPT + static_cast<size_t>(RPT) * WARPS * KP) * sizeof(float);
  return run_kernel(fp_solve_warp_kernel<Tag, CPT, RPT, WARPS>, p, stream, RPT * WARPS, WARPS * 32, dyn,
                    smem_optin);
}

template <class Tag, int RPT, int WARPS>
cudaError_t run_warp_h(const DynalayFpSolveParams& p, cudaStream_t stream, int smem_optin) {
  if (p.H <= 32) return run_warp<Tag, 1, RPT, WARPS>(p, stream, smem_optin);
  if (p.H <= 64) return run_warp<Tag, 2, RPT, WARPS>(p, stream, smem_optin);
  return run_warp<Tag, 4, RPT, WARPS>(p, stream, smem_optin);
}

template <class Tag>
cudaError_t launch(const DynalayFpSolveParams* pp, cudaStream_t stream) {
  if (pp == nullptr) return cudaErrorInvalidValue;
  const DynalayFpSolveParams& p = *pp;
  const int H = p.H;
  const int bm = block_m_for(H);
  if (bm < 0 || p.block_m != bm || p.B < 0 || p.max_iter < 0) return cudaErrorInvalidValue;
  if (p.c == nullptr || p.M == nullptr || p.z == nullptr || p.iters == nullptr || p.residual == nullptr ||
      p.converged == nullptr || (p.adjoint && p.d == nullptr))
    return cudaErrorInvalidValue;
  if (p.tile_layer != nullptr && (p.tile_row_start == nullptr || p.offsets == nullptr || p.perm == nullptr))
    return cudaErrorInvalidValue;
  if (p.m_is_w && (p.adjoint || !takes_w(H))) return cudaErrorInvalidValue;  // only the warp kernel reads W
  if (p.B == 0) return cudaSuccess;
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  const size_t HP = static_cast<size_t>((H + 3) & ~3);
  const size_t z_bytes = static_cast<size_t>(bm) * HP * sizeof(float);
  const size_t m_bytes = HP * static_cast<size_t>(H) * sizeof(typename Tag::S);
  // Room for the static shared memory (< 4 KB) besides the dynamic part.
  const bool m_fits = m_bytes <= kMsmemMaxBytes && z_bytes + m_bytes + 4096 <= static_cast<size_t>(optin);
  if (H <= 128 && variant() != kBlock) {
    switch (variant()) {
      case kR8W8: return run_warp_h<Tag, 8, 8>(p, stream, optin);
      case kR8W4: return run_warp_h<Tag, 8, 4>(p, stream, optin);
      case kR16W4: return run_warp_h<Tag, 16, 4>(p, stream, optin);
      default: return run_warp_h<Tag, 4, 8>(p, stream, optin);
    }
  }
  if (H <= 32) return run_config<Tag, 32, 32, 8, 1, true>(p, stream, z_bytes + m_bytes, optin);
  if (H <= 64) return run_config<Tag, 32, 64, 4, 1, true>(p, stream, z_bytes + m_bytes, optin);
  if (H <= 128 && m_fits) return run_config<Tag, 32, 128, 2, 1, true>(p, stream, z_bytes + m_bytes, optin);
  // (H <= 128 on a device too small for M in shared memory also takes this config)
  if (H <= 256) return run_config<Tag, 32, 128, 2, 2, false>(p, stream, z_bytes, optin);
  if (H <= 512) return run_config<Tag, 16, 256, 1, 2, false>(p, stream, z_bytes, optin);
  return run_config<Tag, 16, 256, 1, 4, false>(p, stream, z_bytes, optin);
}

}  // namespace
}  // namespace dynalay

extern "C" {

int dynalay_fp_solve_block_m(int32_t H) { return dynalay::block_m_for(H); }
int dynalay_fp_solve_takes_w(int32_t H) { return dynalay::takes_w(H) ? 1 : 0; }

cudaError_t dynalay_fp_solve_f32(const DynalayFpSolveParams* p, cudaStream_t stream) {
  return dynalay::launch<dynalay::F32>(p, stream);
}
cudaError_t dynalay_fp_solve_f16(const DynalayFpSolveParams* p, cudaStream_t stream) {
  return dynalay::launch<dynalay::F16>(p, stream);
}
cudaError_t dynalay_fp_solve_bf16(const DynalayFpSolveParams* p, cudaStream_t stream) {
  return dynalay::launch<dynalay::BF16>(p, stream);
}

}  // extern "C"
