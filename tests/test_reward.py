"""Reward terms on hand-made trajectories."""
import math

import pytest
import torch

from dynalay.train.reward import RewardConfig, accuracy_term, compute_rewards

L = 3


def _traj():
    # sample 0: layer 0, layer 1, NOP          (two solves)
    # sample 1: NOP at once                     (no compute)
    # sample 2: layer 2, layer 2 (repeat), NOP  (the repeat barely changed the state)
    actions = torch.tensor([[0, 1, L, -1], [L, -1, -1, -1], [2, 2, L, -1]])
    cost = torch.tensor([[100.0, 200.0, 0, 0], [0, 0, 0, 0], [150.0, 50.0, 0, 0]], dtype=torch.float64)
    change = torch.tensor([[0.5, 0.3, 0, 0], [0, 0, 0, 0], [0.4, 0.001, 0, 0]])
    logits = torch.tensor([[5.0, 0, 0], [0, 0, 0], [0, 0, 3.0]])
    y = torch.tensor([0, 1, 1])
    return actions, cost, change, logits, y


def test_terms_by_hand():
    actions, cost, change, logits, y = _traj()
    cfg = RewardConfig(accuracy="correct", w_acc=1.0, lam=0.5, mu_repeat=0.1, mu_stale=0.2, stale_delta=0.01)
    r = compute_rewards(actions, cost, change, logits, y, L, cost_ref=1000.0, cfg=cfg)
    assert r.accuracy.tolist() == [1.0, 0.0, 0.0]  # sample 1: argmax of a tie is class 0, wrong
    torch.testing.assert_close(r.compute, torch.tensor([0.5 * 0.3, 0.0, 0.5 * 0.2], dtype=torch.float64))
    assert r.repeats.tolist() == [[False] * 4, [False] * 4, [False, True, False, False]]
    assert r.stale.tolist() == [[False] * 4, [False] * 4, [False, True, False, False]]
    torch.testing.assert_close(r.redundancy, torch.tensor([0.0, 0.0, 0.3], dtype=torch.float64))
    torch.testing.assert_close(r.total, r.accuracy - r.compute - r.redundancy)
    # returns-to-go: each decision pays only for the compute at and after it
    torch.testing.assert_close(r.returns[0], torch.tensor([1 - 0.15, 1 - 0.1, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(r.returns[1], torch.tensor([0.0, 0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(r.returns[2, :3], torch.tensor([-0.1 - 0.3, -0.025 - 0.3, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("term", ["logp", "prob", "both", "correct"])
def test_accuracy_terms(term):
    _, _, _, logits, y = _traj()
    cfg = RewardConfig(accuracy=term, logp_clip=2.0, w_acc=2.0)
    a = accuracy_term(logits, y, cfg)
    p = torch.softmax(logits.double(), 1).gather(1, y[:, None]).squeeze(1)
    correct = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    want = {"logp": p.log().clamp(min=-2.0), "prob": p, "both": p + correct, "correct": correct}[term]
    torch.testing.assert_close(a, 2.0 * want)


def test_lambda_prices_compute_and_per_trajectory_lambda():
    actions, cost, change, logits, y = _traj()
    cheap = compute_rewards(actions, cost, change, logits, y, L, 1000.0, RewardConfig(lam=0.1))
    dear = compute_rewards(actions, cost, change, logits, y, L, 1000.0, RewardConfig(lam=1.0))
    assert (dear.total <= cheap.total).all() and dear.total[0] < cheap.total[0]
    assert dear.total[1] == cheap.total[1]  # NOP costs nothing
    per = compute_rewards(actions, cost, change, logits, y, L, 1000.0, RewardConfig(lam=123.0),
                          lam=torch.tensor([0.1, 0.1, 1.0]))
    torch.testing.assert_close(per.total[:2], cheap.total[:2])
    torch.testing.assert_close(per.total[2], dear.total[2])


def test_penalties_are_configurable_and_validated():
    actions, cost, change, logits, y = _traj()
    off = compute_rewards(actions, cost, change, logits, y, L, 1000.0, RewardConfig(mu_repeat=0, mu_stale=0))
    assert (off.redundancy == 0).all()
    with pytest.raises(ValueError):
        RewardConfig(accuracy="nope").validate()
    with pytest.raises(ValueError):
        RewardConfig(lam=-1).validate()
    with pytest.raises(ValueError):
        compute_rewards(actions, cost, change, logits, y, L, 0.0, RewardConfig())
    assert math.isfinite(float(off.total.sum()))
