"""The exact policy gradient of the agent (dynalay.train.tree) against DynaLay.run + compute_rewards.

The oracle: every trajectory of a small model (L layers, T steps) is run through ``DynaLay.run``
itself, with the agent's decisions forced along the path (a hook on the policy that records the
features the real policy sees and its probabilities), and scored by ``compute_rewards`` (the
REINFORCE path's reward).  The tree must give the same features, the same per-trajectory rewards
and so the same expected reward, per sample; its greedy value must be the reward of a greedy run.
"""
import itertools

import pytest
import torch

from dynalay.models import DynaLay, DynaLayConfig
from dynalay.train.reward import RewardConfig, compute_rewards
from dynalay.train.tree import build_tree, expected_return

L, T, B = 2, 3, 5


def _model(agent_state_dim=0, seed=0):
    torch.manual_seed(seed)
    cfg = DynaLayConfig(in_features=7, num_classes=4, hidden=12, num_layers=L, max_steps=T, tol=1e-9,
                        max_iter=60, agent_state_dim=agent_state_dim, agent_hidden=8)
    m = DynaLay(cfg).double().eval()
    with torch.no_grad():  # a policy far from its prior, so that every path has weight
        for p in m.policy.parameters():
            p.add_(torch.randn_like(p) * 0.7)
    return m


def _paths():
    """Every trajectory: k layers (k = 0..T) then NOP when k < T."""
    for k in range(T + 1):
        for layers in itertools.product(range(L), repeat=k):
            yield list(layers) + ([L] if k < T else [])


def _run_path(m, x, path, lam):
    """DynaLay.run along ``path`` (the same for every row); returns (output, features per step,
    the real policy's probability of the path per row)."""
    real = m.policy.forward
    feats, prob = [], torch.ones(x.shape[0], dtype=torch.float64)

    def forced(f, t):
        g = real(f, t)
        feats.append(f.detach().clone())
        nonlocal prob
        prob = prob * torch.softmax(g.detach(), 1)[:, path[t]]
        out = torch.full_like(g, -1e9)
        out[:, path[t]] = 0.0
        return out

    m.policy.forward = forced
    try:
        with torch.no_grad():
            out = m.run(x, policy="greedy", lam=lam, record=True, compact=False, fused=False)
    finally:
        del m.policy.forward
    return out, feats, prob


@pytest.mark.parametrize("agent_state_dim", [0, 3])
def test_tree_matches_the_model_run_on_every_path(agent_state_dim):
    m = _model(agent_state_dim)
    rc = RewardConfig(mu_repeat=0.03, mu_stale=0.07, stale_delta=1.0)  # a random model: changes ~0.6-1.5
    x = torch.randn(B, 7, dtype=torch.float64) * 2
    y = torch.randint(0, 4, (B,))
    lam = torch.rand(B, dtype=torch.float64) * 1.5 + 0.05
    cost_ref = m.static_flops_per_sample()
    tree = build_tree(m, x, y, rc, cost_ref, chunk=2)  # chunks: samples expanded a few at a time
    tv = expected_return(m, tree, lam)
    expect = torch.zeros(B, dtype=torch.float64)
    total_p = torch.zeros(B, dtype=torch.float64)
    n_stale = 0
    for path in _paths():
        out, feats, prob = _run_path(m, x, path, lam)
        R = compute_rewards(out.actions, out.step_flops, out.state_change, out.logits, y, L, cost_ref, rc,
                            out.decided, lam=lam)
        expect += prob * R.total
        total_p += prob
        n_stale += int(R.stale.sum())
        # the features the run computed at every node of the path == the tree's at that node
        node = 0
        for t, f in enumerate(feats):
            tf = tree.feats[t][:, node].clone()
            tf[:, tree.lam_col] = m.cfg.lam_feature(lam)
            if agent_state_dim:
                tf = torch.cat([m.policy.proj(tree.states[t][:, node]).detach(), tf], 1)
            torch.testing.assert_close(f, tf, rtol=1e-12, atol=1e-12)
            if path[t] < L:
                node = node * L + path[t]
    torch.testing.assert_close(total_p, torch.ones(B, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tv.value.detach(), expect, rtol=1e-10, atol=1e-12)
    assert 0 < n_stale < 5 * 15 * T  # the redundancy penalty was exercised, not everywhere
    # the greedy value is the reward of a greedy run, per sample
    gv = expected_return(m, tree, lam, greedy=True).value
    with torch.no_grad():
        og = m.run(x, policy="greedy", lam=lam, record=True, fused=False)
    Rg = compute_rewards(og.actions, og.step_flops, og.state_change, og.logits, y, L, cost_ref, rc, og.decided,
                         lam=lam)
    torch.testing.assert_close(gv, Rg.total, rtol=1e-10, atol=1e-12)


def test_tree_gradient_is_the_exact_policy_gradient():
    """d E[R] / d theta by autograd through the tree == sum over trajectories of
    R(traj) * d P(traj) / d theta, with P from the real policy (finite differences of the oracle)."""
    m = _model()
    rc = RewardConfig()
    x = torch.randn(3, 7, dtype=torch.float64)
    y = torch.randint(0, 4, (3,))
    lam = torch.tensor([0.1, 0.5, 1.5], dtype=torch.float64)
    tree = build_tree(m, x, y, rc, m.static_flops_per_sample())
    w = m.policy.out.bias
    v = expected_return(m, tree, lam).value.sum()
    (g,) = torch.autograd.grad(v, w)

    def oracle():
        tot = 0.0
        for path in _paths():
            out, _, prob = _run_path(m, x, path, lam)
            R = compute_rewards(out.actions, out.step_flops, out.state_change, out.logits, y, L,
                                m.static_flops_per_sample(), rc, out.decided, lam=lam)
            tot += float((prob * R.total).sum())
        return tot

    eps = 1e-6
    fd = torch.zeros_like(w)
    for i in range(w.numel()):
        with torch.no_grad():
            w[i] += eps
        hi = oracle()
        with torch.no_grad():
            w[i] -= 2 * eps
        lo = oracle()
        with torch.no_grad():
            w[i] += eps
        fd[i] = (hi - lo) / (2 * eps)
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-8)


def test_tree_bad_input():
    m = _model()
    x = torch.randn(4, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="cost_ref"):
        build_tree(m, x, torch.zeros(4, dtype=torch.int64), RewardConfig(), 0.0)
    with pytest.raises(ValueError, match="y"):
        build_tree(m, x, torch.zeros(3, dtype=torch.int64), RewardConfig(), 1.0)
    tree = build_tree(m, x, torch.zeros(4, dtype=torch.int64), RewardConfig(), 1.0)
    with pytest.raises(ValueError, match="lam"):
        expected_return(m, tree, torch.ones(3, dtype=torch.float64))
