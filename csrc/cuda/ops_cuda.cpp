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
};

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
  if (!tiles) return r;
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
  return r;
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
  TORCH_CHECK(solver == "picard", "dynalay (cuda backend): solver='", std::string(solver.data(), solver.size()),
              "' is not implemented by the CUDA kernels (Picard only); use backend='torch' or 'cpp' for Anderson");
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
  TORCH_CHECK(H >= 1 && H <= 1024, "dynalay (cuda backend): the CUDA solve takes 1 <= H <= 1024 (got H=", H,
              "); use backend='torch'");
  TORCH_CHECK(B <= kInt32Max, "dynalay (cuda backend): c has too many rows (B=", B, ")");
  TORCH_CHECK(max_iter >= 0 && max_iter <= kInt32Max, "dynalay (cuda backend): max_iter must be in [0, 2^31) (got ",
              max_iter, ")");
  TORCH_CHECK(eps > 0.0, "dynalay (cuda backend): eps must be > 0 (got ", eps, ")");
  const bool has_d = d_in.has_value() && d_in->defined();
  TORCH_CHECK(!adjoint || has_d, "dynalay (cuda backend): the adjoint map needs d");
  const bool grouped = actions.has_value() && actions->defined();
  TORCH_CHECK(grouped || L == 1, "dynalay (cuda backend): W with several layers (L=", L, ") needs actions");
  const bool has_z0 = z0_in.has_value() && z0_in->defined();

  c10::cuda::CUDAGuard guard(dev);
  const at::ScalarType out_dtype = c_in.scalar_type();
  const at::ScalarType st = common_storage({c_in.scalar_type(), W_in.scalar_type()});
  const at::Tensor c = c_in.to(st).contiguous();
  const at::Tensor W = W_in.to(st);
  const at::Tensor M = adjoint ? W.contiguous() : W.transpose(1, 2).contiguous();  // p = z M
  at::Tensor d;
  if (adjoint) {
    check_device(*d_in, "d", dev);
    TORCH_CHECK(d_in->dim() == 2 && d_in->size(0) == B && d_in->size(1) == H,
                "dynalay (cuda backend): d must have the shape of c (", c.sizes(), ") (got ", d_in->sizes(), ")");
    check_float(*d_in, "d");
    d = d_in->to(at::kFloat).contiguous();
  }
  at::Tensor z0;
  if (has_z0) {
    check_device(*z0_in, "z0", dev);
    TORCH_CHECK(z0_in->dim() == 2 && z0_in->size(0) == B && z0_in->size(1) == H,
                "dynalay (cuda backend): z0 must have the shape of c (", c.sizes(), ") (got ", z0_in->sizes(), ")");
    check_float(*z0_in, "z0");
    z0 = z0_in->to(st).contiguous();
  }
  at::Tensor a;
  if (grouped) a = checked_actions(*actions, B, dev);

  const auto opts = c.options();
  at::Tensor z, iters, res, conv;
  if (grouped) {  // NOP rows are in no tile: pre-fill their outputs (z0 or 0, 0, 0, True)
    z = has_z0 ? z0.clone(at::MemoryFormat::Contiguous) : at::zeros({B, H}, opts);
    iters = at::zeros({B}, opts.dtype(at::kInt));
    res = at::zeros({B}, opts.dtype(at::kFloat));
    conv = a.eq(L).contiguous();
  } else {        // every row is in a tile and written by the kernel
    z = at::empty({B, H}, opts);
    iters = at::empty({B}, opts.dtype(at::kInt));
    res = at::empty({B}, opts.dtype(at::kFloat));
    conv = at::empty({B}, opts.dtype(at::kBool));
  }
  if (B > 0) {
    const int bm = dynalay_fp_solve_block_m(static_cast<int32_t>(H));
    TORCH_CHECK(bm > 0, "dynalay (cuda backend): no solve configuration for H=", H);
    DynalayFpSolveParams p{};
    Routing r;
    if (grouped) {
      r = route(a, L, bm, /*tiles=*/true);
      p.perm = r.perm.data_ptr<int64_t>();
      p.tile_layer = r.tile_layer.data_ptr<int32_t>();
      p.tile_row_start = r.tile_row_start.data_ptr<int32_t>();
      p.offsets = r.offsets.data_ptr<int64_t>();
      p.num_tiles = static_cast<int32_t>(r.num_tiles);
    }
    p.c = c.data_ptr();
    p.M = M.data_ptr();
    p.d = adjoint ? d.data_ptr<float>() : nullptr;
    p.z0 = has_z0 ? z0.data_ptr() : nullptr;
    p.z = z.data_ptr();
    p.iters = iters.data_ptr<int32_t>();
    p.residual = res.data_ptr<float>();
    p.converged = reinterpret_cast<uint8_t*>(conv.data_ptr<bool>());
    p.B = B;
    p.H = static_cast<int32_t>(H);
    p.L = static_cast<int32_t>(L);
    p.block_m = bm;
    p.max_iter = static_cast<int32_t>(max_iter);
    p.exact_step = damping == 1.0 ? 1 : 0;
    p.adjoint = adjoint ? 1 : 0;
    p.damping = static_cast<float>(damping);
    p.tol = tol;
    p.eps = eps;
    const cudaStream_t stream = current_stream();
    cudaError_t err;
    if (st == at::kFloat)
      err = dynalay_fp_solve_f32(&p, stream);
    else if (st == at::kHalf)
      err = dynalay_fp_solve_f16(&p, stream);
    else
      err = dynalay_fp_solve_bf16(&p, stream);
    C10_CUDA_CHECK(err);
  }
  if (z.scalar_type() != out_dtype) z = z.to(out_dtype);
  return {z, iters, res, conv};
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
    const int bm = dynalay_grouped_linear_block_m();
    const Routing r = route(a, L, bm, /*tiles=*/true);
    DynalayGroupedLinearParams p{};
    p.x = x.data_ptr();
    p.U = U.data_ptr();
    p.b = has_b ? b.data_ptr() : nullptr;
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
  if (B == 0 || N == 0 || K == 0) return at::zeros({L, N, K}, u.options());
  at::Tensor out = at::empty({L, N, K}, u.options());  // every element is written
  DynalayGroupedWgradParams p{};
  Routing r;
  if (grouped) {
    r = route(a, L, 1, /*tiles=*/false);
    p.perm = r.perm.data_ptr<int64_t>();
    p.offsets = r.offsets.data_ptr<int64_t>();
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

}  // namespace

TORCH_LIBRARY_IMPL(dynalay_C, CUDA, m) {
  m.impl("fp_solve", &fp_solve_cuda);
  m.impl("grouped_linear", &grouped_linear_cuda);
  m.impl("grouped_wgrad", &grouped_wgrad_cuda);
}

}  // namespace dynalay
