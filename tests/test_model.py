"""The DynaLay model: NOP leaves the batch, compact == NOP-action dispatch, FLOP accounting,
the hard budget, the knobs, and a tiny end-to-end train/eval on digits."""
import math

import pytest
import torch

import dynalay
import dynalay.models.dynalay as dmod
from dynalay.models import DynaLay, DynaLayConfig, MLPBaseline, mlp_hidden_for_params
from dynalay.models.dynalay import head_stats


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(in_features=12, num_classes=5, hidden=16, num_layers=3, max_steps=4, max_iter=5, tol=1e-3)
    cfg.update(kw)
    m = DynaLay(DynaLayConfig(**cfg)).eval()
    return m


class _Counter:
    """Wraps dynamic_step: records the rows and actions each call receives."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = dmod.dynamic_step

        def wrapped(h, actions, *a, **k):
            self.calls.append(actions.clone())
            return real(h, actions, *a, **k)

        monkeypatch.setattr(dmod, "dynamic_step", wrapped)


def test_nop_removes_rows_from_later_steps(monkeypatch):
    m = _model()
    cnt = _Counter(monkeypatch)
    B, L, T = 40, 3, 4
    forced = m.static_actions(B)
    forced[:10, 1] = L    # 10 rows stop after one layer
    forced[10:25, 2] = L  # 15 rows stop after two layers
    x = torch.randn(B, 12)
    with torch.no_grad():  # the Python loop (the counter sees its dynamic_step calls)
        out = m.run(x, policy="forced", forced=forced, details=True, fused=False)
    assert [len(c) for c in cnt.calls] == [40, 30, 15, 15]
    assert out.rows_per_step == [40, 30, 15, 15]
    for c in cnt.calls:  # with compaction no NOP row is ever handed to the op
        assert (c < L).all()
    assert out.steps.tolist() == [1] * 10 + [2] * 15 + [4] * 15
    assert (out.step_iters[:10, 1:] == 0).all() and (out.step_iters[10:25, 2:] == 0).all()
    if dynalay.backends.availability_error("cpp") is None:  # the one-call C++ loop counts the same rows
        with torch.no_grad():
            fo = m.run(x, policy="forced", forced=forced, details=True, fused=True)
        assert fo.rows_per_step == [40, 30, 15, 15] and torch.equal(fo.steps, out.steps)
    # the agent: a large NOP bias after step 0 stops everyone -> a single op call
    cnt.calls.clear()
    with torch.no_grad():
        m.policy.step_bias[1:, L] = 50.0
        m.policy.step_bias[0, L] = -50.0
        out = m.run(torch.randn(B, 12), fused=False)
    assert [len(c) for c in cnt.calls] == [B] and out.rows_per_step == [B]
    assert (out.steps == 1).all()


def test_nop_rows_cost_nothing_without_compaction(monkeypatch):
    """With compact=False finished rows are passed with action NOP: they spend no iterations."""
    m = _model(1)
    cnt = _Counter(monkeypatch)
    forced = m.static_actions(20, steps=2)
    forced[:5, 1] = m.nop
    with torch.no_grad():
        out = m.run(torch.randn(20, 12), policy="forced", forced=forced, compact=False, details=True)
    assert [len(c) for c in cnt.calls] == [20, 20]
    assert (cnt.calls[1][:5] == m.nop).all()
    assert (out.step_iters[:5, 1] == 0).all() and (out.step_iters[5:, 1] > 0).all()


@pytest.mark.parametrize("policy", ["greedy", "forced", "early_exit"])
@pytest.mark.parametrize("lam", [0.02, 0.3, 2.0])
def test_compact_and_nop_action_dispatch_agree(policy, lam):
    m = _model(2)
    with torch.no_grad():
        m.policy.step_bias[1:, m.nop] = 0.8  # some rows stop at every step
        x = torch.randn(64, 12)
        kw = {}
        if policy == "greedy":
            kw = dict(lam=lam)
        elif policy == "forced":
            f = m.static_actions(64)
            f[torch.arange(64) % 3 == 0, 2] = m.nop
            kw = dict(policy="forced", forced=f)
        else:
            kw = dict(policy="forced", forced=m.static_actions(64), exit_threshold=0.25 + lam / 10)
        a = m.run(x, details=True, fused=False, **kw)  # the fused loop: tests/test_model_fused.py
        b = m.run(x, compact=False, details=True, **kw)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.step_iters, b.step_iters)
    assert torch.equal(a.flops, b.flops) and torch.equal(a.steps, b.steps)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)


def test_flops_follow_the_iterations_actually_spent():
    m = _model(3)
    c = m.costs
    H, D, C = 16, 12, 5
    with torch.no_grad():
        out = m.run_static(torch.randn(30, 12), details=True)
    it = out.step_iters.to(torch.float64).sum(1)
    want = 2 * D * H + H + 4 * 2 * H * H + it * 2 * H * H + 2 * H * C + 5 * H
    torch.testing.assert_close(out.flops, want)
    assert c.per_iter == 2 * H * H and c.layer_fixed == 2 * H * H
    # truncation after k steps spends only k solves
    with torch.no_grad():
        t1 = m.run_static(torch.randn(30, 12), steps=1)
    assert (t1.steps == 1).all() and (t1.flops < out.flops.min()).all()
    assert set(m.cost_table()) >= {"layer0", "layer1", "layer2", "nop", "encoder", "head", "agent"}


@pytest.mark.parametrize("seed", range(4))
def test_hard_budget_is_never_exceeded(seed):
    m = _model(seed, max_iter=7)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.policy.step_bias[:, m.nop] = -5.0  # the agent wants to compute everywhere
        x = torch.randn(50, 12, generator=g)
        full = m.run(x).flops.mean().item()
        lo = m.costs.encoder + m.costs.head + m.costs.agent
        for frac in (0.0, 0.05, 0.2, 0.37, 0.5, 0.8, 1.0, 1.3):
            budget = lo + frac * (full - lo)
            for lam in (0.02, 0.5):
                out = m.run(x, budget=budget, lam=lam)
                assert out.flops.sum().item() <= budget * 50 * (1 + 1e-12)
        # a generous budget changes nothing
        assert torch.equal(m.run(x, budget=10 * full).flops, m.run(x).flops)
        with pytest.raises(ValueError, match="below the minimum"):
            m.run(x, budget=lo * 0.5)


@pytest.mark.parametrize("nop_bias", [-3.0, -math.inf])
def test_hard_budget_ties_are_broken_by_row_order(nop_bias):
    """Rows of equal preference (duplicate inputs; or an infinite nop_bias, which makes every
    preference +inf) are admitted in row order, so ``compact=False`` stays identical to
    compaction under a budget; an enormous finite budget is no budget."""
    m = _model(7, max_iter=7)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        x = torch.randn(6, 12, generator=g).repeat(5, 1)  # every input five times
        full = m.run(x, nop_bias=nop_bias).flops.mean().item()
        lo = m.costs.encoder + m.costs.head + m.costs.agent
        for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
            budget = lo + frac * (full - lo)
            a = m.run(x, budget=budget, nop_bias=nop_bias, details=True)
            b = m.run(x, budget=budget, nop_bias=nop_bias, details=True, compact=False)
            assert torch.equal(a.actions, b.actions) and torch.equal(a.flops, b.flops)
            assert a.flops.sum().item() <= budget * x.shape[0] * (1 + 1e-12)
            assert torch.equal(a.logits, b.logits)
        for huge in (1e308, 1.7976931348623157e308):
            assert torch.equal(m.run(x, budget=huge, nop_bias=nop_bias).flops, m.run(x, nop_bias=nop_bias).flops)


@pytest.mark.parametrize("nop_bias", [math.inf, -math.inf])
def test_infinite_nop_bias_with_the_sampled_policy(nop_bias):
    """+inf: every row stops at once (the softmax's limit), -inf: no row stops before the last
    step; the training fields stay finite (log-prob 0 / entropy 0 where one action is certain)."""
    m = _model(8).train()
    x = torch.randn(9, 12)
    out = m.run(x, policy="sample", record=True, nop_bias=nop_bias, generator=torch.Generator().manual_seed(0))
    steps = ((out.actions >= 0) & (out.actions < m.nop)).sum(1)  # -1: after the row stopped
    assert (steps == (0 if nop_bias > 0 else m.cfg.max_steps)).all()
    assert torch.isfinite(out.log_probs).all() and torch.isfinite(out.entropy).all()
    if nop_bias > 0:
        assert (out.log_probs == 0).all() and (out.entropy == 0).all()
    (out.log_probs.sum() + out.entropy.sum() + out.values.sum()).backward()
    with torch.no_grad():
        g = m.eval().run(x, policy="sample", nop_bias=nop_bias, generator=torch.Generator().manual_seed(0))
    assert torch.equal(g.flops, m.run(x, nop_bias=nop_bias).flops)  # the greedy policy agrees


def test_knobs_move_compute():
    m = _model(4)
    with torch.no_grad():
        m.policy.step_bias.zero_()
        x = torch.randn(80, 12)
        f = [m.run(x, nop_bias=b).flops.mean().item() for b in (-10.0, 0.0, 10.0)]
    assert f[0] >= f[1] >= f[2] and f[0] > f[2]


def test_training_fields_and_gradients():
    m = _model(5).train()
    x = torch.randn(16, 12)
    out = m.run(x, policy="sample", record=True, generator=torch.Generator().manual_seed(0),
                lam=torch.full((16,), 0.3, dtype=torch.float64))
    assert out.log_probs.shape == (16, 4) and out.decided.any()
    assert (out.log_probs[~out.decided] == 0).all()
    (out.log_probs.sum() + out.values.sum()).backward()
    assert m.policy.inp.weight.grad.abs().sum() > 0
    loss = torch.nn.functional.cross_entropy(out.logits, torch.zeros(16, dtype=torch.long))
    m.zero_grad()
    loss.backward()
    assert m.pool.U.grad is not None and m.pool.W.grad is not None and m.encoder.weight.grad is not None


def test_input_validation():
    m = _model()
    with pytest.raises(ValueError):
        m.run(torch.randn(3, 7))
    with pytest.raises(ValueError):
        m.run(torch.randn(3, 12), policy="bogus")
    with pytest.raises(ValueError):
        m.run(torch.randn(3, 12), policy="forced")
    with pytest.raises(ValueError):
        DynaLayConfig(in_features=3, num_classes=2, hidden=0).validate()
    with pytest.raises(ValueError, match="agent_conf"):
        DynaLayConfig(in_features=3, num_classes=2, agent_conf="entropy").validate()
    with pytest.raises(ValueError, match="conf must be one of"):
        head_stats(torch.randn(3, 4), "entropy")


@pytest.mark.parametrize("x, lam, match", [
    (torch.randn(5, 12, dtype=torch.float64), None, "model's dtype"),
    (torch.randn(5, 12, dtype=torch.float16), None, "model's dtype"),
    (torch.randn(5, 12, device="meta"), None, "model's dtype and device"),
    (torch.randn(5, 12), torch.full((3,), 0.1), r"lam as a tensor .*\(3,\)"),
    (torch.randn(5, 12), torch.full((5, 1), 0.1), r"lam as a tensor .*\(5, 1\)"),
    (torch.randn(5, 12), torch.ones(5, dtype=torch.int64), "lam as a tensor .*int64"),
    (torch.randn(5, 12), torch.ones(5, device="meta"), "lam as a tensor .*meta"),
])
def test_run_names_a_mismatched_input_or_lambda(x, lam, match):
    """x of another dtype/device than the model and a lambda tensor of the wrong shape, dtype or
    device: a ValueError naming it (they used to fail deep inside torch: 'mat1 and mat2 must have
    the same dtype', 'The expanded size ... must match'; an int64 lambda ran)."""
    m = _model()
    with pytest.raises(ValueError, match=match), torch.no_grad():
        m.run(x, lam=lam)


def test_lambda_as_a_scalar_tensor_equals_the_float():
    m = _model(1)
    x = torch.randn(9, 12)
    with torch.no_grad():
        a, b = m.run(x, lam=torch.tensor(0.1), details=True), m.run(x, lam=0.1, details=True)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.flops, b.flops)
    torch.testing.assert_close(a.logits, b.logits)


def test_cost_model_charges_the_logodds_feature():
    """The log-odds confidence costs C + 2 FLOPs more per agent evaluation (a sum, a log, a clip)."""
    kw = dict(in_features=12, num_classes=7, hidden=16)
    a = DynaLay(DynaLayConfig(**kw, agent_conf="prob")).costs.agent
    b = DynaLay(DynaLayConfig(**kw, agent_conf="logodds")).costs.agent
    assert b - a == 7 + 2


def test_mlp_baseline_size():
    w = mlp_hidden_for_params(40, 10, 100_000)
    m = MLPBaseline(40, 10, w)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - 100_000) / 100_000 < 0.02
    assert m.flops_per_sample() > 0 and math.isfinite(m.flops_per_sample())


def test_static_tables_and_fused_weights_follow_the_model():
    """static_actions' per-(steps, device) row cache and the fused path's direct parameter reads
    give what the attribute path gives, also after a returned table is written to and after a
    submodule is replaced."""
    m = _model(2, agent_state_dim=3)
    T, L = m.cfg.max_steps, m.cfg.num_layers
    for k in range(T + 1):
        want = torch.tensor([[t % L if t < k else L for t in range(T)]] * 3)
        a = m.static_actions(3, steps=k if k < T else None)
        assert torch.equal(a, want)
        a.fill_(0)  # a copy: the cached row is untouched
        assert torch.equal(m.static_actions(3, steps=k if k < T else None), want)
    with pytest.raises(ValueError, match="steps"):
        m.static_actions(2, steps=T + 1)
    pol = m.policy
    attr = [pol.inp.weight, pol.inp.bias, pol.step_emb, pol.out.weight, pol.out.bias, pol.step_bias,
            pol.proj.weight, pol.proj.bias]
    assert all(p is q for p, q in zip(m._agent_weights(), attr, strict=True))
    m.eval()
    x = torch.randn(5, m.cfg.in_features)
    with torch.no_grad():
        ref = m.run(x, fused=False).logits
        torch.testing.assert_close(m.run(x, fused=True).logits, ref)
        m.head[1] = torch.nn.Linear(m.cfg.hidden, m.cfg.num_classes)  # a new head: the fused path reads it
        torch.testing.assert_close(m.run(x, fused=True).logits, m.run(x, fused=False).logits)
        assert not torch.allclose(m.run(x, fused=True).logits, ref)
    m0 = _model(3)
    assert len(m0._agent_weights()) == 6  # no state projection
