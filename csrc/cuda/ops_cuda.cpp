// CUDA glue of dynalay: registers the CUDA kernels of the dynalay_C ops (schemas in
// csrc/dynalay_ops.cpp, semantics in dynalay/backends/torch_ref.py, CPU twin in
// csrc/cpu/solver_cpu.cpp).  Torch headers and the extern "C" launcher declarations only: the
// device code lives in kernels/*.cu (no torch headers there).
//
// Each op: check the arguments (TORCH_CHECK naming the argument), make the inputs contiguous
// in a storage dtype the kernels take (float32, float16, bfloat16), compute the routing with
// ATen on the device (no host synchronization), pre-fill the rows no kernel writes (NOP rows),
// and launch on the current stream.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "dynalay_kernels.cuh"

// A module so that `import dynalay._C_cuda` loads this library (and runs the static kernel
// registrations below).  It imports dynalay._C first: that library defines the op schemas, so a
// missing or broken dynalay._C makes this import fail with its reason (the cuda backend then
// reports itself unavailable instead of failing at the first call).
PyMODINIT_FUNC PyInit__C_cuda(void) {
  PyObject* schemas = PyImport_ImportModule("dynalay._C");
  if (schemas == nullptr) return nullptr;
  Py_DECREF(schemas);
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace dynalay {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

bool is_storage_dtype(at::ScalarType s) { return s == at::kFloat || s == at::kHalf || s == at::kBFloat16; }

void check_device(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), "dynalay (cuda backend): ", name, " must be a CUDA tensor (got one on ", t.device(), ")");
  TORCH_CHECK(t.device() == dev, "dynalay (cuda backend): ", name, " is on ", t.device(), " but the other inputs are on ",
              dev);
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_storage_dtype(t.scalar_type()), "dynalay (cuda backend): ", name,
              " must be float32, float16 or bfloat16 (got ", t.scalar_type(), "); use backend='torch' for float64");
}

at::Tensor checked_actions(const at::Tensor& actions, int64_t B, const at::Device& dev) {
  TORCH_CHECK(actions.dim() == 1 && actions.size(0) == B, "dynalay (cuda backend): actions must have shape (", B,
              ",) (got ", actions.sizes(), ")");
  TORCH_CHECK(actions.scalar_type() == at::kLong, "dynalay (cuda backend): actions must be int64 (got ",
              actions.scalar_type(), ")");
  check_device(actions, "actions", dev);
  return actions.contiguous();
}

// Storage dtype shared by the float arguments: theirs when they agree, else float32 (every
// value converts exactly into float32 from float16 and bfloat16).
at::ScalarType common_storage(std::initializer_list<at::ScalarType> types) {
  at::ScalarType first = *types.begin();
  for (at::ScalarType t : types)
    if (t != first) return at::kFloat;
  return first;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

struct Routing {
  at::Tensor offsets;         // (L+2,) int64
  at::Tensor perm;            // (B,) int64
  at::Tensor tile_layer;      // (T,) int32, -1 for spare tiles
  at::Tensor tile_row_start;  // (T,) int32
  int64_t num_tiles = 0;      // T = cdiv(B, block_m) + L
  int64_t block_m = 0;        // of the tile tables (0: none)
};

void add_tiles(Routing& r, int64_t B, int64_t L, int64_t block_m);

// The routing of dynalay/ops/dispatch.py route_impl, for valid actions (values in [0, L]).
// The group ends come from a binary search in the stably sorted actions instead of bincount
// (CUDA bincount reads the max back to the host); for valid actions the result is the same.
// Invalid actions are not checked here (the Python layer does it): a row with a value above L
// is in no group and left as pre-filled, one below 0 is solved with layer 0; nothing is read or
// written out of bounds.
Routing route(const at::Tensor& actions, int64_t L, int64_t block_m, bool tiles) {
  const int64_t B = actions.size(0);
  const auto lopts = actions.options().dtype(at::kLong);
  Routing r;
  auto sorted = at::sort(actions, /*stable=*/std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  const at::Tensor sa = std::get<0>(sorted);
  r.perm = std::get<1>(sorted);
  // offsets[l + 1] = number of rows with action < l + 1, l = 0 .. L
  const at::Tensor bounds = at::arange(1, L + 2, lopts);
  const at::Tensor ends = at::searchsorted(sa, bounds, /*out_int32=*/false, /*right=*/false);
  r.offsets = at::cat({at::zeros({1}, lopts), ends});
  if (tiles) add_tiles(r, B, L, block_m);
  return r;
}

// The tile tables of `r` for `block_m` (from r.offsets): tile t is (layer, row_start), -1 for a
// spare tile.  Another block size over the same sort: copy the Routing and call this again.
void add_tiles(Routing& r, int64_t B, int64_t L, int64_t block_m) {
  const auto lopts = r.offsets.options();
  const int64_t T = (B + block_m - 1) / block_m + L;
  TORCH_CHECK(T <= kInt32Max, "dynalay (cuda backend): too many rows (B=", B, ")");
  const at::Tensor counts = r.offsets.slice(0, 1, L + 1) - r.offsets.slice(0, 0, L);  // (L,) rows per layer
  const at::Tensor tiles_per = at::floor_divide(counts + (block_m - 1), block_m);
  const at::Tensor tile_end = at::cumsum(tiles_per, 0);
  const at::Tensor t = at::arange(T, lopts);
  const at::Tensor layer = at::searchsorted(tile_end, t, /*out_int32=*/false, /*right=*/true);
  const at::Tensor valid = layer.lt(L);
  const at::Tensor lc = layer.clamp_max(L - 1);
  const at::Tensor tile_start = tile_end - tiles_per;
  const at::Tensor row_start = r.offsets.index_select(0, lc) + (t - tile_start.index_select(0, lc)) * block_m;
  r.tile_layer = at::where(valid, layer, at::Scalar(static_cast<int64_t>(-1))).to(at::kInt).contiguous();
  r.tile_row_start = at::where(valid, row_start, at::Scalar(static_cast<int64_t>(0))).to(at::kInt).contiguous();
  r.num_tiles = T;
  r.block_m = block_m;
}

// The routing of `r` with tile tables for the grouped linear kernel's block size (the same sort;
// new tables only when that size differs from r's).
Routing linear_routing(const Routing& r, int64_t B, int64_t L) {
  Routing rl = r;
  const int lbm = dynalay_grouped_linear_block_m();
  if (lbm != r.block_m) add_tiles(rl, B, L, lbm);
  return rl;
}

// ---------------------------------------------------------------------------------------------
// Launch helpers: the tensors are prepared (device, dtype, contiguity) by the ops below.
// ---------------------------------------------------------------------------------------------
struct SolveArgs {
  at::ScalarType st;       // storage dtype of c, M, z0, z
  at::Tensor c, M, d, z0;  // d: float32 (adjoint), z0 optional
  bool m_is_w = false;     // M holds W (forward, where dynalay_fp_solve_takes_w)
  bool d_is_z = false;     // d holds z* (adjoint)
  bool adjoint = false;
  double tol = 1e-4, damping = 1.0, eps = 1e-12;
  int64_t max_iter = 50;

  SolveArgs(at::ScalarType st_, double tol_, int64_t max_iter_, double damping_, double eps_)
      : st(st_), tol(tol_), damping(damping_), eps(eps_), max_iter(max_iter_) {}

  // The forward map's M from W (storage dtype st): W itself where the kernel reads it in place
  // (m_is_w), else a contiguous W^T.
  void set_forward_M(const at::Tensor& W, int64_t H) {
    m_is_w = dynalay_fp_solve_takes_w(static_cast<int32_t>(H)) != 0;
    M = m_is_w ? W.contiguous() : W.transpose(1, 2).contiguous();
  }
};

void launch_solve(const SolveArgs& a, at::Tensor& z, at::Tensor& iters, at::Tensor& res, at::Tensor& conv,
                  const Routing* r, int64_t B, int64_t H, int64_t L, int bm) {
  if (B == 0) return;
  DynalayFpSolveParams p{};
  if (r != nullptr) {
    TORCH_CHECK(r->block_m == bm, "dynalay (cuda backend): internal error: routing tiles of ", r->block_m,
                " rows for a solve of ", bm);
    p.perm = r->perm.data_ptr<int64_t>();
    p.tile_layer = r->tile_layer.data_ptr<int32_t>();
    p.tile_row_start = r->tile_row_start.data_ptr<int32_t>();
    p.offsets = r->offsets.data_ptr<int64_t>();
    p.num_tiles = static_cast<int32_t>(r->num_tiles);
  }
  p.c = a.c.data_ptr();
  p.M = a.M.data_ptr();
  p.d = a.adjoint ? a.d.data_ptr<float>() : nullptr;
  p.z0 = a.z0.defined() ? a.z0.data_ptr() : nullptr;
  p.z = z.data_ptr();
  p.iters = iters.data_ptr<int32_t>();
  p.residual = res.data_ptr<float>();
  p.converged = reinterpret_cast<uint8_t*>(conv.data_ptr<bool>());
  p.B = B;
  p.H = static_cast<int32_t>(H);
  p.L = static_cast<int32_t>(L);
  p.block_m = bm;
  p.max_iter = static_cast<int32_t>(a.max_iter);
  p.exact_step = a.damping == 1.0 ? 1 : 0;
  p.adjoint = a.adjoint ? 1 : 0;
  p.d_is_z = a.d_is_z ? 1 : 0;
  p.m_is_w = a.m_is_w ? 1 : 0;
  p.damping = static_cast<float>(a.damping);
  p.tol = a.tol;
  p.eps = a.eps;
  const cudaStream_t stream = current_stream();
  cudaError_t err;
  if (a.st == at::kFloat)
    err = dynalay_fp_solve_f32(&p, stream);
  else if (a.st == at::kHalf)
    err = dynalay_fp_solve_f16(&p, stream);
  else
    err = dynalay_fp_solve_bf16(&p, stream);
  C10_CUDA_CHECK(err);
}

// y[rows of the tiles of r] = x U[l]^T + b[l] (or x U[l] with transpose); r must carry tiles of
// dynalay_grouped_linear_block_m() rows.  x, U, b, y: contiguous, storage dtype st.
void launch_linear(at::ScalarType st, const at::Tensor& x, const at::Tensor& U, const at::Tensor& b, at::Tensor& y,
                   const Routing& r, bool transpose, int64_t B, int64_t K, int64_t N, int64_t L) {
  if (B == 0 || N == 0) return;
  const int bm = dynalay_grouped_linear_block_m();
  TORCH_CHECK(r.block_m == bm, "dynalay (cuda backend): internal error: routing tiles of ", r.block_m,
              " rows for a grouped linear of ", bm);
  DynalayGroupedLinearParams p{};
  p.x = x.data_ptr();
  p.U = U.data_ptr();
  p.b = b.defined() ? b.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.perm = r.perm.data_ptr<int64_t>();
  p.tile_layer = r.tile_layer.data_ptr<int32_t>();
  p.tile_row_start = r.tile_row_start.data_ptr<int32_t>();
  p.offsets = r.offsets.data_ptr<int64_t>();
  p.B = B;
  p.K = static_cast<int32_t>(K);
  p.N = static_cast<int32_t>(N);
  p.L = static_cast<int32_t>(L);
  p.num_tiles = static_cast<int32_t>(r.num_tiles);
  p.block_m = bm;
  p.transpose = transpose ? 1 : 0;
  const cudaStream_t stream = current_stream();
  cudaError_t err;
  if (st == at::kFloat)
    err = dynalay_grouped_linear_f32(&p, stream);
  else if (st == at::kHalf)
    err = dynalay_grouped_linear_f16(&p, stream);
  else
    err = dynalay_grouped_linear_bf16(&p, stream);
  C10_CUDA_CHECK(err);
}

// out[l] = sum over the rows of group l of u_i^T x_i, (L, N, K) float32; r == nullptr: one group
// of all rows.  u, x: float32, contiguous.
at::Tensor wgrad_f32(const at::Tensor& u, const at::Tensor& x, const Routing* r, int64_t L) {
  const int64_t B = u.size(0), N = u.size(1), K = x.size(1);
  if (B == 0 || N == 0 || K == 0) return at::zeros({L, N, K}, u.options());
  at::Tensor out = at::empty({L, N, K}, u.options());  // every element is written
  DynalayGroupedWgradParams p{};
  if (r != nullptr) {
    p.perm = r->perm.data_ptr<int64_t>();
    p.offsets = r->offsets.data_ptr<int64_t>();
  }
  const int splits = dynalay_grouped_wgrad_splits(B, static_cast<int32_t>(N), static_cast<int32_t>(K),
                                                  static_cast<int32_t>(L));
  at::Tensor ws;
  if (splits > 1) ws = at::empty({L * splits * N * K}, u.options());
  p.u = u.data_ptr<float>();
  p.x = x.data_ptr<float>();
  p.out = out.data_ptr<float>();
  p.workspace = splits > 1 ? ws.data_ptr<float>() : nullptr;
  p.B = B;
  p.N = static_cast<int32_t>(N);
  p.K = static_cast<int32_t>(K);
  p.L = static_cast<int32_t>(L);
  p.splits = splits;
  C10_CUDA_CHECK(dynalay_grouped_wgrad_f32(&p, current_stream()));
  return out;
}

// The per-row outputs of a solve: grouped solves pre-fill the rows no tile writes (NOP rows:
// z from `z_fill` or 0, iterations 0, residual 0, converged); a plain solve writes every row.
struct SolveOut {
  at::Tensor z, iters, res, conv;
};

SolveOut solve_outputs(const at::TensorOptions& opts, int64_t B, int64_t H, const at::Tensor& a, int64_t L,
                       const at::Tensor& z_fill) {
  SolveOut o;
  if (a.defined()) {
    o.z = z_fill.defined() ? z_fill.clone(at::MemoryFormat::Contiguous) : at::zeros({B, H}, opts);
    o.iters = at::zeros({B}, opts.dtype(at::kInt));
    o.res = at::zeros({B}, opts.dtype(at::kFloat));
    o.conv = a.eq(L).contiguous();
  } else {
    o.z = at::empty({B, H}, opts);
    o.iters = at::empty({B}, opts.dtype(at::kInt));
    o.res = at::empty({B}, opts.dtype(at::kFloat));
    o.conv = at::empty({B}, opts.dtype(at::kBool));
  }
  return o;
}

void check_solver(c10::string_view solver, int64_t max_iter, double eps) {
  TORCH_CHECK(solver == "picard", "dynalay (cuda backend): solver='", std::string(solver.data(), solver.size()),
              "' is not implemented by the CUDA kernels (Picard only); use backend='torch' or 'cpp' for Anderson");
  TORCH_CHECK(max_iter >= 0 && max_iter <= kInt32Max, "dynalay (cuda backend): max_iter must be in [0, 2^31) (got ",
              max_iter, ")");
  TORCH_CHECK(eps > 0.0, "dynalay (cuda backend): eps must be > 0 (got ", eps, ")");
}

int solve_block_m(int64_t H) {
  TORCH_CHECK(H >= 1 && H <= 1024, "dynalay (cuda backend): the CUDA solve takes 1 <= H <= 1024 (got H=", H,
              "); use backend='torch'");
  const int bm = dynalay_fp_solve_block_m(static_cast<int32_t>(H));
  TORCH_CHECK(bm > 0, "dynalay (cuda backend): no solve configuration for H=", H);
  return bm;
}

// ---------------------------------------------------------------------------------------------
// fp_solve
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fp_solve_cuda(
    const at::Tensor& c_in, const at::Tensor& W_in, const std::optional<at::Tensor>& d_in,
    const std::optional<at::Tensor>& actions, const std::optional<at::Tensor>& z0_in, bool adjoint, double tol,
    int64_t max_iter, c10::string_view solver, double damping, int64_t anderson_m, double anderson_lam, double eps) {
  (void)anderson_m;
  (void)anderson_lam;
  check_solver(solver, max_iter, eps);
  TORCH_CHECK(c_in.dim() == 2, "dynalay (cuda backend): c must be (B, H) (got ", c_in.sizes(), ")");
  const int64_t B = c_in.size(0), H = c_in.size(1);
  TORCH_CHECK(W_in.dim() == 3 && W_in.size(0) >= 1 && W_in.size(1) == H && W_in.size(2) == H,
              "dynalay (cuda backend): W must be (L, H, H) with L >= 1 and H = ", H, " (got ", W_in.sizes(), ")");
  const int64_t L = W_in.size(0);
  TORCH_CHECK(c_in.is_cuda(), "dynalay (cuda backend): c must be a CUDA tensor (got one on ", c_in.device(), ")");
  const at::Device dev = c_in.device();
  check_device(W_in, "W", dev);
  check_float(c_in, "c");
  check_float(W_in, "W");
  TORCH_CHECK(B <= kInt32Max, "dynalay (cuda backend): c has too many rows (B=", B, ")");
  const int bm = solve_block_m(H);
  const bool has_d = d_in.has_value() && d_in->defined();
  TORCH_CHECK(!adjoint || has_d, "dynalay (cuda backend): the adjoint map needs d");
  const bool grouped = actions.has_value() && actions->defined();
  TORCH_CHECK(grouped || L == 1, "dynalay (cuda backend): W with several layers (L=", L, ") needs actions");
  const bool has_z0 = z0_in.has_value() && z0_in->defined();

  c10::cuda::CUDAGuard guard(dev);
  SolveArgs s(common_storage({c_in.scalar_type(), W_in.scalar_type()}), tol, max_iter, damping, eps);
  s.c = c_in.to(s.st).contiguous();
  const at::Tensor W = W_in.to(s.st);
  // p = z M: the adjoint takes M = W; the forward M = W^T, read in place where the kernel can
  if (adjoint)
    s.M = W.contiguous();
  else
    s.set_forward_M(W, H);
  if (adjoint) {
    check_device(*d_in, "d", dev);
    TORCH_CHECK(d_in->dim() == 2 && d_in->size(0) == B && d_in->size(1) == H,
                "dynalay (cuda backend): d must have the shape of c (", s.c.sizes(), ") (got ", d_in->sizes(), ")");
    check_float(*d_in, "d");
    s.d = d_in->to(at::kFloat).contiguous();
  }
  if (has_z0) {
    check_device(*z0_in, "z0", dev);
    TORCH_CHECK(z0_in->dim() == 2 && z0_in->size(0) == B && z0_in->size(1) == H,
                "dynalay (cuda backend): z0 must have the shape of c (", s.c.sizes(), ") (got ", z0_in->sizes(), ")");
    check_float(*z0_in, "z0");
    s.z0 = z0_in->to(s.st).contiguous();
  }
  s.adjoint = adjoint;
  at::Tensor a;
  if (grouped) a = checked_actions(*actions, B, dev);
  // NOP rows are in no tile: they keep z0 (or 0), 0 iterations, residual 0, converged
  SolveOut o = solve_outputs(s.c.options(), B, H, a, L, s.z0);
  if (B > 0) {
    Routing r;
    if (grouped) r = route(a, L, bm, /*tiles=*/true);
    launch_solve(s, o.z, o.iters, o.res, o.conv, grouped ? &r : nullptr, B, H, L, bm);
  }
  if (o.z.scalar_type() != c_in.scalar_type()) o.z = o.z.to(c_in.scalar_type());
  return {o.z, o.iters, o.res, o.conv};
}

// ---------------------------------------------------------------------------------------------
// dynamic_step: one routing for the projection and the solve.  Row i with a_i < L becomes the
// fixed point of z = tanh(W[a_i] z + U[a_i] h_i + b[a_i]) (from z = 0); NOP rows keep h_i.
// Returns (h_new, iters, residual, converged), as the CPU kernel.
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dynamic_step_cuda(
    const at::Tensor& h_in, const at::Tensor& actions, const at::Tensor& U_in, const at::Tensor& W_in,
    const at::Tensor& b_in, double tol, int64_t max_iter, c10::string_view solver, double damping, int64_t anderson_m,
    double anderson_lam, double eps) {
  (void)anderson_m;
  (void)anderson_lam;
  check_solver(solver, max_iter, eps);
  TORCH_CHECK(h_in.dim() == 2, "dynalay (cuda backend): h must be (B, H) (got ", h_in.sizes(), ")");
  const int64_t B = h_in.size(0), H = h_in.size(1);
  TORCH_CHECK(U_in.dim() == 3 && U_in.size(0) >= 1 && U_in.size(1) == H && U_in.size(2) == H,
              "dynalay (cuda backend): U must be (L, H, H) with H = ", H, " (got ", U_in.sizes(), ")");
  const int64_t L = U_in.size(0);
  TORCH_CHECK(W_in.dim() == 3 && W_in.size(0) == L && W_in.size(1) == H && W_in.size(2) == H,
              "dynalay (cuda backend): W must be (", L, ", ", H, ", ", H, ") like U (got ", W_in.sizes(), ")");
  TORCH_CHECK(b_in.dim() == 2 && b_in.size(0) == L && b_in.size(1) == H, "dynalay (cuda backend): b must be (", L,
              ", ", H, ") (got ", b_in.sizes(), ")");
  TORCH_CHECK(h_in.is_cuda(), "dynalay (cuda backend): h must be a CUDA tensor (got one on ", h_in.device(), ")");
  const at::Device dev = h_in.device();
  check_device(U_in, "U", dev);
  check_device(W_in, "W", dev);
  check_device(b_in, "b", dev);
  check_float(h_in, "h");
  check_float(U_in, "U");
  check_float(W_in, "W");
  check_float(b_in, "b");
  TORCH_CHECK(B <= kInt32Max, "dynalay (cuda backend): h has too many rows (B=", B, ")");
  const int bm = solve_block_m(H);
  c10::cuda::CUDAGuard guard(dev);
  const at::Tensor a = checked_actions(actions, B, dev);
  // The whole step in float32, whatever the inputs' storage: inj = h U^T + b is an intermediate,
  // and the solve reads c in its storage type, so a 16-bit step would round inj before the
  // solve (torch, cpp and Triton keep it in float32).  Only z is rounded, once, on the way out.
  SolveArgs s(at::kFloat, tol, max_iter, damping, eps);
  const at::Tensor h = h_in.to(s.st).contiguous();
  const at::Tensor U = U_in.to(s.st).contiguous();
  const at::Tensor b = b_in.to(s.st).contiguous();
  s.set_forward_M(W_in.to(s.st), H);
  SolveOut o = solve_outputs(h.options(), B, H, a, L, h);  // NOP rows keep h
  if (B > 0) {
    const Routing r = route(a, L, bm, /*tiles=*/true);
    const Routing rl = linear_routing(r, B, L);
    s.c = at::empty({B, H}, h.options());  // inj = h U[a]^T + b[a]; NOP rows are never read
    launch_linear(s.st, h, U, b, s.c, rl, /*transpose=*/false, B, H, H, L);
    launch_solve(s, o.z, o.iters, o.res, o.conv, &r, B, H, L, bm);
  }
  if (o.z.scalar_type() != h_in.scalar_type()) o.z = o.z.to(h_in.scalar_type());
  return {o.z, o.iters, o.res, o.conv};
}

// ---------------------------------------------------------------------------------------------
// implicit_backward: the IFT backward in one call, as the CPU kernel (csrc/cpu/solver_cpu.cpp):
// with d = 1 - z*^2 (computed in the solve kernel from z*), solve u = d * (g + u W[l]) with the
// forward's freeze rule, then the reductions on the same routing, per group, without atomics:
//   fixed_point  (h undefined): dx = u (0 on NOP rows),           dW[l] = sum u^T z*
//   dynamic_step (h, U given):  dx = u U[l] (g on NOP rows),      dW[l] = sum u^T z*,
//                               dU[l] = sum u^T h,  db[l] = sum u.
// Everything in float32; outputs not asked for are empty; iters/res/conv: the adjoint's stats.
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> implicit_backward_cuda(
    const at::Tensor& z_in, const at::Tensor& g_in, const at::Tensor& W_in, const std::optional<at::Tensor>& actions,
    const std::optional<at::Tensor>& h_in, const std::optional<at::Tensor>& U_in, bool want_x, bool want_W,
    bool want_U, bool want_b, double tol, int64_t max_iter, c10::string_view solver, double damping,
    int64_t anderson_m, double anderson_lam, double eps) {
  (void)anderson_m;
  (void)anderson_lam;
  check_solver(solver, max_iter, eps);
  TORCH_CHECK(z_in.dim() == 2 && g_in.sizes() == z_in.sizes(), "dynalay (cuda backend): z and g must be (B, H) "
              "(got ", z_in.sizes(), " and ", g_in.sizes(), ")");
  const int64_t B = z_in.size(0), H = z_in.size(1);
  TORCH_CHECK(W_in.dim() == 3 && W_in.size(0) >= 1 && W_in.size(1) == H && W_in.size(2) == H,
              "dynalay (cuda backend): W must be (L, H, H) with L >= 1 and H = ", H, " (got ", W_in.sizes(), ")");
  const int64_t L = W_in.size(0);
  TORCH_CHECK(z_in.is_cuda(), "dynalay (cuda backend): z must be a CUDA tensor (got one on ", z_in.device(), ")");
  const at::Device dev = z_in.device();
  check_device(g_in, "g", dev);
  check_device(W_in, "W", dev);
  check_float(z_in, "z");
  check_float(g_in, "g");
  check_float(W_in, "W");
  TORCH_CHECK(B <= kInt32Max, "dynalay (cuda backend): z has too many rows (B=", B, ")");
  const bool grouped = actions.has_value() && actions->defined();
  const bool step = h_in.has_value() && h_in->defined();
  TORCH_CHECK(grouped || L == 1, "dynalay (cuda backend): W with several layers (L=", L, ") needs actions");
  TORCH_CHECK(!step || (grouped && U_in.has_value() && U_in->defined()),
              "dynalay (cuda backend): the dynamic_step backward needs actions, h and U");
  if (step) {
    check_device(*h_in, "h", dev);
    check_device(*U_in, "U", dev);
    check_float(*h_in, "h");
    check_float(*U_in, "U");
    TORCH_CHECK(h_in->sizes() == z_in.sizes(), "dynalay (cuda backend): h must have the shape of z (", z_in.sizes(),
                ") (got ", h_in->sizes(), ")");
    TORCH_CHECK(U_in->dim() == 3 && U_in->size(0) == L && U_in->size(1) == H && U_in->size(2) == H,
                "dynalay (cuda backend): U must be (", L, ", ", H, ", ", H, ") (got ", U_in->sizes(), ")");
  }
  const int bm = solve_block_m(H);
  c10::cuda::CUDAGuard guard(dev);
  at::Tensor a;
  if (grouped) a = checked_actions(*actions, B, dev);
  SolveArgs s(at::kFloat, tol, max_iter, damping, eps);
  s.c = g_in.to(at::kFloat).contiguous();
  s.M = W_in.to(at::kFloat).contiguous();   // the adjoint map: u M with M = W
  s.d = z_in.to(at::kFloat).contiguous();   // z*, and d = 1 - z*^2 in the kernel
  s.d_is_z = true;
  s.adjoint = true;
  SolveOut o = solve_outputs(s.c.options(), B, H, a, L, at::Tensor());  // u: 0 on NOP rows
  Routing r;
  if (grouped && B > 0) r = route(a, L, bm, /*tiles=*/true);
  const Routing* rp = grouped ? &r : nullptr;
  launch_solve(s, o.z, o.iters, o.res, o.conv, rp, B, H, L, bm);
  const at::Tensor& u = o.z;
  const auto none = [&] { return at::empty({0}, s.c.options()); };  // not asked for (outputs never alias)
  at::Tensor dx = none(), dW = none(), dU = none(), db = none();
  if (want_W) dW = wgrad_f32(u, s.d, rp, L);
  if (step && (want_U || want_b)) {
    if (want_U) dU = wgrad_f32(u, h_in->to(at::kFloat).contiguous(), rp, L);
    if (want_b) db = wgrad_f32(u, at::ones({B, 1}, s.c.options()), rp, L).view({L, H});
  }
  if (want_x) {
    if (step) {
      dx = s.c.clone(at::MemoryFormat::Contiguous);  // NOP rows: h_new = h, so dh = g
      if (B > 0)
        launch_linear(at::kFloat, u, U_in->to(at::kFloat).contiguous(), at::Tensor(), dx, linear_routing(r, B, L),
                      /*transpose=*/true, B, H, H, L);
    } else {
      dx = u;
    }
  }
  return {dx, dW, dU, db, o.iters, o.res, o.conv};
}

// ---------------------------------------------------------------------------------------------
// grouped_linear
// ---------------------------------------------------------------------------------------------
at::Tensor grouped_linear_cuda(const at::Tensor& x_in, const at::Tensor& U_in, const std::optional<at::Tensor>& b_in,
                               const at::Tensor& actions, bool transpose) {
  TORCH_CHECK(x_in.dim() == 2, "dynalay (cuda backend): x must be (B, K) (got ", x_in.sizes(), ")");
  TORCH_CHECK(U_in.dim() == 3 && U_in.size(0) >= 1, "dynalay (cuda backend): U must be (L, N, K) (or (L, K, N) with "
              "transpose) with L >= 1 (got ", U_in.sizes(), ")");
  const int64_t B = x_in.size(0), K = x_in.size(1), L = U_in.size(0);
  const int64_t N = transpose ? U_in.size(2) : U_in.size(1);
  TORCH_CHECK((transpose ? U_in.size(1) : U_in.size(2)) == K, "dynalay (cuda backend): U ", U_in.sizes(),
              " does not match x ", x_in.sizes(), transpose ? " (transpose: U is (L, K, N))" : " (U is (L, N, K))");
  TORCH_CHECK(x_in.is_cuda(), "dynalay (cuda backend): x must be a CUDA tensor (got one on ", x_in.device(), ")");
  const at::Device dev = x_in.device();
  check_device(U_in, "U", dev);
  check_float(x_in, "x");
  check_float(U_in, "U");
  const bool has_b = b_in.has_value() && b_in->defined();
  if (has_b) {
    check_device(*b_in, "b", dev);
    check_float(*b_in, "b");
    TORCH_CHECK(b_in->dim() == 2 && b_in->size(0) == L && b_in->size(1) == N, "dynalay (cuda backend): b must be (",
                L, ", ", N, ") (got ", b_in->sizes(), ")");
  }
  TORCH_CHECK(B <= kInt32Max && K <= kInt32Max && N <= kInt32Max, "dynalay (cuda backend): grouped_linear sizes too "
              "large");
  c10::cuda::CUDAGuard guard(dev);
  const at::Tensor a = checked_actions(actions, B, dev);
  const at::ScalarType st = has_b ? common_storage({x_in.scalar_type(), U_in.scalar_type(), b_in->scalar_type()})
                                  : common_storage({x_in.scalar_type(), U_in.scalar_type()});
  const at::Tensor x = x_in.to(st).contiguous();
  const at::Tensor U = U_in.to(st).contiguous();
  const at::Tensor b = has_b ? b_in->to(st).contiguous() : at::Tensor();
  at::Tensor y = at::zeros({B, N}, x.options());  // NOP rows give 0
  if (B > 0 && N > 0) {
    const Routing r = route(a, L, dynalay_grouped_linear_block_m(), /*tiles=*/true);
    launch_linear(st, x, U, b, y, r, transpose, B, K, N, L);
  }
  if (y.scalar_type() != x_in.scalar_type()) y = y.to(x_in.scalar_type());
  return y;
}

// ---------------------------------------------------------------------------------------------
// grouped_wgrad
// ---------------------------------------------------------------------------------------------
at::Tensor grouped_wgrad_cuda(const at::Tensor& u_in, const at::Tensor& x_in, const std::optional<at::Tensor>& actions,
                              int64_t num_layers) {
  TORCH_CHECK(u_in.dim() == 2 && x_in.dim() == 2 && u_in.size(0) == x_in.size(0),
              "dynalay (cuda backend): grouped_wgrad expects u (B, N) and x (B, K) (got ", u_in.sizes(), " and ",
              x_in.sizes(), ")");
  TORCH_CHECK(u_in.is_cuda(), "dynalay (cuda backend): u must be a CUDA tensor (got one on ", u_in.device(), ")");
  const at::Device dev = u_in.device();
  check_device(x_in, "x", dev);
  check_float(u_in, "u");
  check_float(x_in, "x");
  const int64_t B = u_in.size(0), N = u_in.size(1), K = x_in.size(1);
  TORCH_CHECK(B <= kInt32Max && N <= kInt32Max && K <= kInt32Max, "dynalay (cuda backend): grouped_wgrad sizes too "
              "large");
  const bool grouped = actions.has_value() && actions->defined();
  TORCH_CHECK(!grouped || num_layers >= 1, "dynalay (cuda backend): num_layers must be >= 1 (got ", num_layers, ")");
  TORCH_CHECK(num_layers <= 65535, "dynalay (cuda backend): num_layers must be <= 65535 (got ", num_layers, ")");
  const int64_t L = grouped ? num_layers : 1;
  c10::cuda::CUDAGuard guard(dev);
  at::Tensor a;
  if (grouped) a = checked_actions(*actions, B, dev);
  const at::Tensor u = u_in.to(at::kFloat).contiguous();
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  Routing r;
  if (grouped && B > 0) r = route(a, L, 1, /*tiles=*/false);
  return wgrad_f32(u, x, grouped ? &r : nullptr, L);
}

}  // namespace

TORCH_LIBRARY_IMPL(dynalay_C, CUDA, m) {
  m.impl("fp_solve", &fp_solve_cuda);
  m.impl("dynamic_step", &dynamic_step_cuda);
  m.impl("implicit_backward", &implicit_backward_cuda);
  m.impl("grouped_linear", &grouped_linear_cuda);
  m.impl("grouped_wgrad", &grouped_wgrad_cuda);
}

}  // namespace dynalay
