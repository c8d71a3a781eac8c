"""DynaLay inference in one C++ call (``dynalay_C::run_model``) and the agent's decision kernel
(``dynalay_C::agent_decide``), against DynaLay.run's Python loop and Policy.forward.

The fused loop computes the head and the agent per row in its own loops (sums in double), and
cuts the batch into chunks that threads run through every step; the Python loop uses ATen ops.
Actions, iterations, steps and FLOPs must be identical; logits agree to rounding."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dynalay
from dynalay.models import DynaLay, DynaLayConfig
from dynalay.models.dynalay import head_stats
from dynalay.ops._common import SolverConfig

pytestmark = pytest.mark.skipif(dynalay.backends.availability_error("cpp") is not None,
                                reason="cpp backend not built")


def _model(seed, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    cfg = dict(in_features=12, num_classes=5, hidden=20, num_layers=3, max_steps=4, max_iter=5, tol=1e-3)
    cfg.update(kw)
    m = DynaLay(DynaLayConfig(**cfg)).to(dtype).eval()
    with torch.no_grad():
        m.policy.step_bias[1:, m.nop] = 0.8  # some rows stop at every step
    return m


CASES = [("greedy", {}), ("greedy", {"lam": 0.02}), ("greedy", {"lam": 2.0}), ("greedy", {"nop_bias": -1.5}),
         ("greedy", {"nop_bias": 0.7}), ("static", {}), ("static", {"steps": 2}), ("static", {"steps": 0}),
         ("static", {"exit_threshold": 0.3}), ("static", {"exit_threshold": 0.0})]


def _run(m, x, kind, kw, fused):
    if kind == "greedy":
        return m.run(x, details=True, fused=fused, **kw)
    return m.run_static(x, details=True, fused=fused, **kw)


def _assert_same(a, b, dtype):
    assert torch.equal(a.actions, b.actions) and torch.equal(a.step_iters, b.step_iters)
    assert torch.equal(a.steps, b.steps) and torch.equal(a.iters, b.iters)
    assert a.rows_per_step == b.rows_per_step
    torch.testing.assert_close(a.flops, b.flops, rtol=0, atol=0)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(a.logits, b.logits, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, head_kernel", [(torch.float64, "default"), (torch.float32, "default"),
                                                (torch.float32, "no_avx512")])
@pytest.mark.parametrize("B", [1, 7, 64, 300])
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_loop_matches_the_python_loop(dtype, B, seed, head_kernel, monkeypatch):
    """Every policy and knob; batches of one chunk, several and a ragged last chunk; odd H;
    with and without the agent's state projection (agent_state_dim); the float head's AVX-512
    kernel (where the CPU has it) and its AVX2 fallback (DYNALAY_CPU_NO_AVX512)."""
    if head_kernel == "no_avx512":
        monkeypatch.setenv("DYNALAY_CPU_NO_AVX512", "1")
    m = _model(seed, dtype, agent_state_dim=6 if seed else 0, hidden=20 if seed else 33,
               agent_conf="logodds" if seed else "prob")
    x = torch.randn(B, 12, dtype=dtype, generator=torch.Generator().manual_seed(seed + B))
    with torch.no_grad():
        assert m.fused_reason(x) is None
        for kind, kw in CASES:
            _assert_same(_run(m, x, kind, kw, True), _run(m, x, kind, kw, False), dtype)
        out = m.run(x, details=True)  # the default takes the fused loop
        _assert_same(out, m.run(x, details=True, fused=True), dtype)


@pytest.mark.parametrize("hidden", [7, 16, 32, 48])
def test_head_kernels_over_row_widths(hidden, monkeypatch):
    """The float head with its LayerNorm folded in (AVX-512 two rows at a time, and the AVX2
    fallback): widths below one 16-float vector, whole vectors and a tail; an odd number of rows
    (the last row alone).  Both agree with the Python loop and with each other."""
    m = _model(3, torch.float32, hidden=hidden, agent_conf="logodds")
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(hidden))
    got = {}
    with torch.no_grad():
        for kernel in ("0", "1"):
            monkeypatch.setenv("DYNALAY_CPU_NO_AVX512", kernel)
            for kind, kw in CASES:
                _assert_same(_run(m, x, kind, kw, True), _run(m, x, kind, kw, False), torch.float32)
            got[kernel] = m.run_static(x, exit_threshold=1.01, details=True, fused=True).logits
    torch.testing.assert_close(got["0"], got["1"], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("hidden", [4, 20, 64])
def test_head_kernels_on_nearly_constant_states(hidden, monkeypatch):
    """States whose entries are nearly equal (saturated tanh: LayerNorm variance ~1e-6): the
    folded head must not lose the variance and the centred dot products to cancellation.  Each
    kernel against a float64 reference of the head on the same states, no worse than the Python
    loop's float32 LayerNorm (before the shift the AVX-512 kernel was off by 1.4e-3 at H = 4)."""
    m = _model(18, torch.float32, hidden=hidden)
    with torch.no_grad():
        m.encoder.weight.mul_(8.0)  # tanh saturates: rows of nearly +-1
        x = torch.randn(300, 12, generator=torch.Generator().manual_seed(hidden))
        ref = m.double().head(torch.tanh(m.encoder(x.double()))).float()
        m.float()
        stop = torch.full((300, m.cfg.max_steps), m.nop)  # every row stops at once: logits = head(h0)
        py = m.run(x, policy="forced", forced=stop, fused=False).logits
        err_py = (py - ref).abs().max().item()
        for kernel in ("0", "1"):
            monkeypatch.setenv("DYNALAY_CPU_NO_AVX512", kernel)
            got = m.run(x, policy="forced", forced=stop, fused=True).logits
            assert (got - ref).abs().max().item() <= max(2 * err_py, 2e-5), kernel


@pytest.mark.parametrize("conf_feature", ["prob", "logodds"])
def test_kernels_match_the_pure_python_features(conf_feature):
    """The C++ decision (run_model, agent_decide) against the all-Python loop (head_stats and
    Policy.forward: what run(record=True) and the training tree use), float64: same actions."""
    m = _model(4, torch.float64, agent_state_dim=3, agent_conf=conf_feature)
    with torch.no_grad():
        m.policy.step_bias.zero_()  # NOP and the layers close: decisions turn on the features
    x = torch.randn(200, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        for lam in (0.02, 0.3, 2.0):
            want = m.run(x, lam=lam, details=True, record=True, fused=False)
            got = m.run(x, lam=lam, details=True, fused=True)
            assert 0 < int((want.actions == m.nop).sum()) < want.actions.numel()
            assert torch.equal(got.actions, want.actions)
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-12, atol=1e-12)


def test_confidence_feature_keeps_nan():
    """A NaN logit row gives a NaN confidence in both modes, in C++ as in Python (not a clipped
    number that would look like a real confidence)."""
    m = _model(2, torch.float64)
    w = [t.detach() for t in m._agent_weights()[:6]]
    logits = torch.randn(3, 5, dtype=torch.float64)
    logits[1, 2] = float("nan")
    hist = torch.rand(3, m.cfg.history_dim, dtype=torch.float64)
    for mode, name in enumerate(("prob", "logodds")):
        conf = torch.ops.dynalay_C.agent_decide(logits, None, hist, torch.full((3,), -1), w, 0, 0.0, mode)[1]
        assert conf.isnan().tolist() == [False, True, False]
        assert head_stats(logits, name)[0][:, 0].isnan().tolist() == [False, True, False]


def test_fused_loop_stops_and_recomputes():
    """All rows NOP at step 0 (no solve at all), and a layer picked again (recomputation)."""
    m = _model(5)
    x = torch.randn(40, 12)
    with torch.no_grad():
        m.policy.step_bias[0, m.nop] = 50.0
        a = m.run(x, fused=True, details=True)
        assert a.rows_per_step == [] and (a.steps == 0).all() and (a.actions[:, 0] == m.nop).all()
        _assert_same(a, m.run(x, fused=False, details=True), torch.float32)
        m.policy.step_bias.zero_()
        m.policy.step_bias[:, 1] = 50.0  # layer 1 at every step
        a = m.run(x, fused=True, details=True)
        assert (a.actions == 1).all() and a.rows_per_step == [40] * 4
        _assert_same(a, m.run(x, fused=False, details=True), torch.float32)


def test_when_the_fused_loop_runs():
    m = _model(0)
    x = torch.randn(8, 12)
    with torch.no_grad():
        assert m.fused_reason(x) is None
        for kw, why in ((dict(budget=1e9), "budget"), (dict(policy="sample"), "sampled"),
                        (dict(compact=False), "compact"), (dict(lam=torch.full((8,), 0.3)), "tensor")):
            assert why in m.fused_reason(x, **kw)
            with pytest.raises(RuntimeError, match="fused=True"):
                m.run(x, fused=True, **kw)
    assert "training" in m.fused_reason(x)  # gradient enabled
    with pytest.raises(RuntimeError, match="training"):
        m.run(x, fused=True)
    m.train()
    with torch.no_grad():
        assert "training" in m.fused_reason(x)
    with torch.no_grad():
        assert "backend" in DynaLay(DynaLayConfig(12, 5, hidden=8, backend="torch")).eval().fused_reason(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("P", [0, 4])
@pytest.mark.parametrize("conf_feature", ["prob", "logodds"])
def test_agent_decide_is_policy_forward(dtype, P, conf_feature):
    """The kernel's features, logits and argmax against Policy.forward (ATen, same dtype); the
    confidence feature against its float64 formula (the max probability, or clip(log(p / (1 - p)),
    -6, 6) / 3), with logits that clip at both ends and tied maxima."""
    m = _model(3, dtype, agent_state_dim=P, agent_conf=conf_feature)
    g = torch.Generator().manual_seed(7)
    n, C, L, T, HD = 97, m.cfg.num_classes, m.cfg.num_layers, m.cfg.max_steps, m.cfg.history_dim
    logits = 3 * torch.randn(n, C, generator=g, dtype=dtype)
    logits[0, 1] += 40.0  # log-odds clipped at +6
    logits[1] = 0.0  # all tied: p = 1/C
    logits[2, :2] = 5.0  # two tied maxima
    logits[3] = 1e-3 * logits[3]  # nearly uniform
    proj = torch.randn(n, P, generator=g, dtype=dtype) if P else None
    hist = torch.rand(n, HD, generator=g, dtype=dtype)
    prev = torch.randint(-1, C, (n,), generator=g)
    w = [t.detach() for t in m._agent_weights()[:6]]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for t in range(T):
        for nop_bias in (0.0, 0.9):
            a, conf, pred = torch.ops.dynalay_C.agent_decide(logits, proj, hist, prev, w, t, nop_bias,
                                                             m.cfg.conf_mode)
            p = F.softmax(logits, 1)
            ent = -(p * p.log()).sum(1, keepdim=True) / math.log(C)
            p64 = F.softmax(logits.double(), 1).amax(1, keepdim=True)
            want = p64 if conf_feature == "prob" else (p64.log() - (-p64).log1p()).clamp(-6, 6) / 3
            want = want.to(dtype)
            assert conf_feature == "prob" or want[0].item() == 2.0
            f = torch.cat(([proj] if P else []) + [want, ent, (logits.argmax(1) != prev).to(dtype)[:, None], hist], 1)
            with torch.no_grad():
                gl = m.policy(f, t)
            gl[:, L] += nop_bias
            assert torch.equal(pred, logits.argmax(1))
            torch.testing.assert_close(conf, want[:, 0], rtol=tol, atol=tol)
            mine = head_stats(logits, conf_feature)  # the Python loop's features agree
            torch.testing.assert_close(mine[0][:, 0], want[:, 0], rtol=tol, atol=tol)
            assert torch.equal(mine[2], pred)
            top2 = gl.topk(2, 1).values
            clear = (top2[:, 0] - top2[:, 1]) > 1e-4  # rows without a near-tie
            assert clear.float().mean() > 0.9
            assert torch.equal(a[clear], gl.argmax(1)[clear])


def _fused_args(m, x, forced=None, exit_threshold=None):
    c, ln, hl, enc = m.cfg, m.head[0], m.head[1], m.encoder
    d = lambda t: t.detach()  # noqa: E731
    agent = [] if forced is not None else [d(t) for t in m._agent_weights()]
    return (x, d(enc.weight), d(enc.bias), d(m.pool.U), d(m.pool.effective_weight()), d(m.pool.b),
            *SolverConfig(c.tol, c.max_iter).validate().op_args(), d(ln.weight), d(ln.bias), ln.eps, d(hl.weight),
            d(hl.bias), agent, 0.0, c.lam_feature(0.3), forced, exit_threshold, c.max_steps, m.costs.constants,
            c.conf_mode)


def test_opcheck_and_bad_input():
    m = _model(1, agent_state_dim=3)
    x = torch.randn(23, 12)
    with torch.no_grad():
        args = _fused_args(m, x)
        torch.library.opcheck(torch.ops.dynalay_C.run_model.default, args)
        torch.library.opcheck(torch.ops.dynalay_C.run_model.default,
                              _fused_args(m, x, forced=m.static_actions(23), exit_threshold=0.4))
        w = [t.detach() for t in m._agent_weights()[:6]]
        HD = m.cfg.history_dim
        for mode in (0, 1):
            torch.library.opcheck(torch.ops.dynalay_C.agent_decide.default,
                                  (torch.randn(9, 5), torch.randn(9, 3), torch.rand(9, HD), torch.full((9,), -1), w,
                                   2, 0.5, mode))
        with pytest.raises(RuntimeError, match="conf_mode must be 0"):
            torch.ops.dynalay_C.agent_decide(torch.randn(9, 5), torch.randn(9, 3), torch.rand(9, HD),
                                             torch.full((9,), -1), w, 2, 0.5, 2)
        with pytest.raises(RuntimeError, match="conf_mode must be 0"):
            torch.ops.dynalay_C.run_model(*args[:-1], -1)
        bad = list(args)
        bad[21] = m.static_actions(23)  # both agent weights and a forced table
        with pytest.raises(RuntimeError, match="either agent weights or a forced"):
            torch.ops.dynalay_C.run_model(*bad)
        bad = list(_fused_args(m, x, forced=m.static_actions(23)))
        bad[21] = m.static_actions(23)[:, :2]
        with pytest.raises(RuntimeError, match="forced must be"):
            torch.ops.dynalay_C.run_model(*bad)
        bad[21] = m.static_actions(23).clone()
        bad[21][5, 1] = 9
        with pytest.raises(RuntimeError, match="forced actions must lie"):
            torch.ops.dynalay_C.run_model(*bad)
        bad = list(args)
        bad[18] = bad[18][:5]  # truncated agent weight list
        with pytest.raises(RuntimeError, match="agent weights"):
            torch.ops.dynalay_C.run_model(*bad)
        bad = list(args)
        bad[1] = bad[1][:, :5]  # encoder weight of the wrong width
        with pytest.raises(RuntimeError, match="encoder weight"):
            torch.ops.dynalay_C.run_model(*bad)
        bad = list(args)
        bad[24] = [1.0, 2.0]
        with pytest.raises(RuntimeError, match="costs are"):
            torch.ops.dynalay_C.run_model(*bad)
        with pytest.raises(RuntimeError, match="step 4 out of range"):
            torch.ops.dynalay_C.agent_decide(torch.randn(9, 5), torch.randn(9, 3), torch.rand(9, HD),
                                             torch.full((9,), -1), w, 4, 0.0)


_THREADS_SCRIPT = r"""
import sys, torch
from dynalay.models import DynaLay, DynaLayConfig
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
m = DynaLay(DynaLayConfig(in_features=12, num_classes=5, hidden=48, num_layers=3, max_steps=4, max_iter=6,
                          tol=1e-3, agent_state_dim=4)).eval()
x = torch.randn(777, 12)
with torch.no_grad():
    m.policy.step_bias[1:, m.nop] = 0.8
    out = {k: list(m.run(x, details=True, fused=True, **kw)[:4]) for k, kw in (("agent", {}), ("nop", {"nop_bias": 1.0}))}
    out["static"] = list(m.run_static(x, details=True, fused=True)[:4])
torch.save(out, sys.argv[2])
"""


def test_fused_loop_does_not_depend_on_the_thread_count(tmp_path):
    """Chunks and blocks depend on B and H only: 1, 2 or 3 threads give the same bits."""
    script = tmp_path / "run.py"
    script.write_text(_THREADS_SCRIPT)
    res = []
    for threads in (1, 2, 3):
        path = tmp_path / f"out{threads}.pt"
        p = subprocess.run([sys.executable, str(script), str(threads), str(path)], capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        res.append(torch.load(path))
    for k in res[0]:
        for a, b, c in zip(res[0][k], res[1][k], res[2][k]):
            assert torch.equal(a, b) and torch.equal(a, c), k


def test_inference_weight_is_the_effective_weight():
    """Same values, column-major on CPU (the solves' GEMMs then use MKL's NN kernel); runs with
    either layout agree (the GEMM kernels round differently)."""
    m = _model(2, hidden=40)
    x = torch.randn(90, 12)
    with torch.no_grad():
        W, Wc = m.pool.effective_weight(), m.inference_weight()
        assert torch.equal(W, Wc) and Wc.transpose(1, 2).is_contiguous() and not Wc.requires_grad
        for kind, kw in CASES:
            a = _run(m, x, kind, dict(kw, W=Wc), True)
            b = _run(m, x, kind, dict(kw, W=W), False)
            _assert_same(a, b, torch.float32)
