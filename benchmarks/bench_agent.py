"""Issue "The DynaLay model": one epoch of the agent's training, exact policy gradient vs REINFORCE.

The default model (H = 256, L = T = 4, max_iter = 6) on MNIST-1D's held-out split (800 samples,
batches of 64: 13 steps an epoch), 2 threads, float32, the backbone as initialised (a trained
one spends fewer iterations per solve, ~4.5 instead of up to 6; both methods' solves shrink alike):

  tree_build       ``dynalay.train.tree.build_tree`` on the 800 samples: every state reachable in
                   T steps (340 row solves per sample, one ``dynamic_step`` per level).  Once per
                   agent phase (the tree method's fixed cost).
  tree_epoch       13 steps of the exact policy gradient on that tree (``Trainer._tree_step``):
                   the policy on the 85 decision nodes of each sample, backward induction, Adam.
  reinforce_epoch  13 REINFORCE steps (``Trainer._agent_step``): 8 sampled trajectories per
                   input through ``DynaLay.run`` (the Python loop, record=True), rloo baseline.

An agent phase is 300 epochs: tree = tree_build + 300 x tree_epoch, REINFORCE = 300 x
reinforce_epoch.
"""
from __future__ import annotations

import pytest
import torch

from benchlib import record_env, timed
from dynalay.train.data import load_data
from dynalay.train.trainer import Trainer, TrainConfig, _gen


@pytest.fixture(scope="module")
def trainer():
    cfg = TrainConfig(seed=0, agent_method="tree")
    data = load_data("mnist1d", cfg.val_fraction, split_seed=0)
    tr = Trainer(cfg, data, None, progress=False, log=lambda *a: None)
    tr.model.train()
    return tr


def _epoch(tr: Trainer, step) -> None:
    c = tr.cfg
    n = len(tr.agent_idx)
    perm = torch.randperm(n, generator=_gen(0, 2, 0, 2))
    g = _gen(0, 2, 0, 3)
    for s in range(0, n, c.agent_batch):
        step(perm[s:s + c.agent_batch], g)


@pytest.mark.parametrize("case", ["tree_build", "tree_epoch", "reinforce_epoch"])
def test_agent_training(benchmark, trainer, case):
    tr = trainer
    record_env(benchmark)
    benchmark.group = "agent-epoch"
    benchmark.extra_info.update(case=case, samples=len(tr.agent_idx), batch=tr.cfg.agent_batch,
                                rollouts=tr.cfg.rollouts)
    v = tr.data.val
    if case == "tree_build":
        timed(benchmark, tr._build_trees)
        assert tr._tree.num_samples == len(tr.agent_idx)
        return
    if case == "tree_epoch":
        if tr._tree is None:
            tr._build_trees()
        timed(benchmark, lambda: _epoch(tr, lambda pos, g: tr._tree_step(pos, g, 0.05)))
    else:
        timed(benchmark, lambda: _epoch(tr, lambda pos, g: tr._agent_step(v.x[tr.agent_idx[pos]],
                                                                          v.y[tr.agent_idx[pos]], g)))
