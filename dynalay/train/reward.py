"""The DynaLay reward: accuracy + compute + redundancy, per sample, every term configurable.

For a sample whose trajectory took decisions ``a_0 .. a_{n-1}`` (layers, then possibly NOP) and
ended in state ``h_final``:

    R = w_acc * A(h_final)  -  lam * sum_t c_t / C_ref  -  mu_repeat * n_repeat  -  mu_stale * n_stale

* **accuracy** ``A``: ``"prob"``: ``p(y | h_final)``; ``"logp"``: ``max(log p(y | h_final), -logp_clip)``;
  ``"correct"``: ``1[argmax = y]``; ``"both"``: ``p(y | h_final) + 1[argmax = y]``.
* **compute**: ``c_t`` is the cost charged to decision ``t``: the FPI solve it started (its
  projection plus the f-evaluations the solve *actually spent*, ``2 H^2`` FLOPs each) plus the head
  and agent evaluations on the state it produced (``CostModel``).  With ``cost="latency"`` the
  solve is charged by a per-layer latency table measured at start-up instead (rescaled so that
  both have the same mean).  ``C_ref`` is the FLOPs of the static model (all ``T`` layers at
  ``max_iter``), so ``lam`` is the price, in accuracy units, of running everything once.
* **redundancy**: ``n_repeat`` counts decisions that repeat the previous layer (``a_t == a_{t-1}``);
  ``n_stale`` counts layer applications that barely changed the state
  (``||h_{t+1} - h_t|| / ||h_t|| < stale_delta``): re-applying a layer that no longer changes
  anything.

Credit assignment: every decision gets its return-to-go
``G_t = w_acc * A - lam * sum_{k>=t} c_k / C_ref - (penalties at steps >= t)``, so a decision is
charged only for the compute it and later decisions caused.  NOP costs nothing.

Defaults (``RewardConfig()``): ``accuracy="correct"`` (the metric the evaluation reports; the
default tree method computes the *expected* correctness of the stochastic policy exactly, so the
0/1 term is not sparse there; with ``agent_method="reinforce"`` prefer ``"prob"``,
``p(y | h_final)``: smooth and bounded, whereas ``"correct"`` gives few learning signals from
sampled trajectories on 800 held-out samples, and ``"logp"`` over-penalises confident mistakes),
``w_acc=1``, ``logp_clip=3``, ``lam=0.4`` (used only when the trainer does not sample lambda),
``mu_repeat=0.01``, ``mu_stale=0.05``, ``stale_delta=0.02``, ``cost="flops"``.

The trainer conditions the agent on lambda: every input gets a lambda drawn log-uniformly from
``[lam_min, lam_max]`` (shared by its rollouts), which enters both this reward and the agent's
features; at inference lambda is the knob.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

ACCURACY_TERMS = ("logp", "correct", "prob", "both")  # both = prob + correct
COST_TERMS = ("flops", "latency")


@dataclass
class RewardConfig:
    accuracy: str = "correct"
    w_acc: float = 1.0
    logp_clip: float = 3.0
    lam: float = 0.4
    mu_repeat: float = 0.01
    mu_stale: float = 0.05
    stale_delta: float = 0.02
    cost: str = "flops"

    def validate(self) -> "RewardConfig":
        if self.accuracy not in ACCURACY_TERMS:
            raise ValueError(f"reward accuracy term must be one of {ACCURACY_TERMS} (got {self.accuracy!r})")
        if self.cost not in COST_TERMS:
            raise ValueError(f"reward cost term must be one of {COST_TERMS} (got {self.cost!r})")
        for k in ("w_acc", "logp_clip", "lam", "mu_repeat", "mu_stale", "stale_delta"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or v != v or v < 0:
                raise ValueError(f"reward {k} must be a float >= 0 (got {v!r})")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


class RewardBreakdown(NamedTuple):
    total: Tensor       # (B,) R
    accuracy: Tensor    # (B,) w_acc * A
    compute: Tensor     # (B,) lam * sum_t c_t / C_ref   (subtracted)
    redundancy: Tensor  # (B,) mu_repeat * n_repeat + mu_stale * n_stale   (subtracted)
    returns: Tensor     # (B, T) return-to-go G_t at every step (0 where nothing was decided)
    repeats: Tensor     # (B, T) bool
    stale: Tensor       # (B, T) bool


def accuracy_term(logits: Tensor, y: Tensor, cfg: RewardConfig) -> Tensor:
    logp = torch.log_softmax(logits.detach().double(), 1).gather(1, y[:, None]).squeeze(1)
    lp = logp.clamp(min=-cfg.logp_clip)
    correct = (logits.detach().argmax(1) == y).double()
    if cfg.accuracy == "logp":
        a = lp
    elif cfg.accuracy == "prob":
        a = logp.exp()
    elif cfg.accuracy == "correct":
        a = correct
    else:  # "both"
        a = logp.exp() + correct
    return cfg.w_acc * a


def compute_rewards(actions: Tensor, step_cost: Tensor, state_change: Tensor, final_logits: Tensor, y: Tensor,
                    num_layers: int, cost_ref: float, cfg: RewardConfig, decided: Optional[Tensor] = None,
                    lam: Optional[Tensor] = None) -> RewardBreakdown:
    """Rewards of a batch of trajectories.

    actions: ``(B, T)`` int64 (layer, ``num_layers`` = NOP, ``-1`` = the sample had already ended);
    step_cost: ``(B, T)`` cost charged to each decision (FLOPs, 0 for NOP / no decision);
    state_change: ``(B, T)`` relative state change caused by each decision;
    final_logits: ``(B, C)`` head on each sample's final state; y: ``(B,)`` labels;
    cost_ref: the normaliser ``C_ref`` (> 0); decided: ``(B, T)`` bool (default ``actions >= 0``);
    lam: ``(B,)`` per-trajectory price of compute (the trainer samples one per trajectory for the
    lambda-conditioned agent), default ``cfg.lam``.
    """
    cfg.validate()
    if cost_ref <= 0:
        raise ValueError(f"cost_ref must be > 0 (got {cost_ref})")
    B, T = actions.shape
    L = num_layers
    if decided is None:
        decided = actions >= 0
    is_layer = decided & (actions >= 0) & (actions < L)
    prev = torch.cat([torch.full((B, 1), -1, dtype=actions.dtype, device=actions.device), actions[:, :-1]], 1)
    repeats = is_layer & (prev == actions)
    stale = is_layer & (state_change.to(torch.float64) < cfg.stale_delta)
    acc = accuracy_term(final_logits, y, cfg)
    c = torch.where(is_layer, step_cost.to(torch.float64), torch.zeros((), dtype=torch.float64)) / cost_ref
    pen = cfg.mu_repeat * repeats.double() + cfg.mu_stale * stale.double()
    lam_t = torch.full((B, 1), float(cfg.lam), dtype=torch.float64, device=actions.device) if lam is None \
        else lam.to(torch.float64).reshape(B, 1)
    per_step = lam_t * c + pen
    # return-to-go: sum over k >= t (reverse cumsum)
    to_go = per_step.flip(1).cumsum(1).flip(1)
    returns = torch.where(decided, acc[:, None] - to_go, torch.zeros((), dtype=torch.float64))
    compute = lam_t[:, 0] * c.sum(1)
    redundancy = pen.sum(1)
    return RewardBreakdown(acc - compute - redundancy, acc, compute, redundancy, returns, repeats, stale)
