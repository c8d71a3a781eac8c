"""The exact policy gradient of DynaLay's agent over the enumerated decision tree.

With the backbone frozen, a sample's episode is deterministic given its actions: from the input
state, every step either stops (NOP) or applies one of ``L`` layers, for at most ``T`` steps.  So
all the states a sample can ever visit form a tree with ``L^d`` nodes at depth ``d`` (``1 + L +
... + L^T`` in all: 341 for ``L = T = 4``), and a whole split's tree is a few hundred thousand row
solves, seconds on a CPU.

:func:`build_tree` runs those solves once (level by level, one ``dynamic_step`` per level) and
caches what the agent and the reward need at every node: the agent's introspection features (the
same ones ``DynaLay.run`` computes along a path, the price ``lam`` left out), the accuracy term of
stopping there, and for every edge the cost charged to the decision and its redundancy penalty
(:mod:`dynalay.train.reward`, the same terms and weights).

:func:`expected_return` then evaluates the policy at every decision node and computes, by
backward induction,

    V(n) = pi(NOP | n) A(n) + sum_l pi(l | n) [ -lam c(n, l) / C_ref - pen(n, l) + V(child(n, l)) ]

(``V = A`` at depth ``T``), the *exact* expected reward of the stochastic policy from the input
state.  Its gradient is the exact policy gradient: no sampled trajectories, no baseline, no
variance.  REINFORCE (``agent_method="reinforce"``) estimates the same gradient from a few
sampled trajectories per input; on MNIST-1D's 800 held-out samples its noise is what kept the
greedy agent from matching a plain confidence threshold at high ``lam``.

The entropy bonus is the entropy of the policy at every node, weighted by the (detached)
probability that the policy reaches that node.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.dynalay import advance_history_, head_stats, relative_change
from ..ops.dispatch import dynamic_step
from .reward import RewardConfig, accuracy_term


MAX_TREE_SOLVES = 2_000_000  # row solves of one tree build (800 samples at L = T = 4: 272,000, ~2 s)


def tree_solves(num_samples: int, num_layers: int, steps: int) -> int:
    """Row solves that :func:`build_tree` runs: ``N * (L + L^2 + ... + L^T)``."""
    return num_samples * sum(num_layers ** d for d in range(1, steps + 1))


class DecisionTree(NamedTuple):
    """Per depth ``d``: node ``k`` at depth ``d`` and action ``l < L`` lead to node ``k * L + l`` at
    depth ``d + 1``.  N samples, ``n_d = L^d`` nodes per sample at depth ``d``."""

    feats: List[Tensor]           # d < T: (N, n_d, feature_dim - agent_state_dim) features, lam column 0
    states: Optional[List[Tensor]]  # d < T: (N, n_d, H) LayerNorm of the state (agent_state_dim > 0 only)
    acc: List[Tensor]             # d <= T: (N, n_d) accuracy term of stopping at the node
    cost: List[Tensor]            # d < T: (N, n_d, L) cost of each layer's decision / C_ref
    penalty: List[Tensor]         # d < T: (N, n_d, L) mu_repeat * repeat + mu_stale * stale
    lam_col: int                  # index of the lam feature in feats[d]'s last dim

    @property
    def num_samples(self) -> int:
        return self.acc[0].shape[0]

    def select(self, idx: Tensor) -> "DecisionTree":
        """The sub-tree of samples ``idx``."""
        pick = (lambda ts: None if ts is None else [t.index_select(0, idx) for t in ts])
        return DecisionTree(pick(self.feats), pick(self.states), pick(self.acc), pick(self.cost),
                            pick(self.penalty), self.lam_col)


@torch.no_grad()
def build_tree(model, x: Tensor, y: Tensor, reward: RewardConfig, cost_ref: float, W: Optional[Tensor] = None,
               layer_cost: Optional[Tensor] = None, chunk: int = 200) -> DecisionTree:
    """Enumerate every path of ``model`` (a :class:`dynalay.models.DynaLay`) on ``x`` ``(N, D)``.

    layer_cost: optional ``(L,)`` cost per layer decision (the latency table of
    ``reward.cost="latency"``); default: the FLOPs the decision causes, as ``DynaLay.run``
    charges them (the solve with the iterations it spent, then the head and, before the last step,
    the agent on the new state).  ``chunk`` samples are expanded at a time (memory).
    """
    reward.validate()
    if cost_ref <= 0:
        raise ValueError(f"cost_ref must be > 0 (got {cost_ref})")
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (N, D) and y (N,) (got {tuple(x.shape)} and {tuple(y.shape)})")
    parts = [_build_chunk(model, x[i:i + chunk], y[i:i + chunk], reward, cost_ref, W, layer_cost)
             for i in range(0, x.shape[0], chunk)]
    cat = (lambda k: None if parts[0][k] is None else [torch.cat([p[k][d] for p in parts]) for d in
                                                         range(len(parts[0][k]))])
    return DecisionTree(cat(0), cat(1), cat(2), cat(3), cat(4), parts[0][5])


def _build_chunk(model, x, y, reward, cost_ref, W, layer_cost):
    cfg, cost = model.cfg, model.costs
    L, T = cfg.num_layers, cfg.max_steps
    N = x.shape[0]
    if W is None:
        W = model.pool.effective_weight()
    U, b = model.pool.U, model.pool.b
    skw = model.solve_kwargs()
    ln, head_lin = model.head[0], model.head[1]
    hs = torch.tanh(model.encoder(x))
    hist = hs.new_zeros(N, cfg.history_dim)
    prev_pred = torch.full((N,), -1, dtype=torch.int64)
    last = torch.full((N,), -1, dtype=torch.int64)  # the previous action (repeat penalty)
    hn = torch.linalg.vector_norm(hs, dim=1)
    feats, states, accs, costs, pens = [], [] if cfg.agent_state_dim > 0 else None, [], [], []
    yy = y
    for d in range(T + 1):
        n = hs.shape[0]
        zn = ln(hs)
        logits = head_lin(zn)
        accs.append(accuracy_term(logits, yy, reward).to(hs.dtype).view(N, -1))
        if d == T:
            break
        # the agent's features, as DynaLay.run computes them
        conf, ent, pred = head_stats(logits, cfg.agent_conf)
        changed = (pred != prev_pred).unsqueeze(1).to(hs.dtype)
        feats.append(torch.cat([conf, ent, changed, hist], 1).view(N, -1, 3 + cfg.history_dim))
        if states is not None:
            states.append(zn.view(N, -1, zn.shape[1]))
        # every node takes every layer: one dynamic_step over n * L rows
        h0 = hs.repeat_interleave(L, 0)
        a = torch.arange(L).repeat(n)
        r = dynamic_step(h0, a, U, W, b, **skw)
        it = r.iters.to(torch.int64)
        if layer_cost is None:
            nxt = cost.head + (cost.agent if d + 1 < T else 0.0)
            c = cost.layer(it) + nxt
        else:
            c = layer_cost.to(torch.float64)[a]
        costs.append((c / cost_ref).to(hs.dtype).view(N, -1, L))
        dh = (r.h - h0).norm(dim=1) / (h0.norm(dim=1) + 1e-6)
        rep = last.repeat_interleave(L) == a
        stale = dh.to(torch.float64) < reward.stale_delta
        pens.append((reward.mu_repeat * rep.double() + reward.mu_stale * stale.double()).to(hs.dtype).view(N, -1, L))
        # the children's history (DynaLay.run's update, for n * L rows)
        dch, n1 = relative_change(h0, r.h, hn.repeat_interleave(L))
        hist = advance_history_(hist.repeat_interleave(L, 0), a, it, r.converged, dch,
                                conf.squeeze(1).repeat_interleave(L), cfg)
        prev_pred = pred.repeat_interleave(L)
        last = a
        hn = n1
        hs = r.h
        yy = yy.repeat_interleave(L)
    return feats, states, accs, costs, pens, 3 + cfg.history_dim - 1


class TreeValue(NamedTuple):
    value: Tensor    # (N,) expected reward of the policy from the input state
    entropy: Tensor  # (N,) sum over nodes of P(reach node) * entropy of the policy there (reach detached)
    steps: Tensor    # (N,) expected number of layers applied (detached)


def expected_return(model, tree: DecisionTree, lam: Tensor, nop_bias: float = 0.0,
                    greedy: bool = False) -> TreeValue:
    """Exact expected reward of ``model.policy`` (stochastic: softmax of its logits) on the
    samples of ``tree``, each with its price of compute ``lam`` ``(N,)``; differentiable in the
    policy's parameters.  ``greedy=True``: the reward of the greedy policy (argmax at every node,
    ties to the lowest action as ``argmax`` breaks them), what evaluation runs."""
    cfg = model.cfg
    L, T = cfg.num_layers, cfg.max_steps
    N = tree.num_samples
    if lam.shape != (N,):
        raise ValueError(f"lam must have shape ({N},) (got {tuple(lam.shape)})")
    dt = tree.acc[0].dtype
    lam = lam.to(dt)
    lam_f = cfg.lam_feature(lam)
    V = tree.acc[T]
    probs: List[Tensor] = [None] * T
    ent_nodes: List[Tensor] = [None] * T
    for d in reversed(range(T)):
        f = tree.feats[d].clone()
        f[..., tree.lam_col] = lam_f[:, None]
        if tree.states is not None:
            f = torch.cat([model.policy.proj(tree.states[d]), f], -1)
        g = model.policy(f.reshape(-1, f.shape[-1]), d).view(N, -1, L + 1)
        if nop_bias:
            g = g + torch.cat([g.new_zeros(L), g.new_full((1,), float(nop_bias))])
        logp = F.log_softmax(g, -1)
        p = F.one_hot(g.argmax(-1), L + 1).to(g.dtype) if greedy else logp.exp()
        q = torch.cat([V.view(N, -1, L) - lam[:, None, None] * tree.cost[d] - tree.penalty[d],
                       tree.acc[d].unsqueeze(-1)], -1)
        V = (p * q).sum(-1)
        probs[d] = p
        ent_nodes[d] = -(p * logp).sum(-1)
    reach = torch.ones(N, 1, dtype=dt)
    ent = torch.zeros(N, dtype=dt)
    steps = torch.zeros(N, dtype=dt)
    for d in range(T):
        ent = ent + (reach * ent_nodes[d]).sum(1)
        go = reach.unsqueeze(-1) * probs[d][..., :L].detach()  # (N, n_d, L)
        steps = steps + go.sum((1, 2))
        reach = go.reshape(N, -1)
    return TreeValue(V.view(N), ent, steps)
