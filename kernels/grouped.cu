// Grouped linear map and grouped weight gradient (no atomics, fixed summation order).
//
// grouped_linear: one block per (row tile of ONE layer, 64-column tile of y).  The rows of the
//   tile are gathered through `perm`; a 64 x 16 slice of x and a 16 x 64 slice of U[l] (as
//   U^T for transpose == 0) go through shared memory; each of the 256 threads accumulates a
//   4 x 4 micro-tile (rows tr + 16 i, columns tc + 16 j) in float32, k in increasing order.
//
// grouped_wgrad: out[l] = sum_{i in group l} u_i^T x_i.  One block per (64 x 64 tile of
//   (N, K), part p of group l): the group's rows perm[offsets[l] : offsets[l+1]] are cut into
//   `splits` contiguous parts (boundaries from the group size only); the block runs over its
//   part's rows in order, 32 at a time through shared memory, and writes its partial tile to
//   the workspace, or straight into `out` when splits == 1.  A second kernel adds the parts of
//   each element in order p = 0 .. splits-1.  Deterministic for a given splits.
#include "dynalay_kernels.cuh"

namespace dynalay {
namespace {

constexpr int kLinBM = 64;   // rows per tile (route with this block_m)
constexpr int kLinBN = 64;
constexpr int kLinBK = 16;
constexpr int kThreads = 256;

template <class Tag, bool TRANS>
__global__ void __launch_bounds__(kThreads) grouped_linear_kernel(const DynalayGroupedLinearParams p) {
  using S = typename Tag::S;
  __shared__ float xs[kLinBK][kLinBM + 4];
  __shared__ float us[kLinBK][kLinBN + 4];
  __shared__ int64_t row_s[kLinBM];

  const int layer = p.tile_layer[blockIdx.x];
  if (layer < 0) return;  // spare tile
  const int64_t start = p.tile_row_start[blockIdx.x];
  const int64_t end = p.offsets[layer + 1];
  const int n0 = blockIdx.y * kLinBN;
  const int K = p.K, N = p.N;
  const int tid = threadIdx.x;
  const int tr = tid / 16, tc = tid % 16;
  if (tid < kLinBM) {
    const int64_t pos = start + tid;
    row_s[tid] = pos < end ? p.perm[pos] : int64_t(-1);
  }
  __syncthreads();

  const S* x = static_cast<const S*>(p.x);
  const S* U = static_cast<const S*>(p.U) + static_cast<int64_t>(layer) * N * K;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int k0 = 0; k0 < K; k0 += kLinBK) {
#pragma unroll
    for (int q = 0; q < (kLinBM * kLinBK) / kThreads; ++q) {
      const int e = tid + q * kThreads;
      const int r = e / kLinBK, kk = e % kLinBK;
      const int64_t row = row_s[r];
      const int k = k0 + kk;
      xs[kk][r] = (row >= 0 && k < K) ? ldg_f<Tag>(x + row * K + k) : 0.0f;
    }
#pragma unroll
    for (int q = 0; q < (kLinBK * kLinBN) / kThreads; ++q) {
      const int e = tid + q * kThreads;
      int kk, nn;
      if (TRANS) {  // U[l] is (K, N): contiguous in n
        kk = e / kLinBN;
        nn = e % kLinBN;
      } else {      // U[l] is (N, K): contiguous in k
        nn = e / kLinBK;
        kk = e % kLinBK;
      }
      const int k = k0 + kk, n = n0 + nn;
      float v = 0.0f;
      if (k < K && n < N) v = ldg_f<Tag>(U + (TRANS ? static_cast<int64_t>(k) * N + n : static_cast<int64_t>(n) * K + k));
      us[kk][nn] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kLinBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = xs[kk][tr + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = us[kk][tc + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  const S* bias = static_cast<const S*>(p.b);
  S* y = static_cast<S*>(p.y);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row_s[tr + 16 * i];
    if (row < 0) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tc + 16 * j;
      if (n >= N) continue;
      float v = acc[i][j];
      if (bias != nullptr) v += ldg_f<Tag>(bias + static_cast<int64_t>(layer) * N + n);
      y[row * N + n] = Tag::from_float(v);
    }
  }
}

constexpr int kWgT = 64;  // tile of (N, K)
constexpr int kWgR = 32;  // rows per shared-memory chunk

__global__ void __launch_bounds__(kThreads) grouped_wgrad_kernel(const DynalayGroupedWgradParams p) {
  __shared__ float us[kWgR][kWgT + 4];
  __shared__ float xs[kWgR][kWgT + 4];
  __shared__ int64_t row_s[kWgR];

  const int N = p.N, K = p.K;
  const int tiles_k = (K + kWgT - 1) / kWgT;
  const int n0 = (blockIdx.x / tiles_k) * kWgT;
  const int k0 = (blockIdx.x % tiles_k) * kWgT;
  const int part = blockIdx.y;
  const int layer = blockIdx.z;
  const int S = p.splits;
  const int64_t lo = p.offsets != nullptr ? p.offsets[layer] : 0;
  const int64_t hi = p.offsets != nullptr ? p.offsets[layer + 1] : p.B;
  const int64_t cnt = hi > lo ? hi - lo : 0;
  const int64_t s = lo + cnt * part / S;
  const int64_t e = lo + cnt * (part + 1) / S;

  const int tid = threadIdx.x;
  const int tn = tid / 16, tk = tid % 16;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int64_t pos0 = s; pos0 < e; pos0 += kWgR) {
    if (tid < kWgR) {
      const int64_t pos = pos0 + tid;
      row_s[tid] = pos < e ? (p.perm != nullptr ? p.perm[pos] : pos) : int64_t(-1);
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < (kWgR * kWgT) / kThreads; ++q) {
      const int el = tid + q * kThreads;
      const int r = el / kWgT, c = el % kWgT;
      const int64_t row = row_s[r];
      const int n = n0 + c, k = k0 + c;
      us[r][c] = (row >= 0 && n < N) ? __ldg(p.u + row * N + n) : 0.0f;
      xs[r][c] = (row >= 0 && k < K) ? __ldg(p.x + row * K + k) : 0.0f;
    }
    __syncthreads();
#pragma unroll 4
    for (int r = 0; r < kWgR; ++r) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = us[r][tn + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = xs[r][tk + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  const int64_t NK = static_cast<int64_t>(N) * K;
  float* dst = S == 1 ? p.out + static_cast<int64_t>(layer) * NK
                      : p.workspace + (static_cast<int64_t>(layer) * S + part) * NK;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int n = n0 + tn + 16 * i;
    if (n >= N) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int k = k0 + tk + 16 * j;
      if (k < K) dst[static_cast<int64_t>(n) * K + k] = acc[i][j];
    }
  }
}

__global__ void __launch_bounds__(kThreads) wgrad_reduce_kernel(const float* __restrict__ ws, float* __restrict__ out,
                                                                int64_t NK, int S, int64_t total) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t l = idx / NK;
    const int64_t el = idx - l * NK;
    const float* src = ws + l * S * NK + el;
    float sum = 0.0f;
    for (int q = 0; q < S; ++q) sum += src[q * NK];
    out[idx] = sum;
  }
}

template <class Tag>
cudaError_t launch_linear(const DynalayGroupedLinearParams* pp, cudaStream_t stream) {
  if (pp == nullptr) return cudaErrorInvalidValue;
  const DynalayGroupedLinearParams& p = *pp;
  if (p.block_m != kLinBM || p.K < 0 || p.N < 0 || p.B < 0 || p.num_tiles < 0) return cudaErrorInvalidValue;
  if (p.B == 0 || p.N == 0 || p.num_tiles == 0) return cudaSuccess;
  // (x and U hold no element when K == 0: y = b[a_i] or 0, and their pointers may be NULL)
  if ((p.K > 0 && (p.x == nullptr || p.U == nullptr)) || p.y == nullptr || p.perm == nullptr ||
      p.tile_layer == nullptr || p.tile_row_start == nullptr || p.offsets == nullptr)
    return cudaErrorInvalidValue;
  const unsigned tiles_n = static_cast<unsigned>((p.N + kLinBN - 1) / kLinBN);
  if (tiles_n > 65535u) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(p.num_tiles), tiles_n);
  if (p.transpose)
    grouped_linear_kernel<Tag, true><<<grid, kThreads, 0, stream>>>(p);
  else
    grouped_linear_kernel<Tag, false><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace dynalay

extern "C" {

int dynalay_grouped_linear_block_m(void) { return dynalay::kLinBM; }

cudaError_t dynalay_grouped_linear_f32(const DynalayGroupedLinearParams* p, cudaStream_t stream) {
  return dynalay::launch_linear<dynalay::F32>(p, stream);
}
cudaError_t dynalay_grouped_linear_f16(const DynalayGroupedLinearParams* p, cudaStream_t stream) {
  return dynalay::launch_linear<dynalay::F16>(p, stream);
}
cudaError_t dynalay_grouped_linear_bf16(const DynalayGroupedLinearParams* p, cudaStream_t stream) {
  return dynalay::launch_linear<dynalay::BF16>(p, stream);
}

int dynalay_grouped_wgrad_splits(int64_t B, int32_t N, int32_t K, int32_t L) {
  if (B <= 0 || N <= 0 || K <= 0 || L <= 0) return 1;
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
    sms = 108;
  const int64_t tiles = static_cast<int64_t>((N + dynalay::kWgT - 1) / dynalay::kWgT) *
                        ((K + dynalay::kWgT - 1) / dynalay::kWgT);
  const int64_t base = tiles * L;                // blocks with one part per group
  const int64_t target = 4 * static_cast<int64_t>(sms);
  int64_t s = (target + base - 1) / base;        // enough blocks to fill the device
  const int64_t rows_cap = B / (static_cast<int64_t>(L) * 256);  // >= ~256 rows per part on average
  if (s > rows_cap) s = rows_cap;
  if (s > 256) s = 256;
  if (s < 1) s = 1;
  return static_cast<int>(s);
}

cudaError_t dynalay_grouped_wgrad_f32(const DynalayGroupedWgradParams* pp, cudaStream_t stream) {
  if (pp == nullptr) return cudaErrorInvalidValue;
  const DynalayGroupedWgradParams& p = *pp;
  if (p.u == nullptr || p.x == nullptr || p.out == nullptr || p.N < 0 || p.K < 0 || p.L < 0 || p.B < 0 ||
      p.splits < 1 || p.splits > 65535 || (p.splits > 1 && p.workspace == nullptr) ||
      (p.perm == nullptr && (p.offsets != nullptr || p.L != 1)) || (p.perm != nullptr && p.offsets == nullptr))
    return cudaErrorInvalidValue;
  if (p.N == 0 || p.K == 0 || p.L == 0) return cudaSuccess;
  const int64_t tiles = static_cast<int64_t>((p.N + dynalay::kWgT - 1) / dynalay::kWgT) *
                        ((p.K + dynalay::kWgT - 1) / dynalay::kWgT);
  if (tiles > 0x7fffffff || p.L > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.splits), static_cast<unsigned>(p.L));
  dynalay::grouped_wgrad_kernel<<<grid, dynalay::kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.splits == 1) return err;
  const int64_t NK = static_cast<int64_t>(p.N) * p.K;
  const int64_t total = NK * p.L;
  int64_t blocks = (total + dynalay::kThreads - 1) / dynalay::kThreads;
  if (blocks > 65536) blocks = 65536;  // grid-stride loop covers the rest
  dynalay::wgrad_reduce_kernel<<<static_cast<unsigned>(blocks), dynalay::kThreads, 0, stream>>>(
      p.workspace, p.out, NK, p.splits, total);
  return cudaGetLastError();
}

}  // extern "C"
