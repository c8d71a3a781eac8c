"""Training DynaLay: schedule, policy gradient, supervised loss through the implicit gradients.

Schedule (one seed; every phase is a number of epochs in :class:`TrainConfig`):

1. ``mlp``: the MLP baseline (AdamW, cosine LR, dropout) on the ``fit`` split.
2. ``warmup``: the backbone (encoder, FPI pool, head) on the ``fit`` split, supervised along the
   static order (layer ``t mod L`` at step ``t``) where each step's layer is replaced by a random
   one with probability ``mix_prob`` (so every layer learns to read every state), with deep
   supervision: cross-entropy of the head on *every* visited state (``ds_weight``) plus the final
   state.  Gradients reach the FPI layers through ``dynamic_step``'s implicit (IFT) backward.
3. ``agent``: the backbone is frozen; the agent learns on the held-out ``val`` split.  Default
   (``agent_method="tree"``): the exact policy gradient over the enumerated decision tree
   (:mod:`dynalay.train.tree`): every state a sample can reach in ``T`` steps is solved once per
   phase, and the expected reward of the stochastic policy (each sample at a lambda drawn
   log-uniformly from ``[lam_min, lam_max]``) is computed by backward induction and maximised
   with Adam, plus an entropy bonus ``entropy_beta`` that decays linearly to 0 at 80% of the
   phase (evaluation is greedy).  The agent's learning rate decays linearly from ``agent_lr``
   to 2% over the phase (``agent_lr_decay="linear"``), so that the phase ends on a settled
   policy rather than on a late iterate of a constant-step optimiser.  Optionally
   (``agent_select_fraction > 0``) a seeded share of ``val`` is held out and the epoch whose greedy policy has the best exact reward there (mean
   over 9 log-spaced lambdas) is kept.  ``agent_method="reinforce"``: REINFORCE with ``rollouts``
   sampled trajectories per input, the per-decision return-to-go of
   :mod:`dynalay.train.reward`, a baseline (leave-one-out ``rloo`` by default, a learned
   ``V(features_t)`` or ``self_critical``), advantage normalisation and the entropy bonus.
   The backbone's weight is taken with the pool in eval mode, so that not even the spectral
   bound's power iteration moves while the agent trains.
4. ``joint``: alternation, one backbone step then one agent step: the backbone takes the
   cross-entropy at the final state of the trajectories the agent *sampled* on a ``fit`` batch
   (through the implicit gradients of every solve on the path) plus the deep-supervised static
   trajectory (which keeps intermediate states classifiable and the static baseline sharp); the
   agent takes a step on a ``val`` batch (tree method: on the tree rebuilt at every epoch start).
5. ``refit``: the backbone is final; the agent is re-initialised and trained again as in phase 3
   on the final backbone (the phase-3 agent served to choose the joint phase's trajectories).
   With the tree method this costs seconds.

The ``static``, ``truncation`` and ``early_exit`` baselines use the final backbone (the same
layers, trained the same way); only the agent is DynaLay's own.  Evaluation is greedy.

Reproducibility: data order, the random layer mix and the policy's samples come from generators
seeded by ``(seed, phase, epoch)``, and the global torch RNG (dropout) is reseeded at every
epoch, so a resumed run continues exactly as an uninterrupted one.  ``torch.set_num_threads``
follows the CPUs this process may use (divided among distributed ranks).

Distributed (``torchrun --nproc_per_node=N -m dynalay train``, gloo): every rank takes the slice
``[rank::N]`` of each global batch, gradients (and a non-finite-loss flag) are summed with one
``all_reduce`` per step and averaged; parameters and buffers are broadcast from rank 0 at the start
and after every epoch.  Only rank 0 writes files.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import DynaLay, DynaLayConfig, MLPBaseline, mlp_hidden_for_params
from ..models.dynalay import Policy, config_from_dict
from ..ops._common import check_finite, is_real
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import DataBundle
from .reward import RewardConfig, compute_rewards
from .tree import MAX_TREE_SOLVES, build_tree, expected_return, tree_solves

PHASES = ("mlp", "warmup", "agent", "joint", "refit")
BASELINES = ("learned", "self_critical", "rloo", "rloo_step")
AGENT_METHODS = ("tree", "reinforce")
AGENT_LR_DECAYS = ("linear", "none")
KNOB_GRID = 49  # lambdas the default knob's calibration tries, log-spaced over [lam_min, lam_max]


def knob_grid(lam_min: float, lam_max: float, n: int = KNOB_GRID) -> List[float]:
    """The lambdas ``Trainer.calibrate`` tries: ``n`` log-spaced over [lam_min, lam_max], rounded
    to 4 decimals (at least 3 significant digits below 0.01), so that a report prints them whole."""
    lo, hi = math.log(lam_min), math.log(lam_max)
    out = []
    for i in range(n):
        v = math.exp(lo + (hi - lo) * i / (n - 1))
        out.append(round(v, max(4, 2 - math.floor(math.log10(v)))))
    return out


def check_knob_settings(knob: Optional[float], knob_flops: Optional[float], knob_tolerance: float = 0.0) -> None:
    """The default knob's settings (``TrainConfig``, ``calibrate_knob``, ``dynalay eval``): a
    ValueError naming the bad one."""
    if knob is not None and (not is_real(knob) or not (0 <= knob < math.inf)):
        raise ValueError(f"knob must be None or a finite lambda >= 0 (the default lambda; got {knob!r})")
    if knob_flops is not None and (not is_real(knob_flops) or not (0 < knob_flops <= 1)):
        raise ValueError(f"knob_flops must be None or a share of static's FLOPs in (0, 1] (got {knob_flops!r})")
    if not is_real(knob_tolerance) or not (0 <= knob_tolerance < math.inf):
        raise ValueError(f"knob_tolerance must be a finite number >= 0 (got {knob_tolerance!r})")


@torch.no_grad()
def calibrate_knob(model: DynaLay, x: Tensor, y: Tensor, knob: Optional[float] = None,
                   knob_flops: Optional[float] = 0.45, knob_tolerance: float = 0.0) -> Tuple[float, dict]:
    """Choose the default knob of a trained ``model`` on held-out data ``(x, y)`` (never the test
    split), set ``model.default_lam`` to it, and return ``(lambda, record)``:

    - ``knob`` a number: that lambda (``mode="fixed"``);
    - else ``knob_flops`` (the training default 0.45): the smallest lambda of ``knob_grid`` whose
      greedy FLOPs per sample on ``x`` are at most ``knob_flops`` x the static model's there: the
      most compute (and so, the curve being monotone, the most accuracy) within that share;
      ``lam_max`` when no lambda is that cheap (``mode="flops"``).  A fixed lambda does not fix
      the compute share: the same lambda gave 0.42x to 0.64x of static's FLOPs over twelve
      trainings (results.md, sessions 22-23);
    - else: the largest lambda of the grid whose accuracy on ``(x, y)`` is within
      ``knob_tolerance`` of static's there (``mode="accuracy"``).

    ``record`` holds the mode, lambda and settings and the accuracy and FLOP share reached there.
    The model is left in eval mode.  No retraining: this moves a trained model along its curve."""
    check_knob_settings(knob, knob_flops, knob_tolerance)
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"calibrate_knob needs x (N, D) and y (N,) with N >= 1 (got {tuple(x.shape)} and "
                         f"{tuple(y.shape)})")
    m = model
    m.eval()
    W = m.inference_weight()

    scores: Dict[Optional[float], Tuple[float, float]] = {}

    def score(lam=None):  # (accuracy, mean FLOPs) on (x, y); lam None: static; each lambda run once
        if lam not in scores:
            o = m.run_static(x, W=W) if lam is None else m.run(x, lam=lam, W=W)
            scores[lam] = float((o.logits.argmax(1) == y).double().mean()), float(o.flops.double().mean())
        return scores[lam]

    st_acc, st_flops = score()
    grid = knob_grid(m.cfg.lam_min, m.cfg.lam_max)
    if knob is not None:
        mode, lam = "fixed", float(knob)
    elif knob_flops is not None:
        mode, lam = "flops", grid[-1]
        for g in grid:  # lambda ascending: the first within the share
            if score(g)[1] <= knob_flops * st_flops:
                lam = g
                break
    else:
        mode, lam = "accuracy", grid[0]
        for g in grid:
            if score(g)[0] >= st_acc - knob_tolerance:
                lam = g
    acc, flops = score(lam)
    m.default_lam = lam
    return lam, dict(mode=mode, lam=lam, knob_flops=knob_flops if mode == "flops" else None,
                     knob_tolerance=knob_tolerance if mode == "accuracy" else None,
                     val_accuracy=acc, val_flops_ratio=flops / st_flops, val_static_accuracy=st_acc)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf: training stopped and nothing was saved for that state."""


@dataclass
class TrainConfig:
    dataset: str = "mnist1d"
    seed: int = 0
    # model
    hidden: int = 256
    num_layers: int = 4
    max_steps: int = 4
    tol: float = 1e-2
    max_iter: int = 6
    backward_max_iter: int = 12
    spectral_bound: float = 0.9
    agent_state_dim: int = 0
    agent_hidden: int = 16
    agent_conf: str = "logodds"  # the agent's confidence feature (DynaLayConfig.agent_conf)
    lam_min: float = 0.02
    lam_max: float = 2.0
    backend: Optional[str] = None
    # data
    val_fraction: float = 0.2
    # schedule
    batch_size: int = 128
    mlp_epochs: int = 40
    warmup_epochs: int = 60
    agent_epochs: int = 300
    joint_epochs: int = 6
    refit_epochs: int = 300
    lr: float = 2e-3
    weight_decay: float = 1e-4
    mix_prob: float = 0.0
    ds_weight: float = 1.0
    h0_weight: float = 0.1
    agent_lr: float = 1e-2
    agent_lr_decay: str = "linear"  # agent and refit phases: "linear" (agent_lr -> 2% over the phase) or "none"
    agent_batch: int = 64
    agent_method: str = "tree"  # "tree": exact policy gradient over the enumerated decision tree; "reinforce"
    agent_select_fraction: float = 0.0  # tree: share of val held out to pick the agent phase's best epoch
    agent_select_every: int = 5  # tree: epochs between two evaluations of the held-out objective
    rollouts: int = 8
    entropy_beta: float = 0.05
    value_coef: float = 0.5
    baseline: str = "rloo"
    adv_norm: str = "center"  # "std" (centre and scale), "center" or "none"
    lam_sampling: bool = True  # condition the agent on lambda ~ log-uniform[lam_min, lam_max]
    mlp_dropout: float = 0.1
    mlp_lr: float = 2e-3
    grad_clip: float = 5.0
    reward: RewardConfig = field(default_factory=RewardConfig)
    # evaluation
    eval_batch: int = 256
    # the default lambda at inference ("dynalay"): a number, or None to calibrate it on the val split
    # (Trainer.calibrate): to a compute share (knob_flops) or, with knob_flops None, to an accuracy
    knob: Optional[float] = None
    knob_flops: Optional[float] = 0.45  # calibration: the most compute within this share of static's val FLOPs
    knob_tolerance: float = 0.0  # knob_flops None: the cheapest lambda within this of static's val accuracy
    knobs: List[float] = field(default_factory=lambda: [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0])
    exit_thresholds: List[float] = field(default_factory=lambda: [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
                                                                  0.95, 0.99, 1.01])
    timing_repeats: int = 15
    # wall time of the test split at other batch sizes (dynalay, static, the early exit nearest in
    # FLOPs, mlp): dynamic networks often save FLOPs but not time at small batches.  () skips it.
    latency_batches: List[int] = field(default_factory=lambda: [1, 8, 32, 128, 256, 1024])
    latency_repeats: int = 5
    ckpt_every: int = 5

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reward"] = self.reward.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if isinstance(d.get("reward"), dict):
            d["reward"] = config_from_dict(RewardConfig, d["reward"])
        return config_from_dict(cls, d)

    def model_config(self, data: DataBundle) -> DynaLayConfig:
        return DynaLayConfig(in_features=data.in_features, num_classes=data.num_classes, hidden=self.hidden,
                             num_layers=self.num_layers, max_steps=self.max_steps, tol=self.tol,
                             max_iter=self.max_iter, backward_max_iter=self.backward_max_iter,
                             spectral_bound=self.spectral_bound, agent_state_dim=self.agent_state_dim,
                             agent_hidden=self.agent_hidden, agent_conf=self.agent_conf,
                             lam_min=self.lam_min, lam_max=self.lam_max,
                             backend=self.backend)

    def validate(self) -> "TrainConfig":
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES} (got {self.baseline!r})")
        if self.agent_method not in AGENT_METHODS:
            raise ValueError(f"agent_method must be one of {AGENT_METHODS} (got {self.agent_method!r})")
        if not (0.0 <= self.agent_select_fraction < 1.0):
            raise ValueError("agent_select_fraction must be in [0, 1)")
        if self.agent_select_every < 1:
            raise ValueError("agent_select_every must be >= 1")
        if self.agent_lr_decay not in AGENT_LR_DECAYS:
            raise ValueError(f"agent_lr_decay must be one of {AGENT_LR_DECAYS} (got {self.agent_lr_decay!r})")
        if self.adv_norm not in ("std", "center", "none"):
            raise ValueError(f"adv_norm must be 'std', 'center' or 'none' (got {self.adv_norm!r})")
        for k in ("mlp_epochs", "warmup_epochs", "agent_epochs", "joint_epochs", "refit_epochs"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0")
        if self.batch_size < 1 or self.agent_batch < 1 or self.rollouts < 1:
            raise ValueError("batch_size, agent_batch and rollouts must be >= 1")
        if not (0.0 <= self.mix_prob <= 1.0):
            raise ValueError("mix_prob must be in [0, 1]")
        if len(self.knobs) < 1:
            raise ValueError("knobs needs at least one value")
        for k in ("lr", "mlp_lr", "agent_lr", "grad_clip"):
            v = getattr(self, k)
            if not is_real(v) or not (0 < v < math.inf):
                raise ValueError(f"{k} must be a finite number > 0 (got {v!r})")
        for k in ("weight_decay", "entropy_beta", "value_coef", "ds_weight", "h0_weight"):
            v = getattr(self, k)
            if not is_real(v) or not (0 <= v < math.inf):
                raise ValueError(f"{k} must be a finite number >= 0 (got {v!r})")
        if not (0 < self.val_fraction < 1):
            raise ValueError(f"val_fraction must be in (0, 1) (got {self.val_fraction!r})")
        check_knob_settings(self.knob, self.knob_flops, self.knob_tolerance)
        if any(not is_real(v) or not (0 <= v < math.inf) for v in self.knobs):
            raise ValueError(f"knobs must be finite lambdas >= 0 (got {self.knobs!r})")
        if any(not is_real(v) or v != v for v in self.exit_thresholds):
            raise ValueError(f"exit_thresholds must be numbers (got {self.exit_thresholds!r})")
        if self.eval_batch < 1 or self.timing_repeats < 1 or self.ckpt_every < 1:
            raise ValueError("eval_batch, timing_repeats and ckpt_every must be >= 1")
        # the model's own fields (hidden, layers, steps, tol, max_iter, ...), named as flags name them
        DynaLayConfig(in_features=1, num_classes=2, hidden=self.hidden, num_layers=self.num_layers,
                      max_steps=self.max_steps, tol=self.tol, max_iter=self.max_iter,
                      backward_max_iter=self.backward_max_iter, spectral_bound=self.spectral_bound,
                      agent_state_dim=self.agent_state_dim, agent_hidden=self.agent_hidden,
                      agent_conf=self.agent_conf, lam_min=self.lam_min, lam_max=self.lam_max,
                      backend=self.backend).validate()
        if any(int(b) < 1 for b in self.latency_batches) or self.latency_repeats < 1:
            raise ValueError("latency_batches must be batch sizes >= 1 and latency_repeats >= 1")
        self.reward.validate()
        return self


# ---------------------------------------------------------------------------------------------
# process setup
# ---------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(threads: Optional[int] = None, world: int = 1) -> int:
    """``threads`` or, by default, the CPUs this process may use shared among the ``world``
    ranks on this machine (``OMP_NUM_THREADS`` wins when set)."""
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS")
        threads = int(env) if env and env.isdigit() and int(env) > 0 else max(1, available_cpus() // max(1, world))
    torch.set_num_threads(int(threads))
    return int(threads)


def init_distributed() -> DistInfo:
    """Initialise gloo when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def _gen(seed: int, *salt: int) -> torch.Generator:
    s = seed
    for v in salt:
        s = (s * 1_000_003 + v + 7) % (2 ** 62)
    return torch.Generator().manual_seed(s)


# ---------------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------------
class Trainer:
    """Trains one seed: ``Trainer(cfg, data, run_dir).fit()`` returns ``(model, mlp)``."""

    def __init__(self, cfg: TrainConfig, data: DataBundle, run_dir: Optional[str] = None,
                 dist: Optional[DistInfo] = None, progress: bool = True, log: Callable[[str], None] = print):
        self.cfg = cfg.validate()
        # every rank holds the same data: all of them stop here, none waits in an all_reduce
        check_finite("warn", **{f"the {data.name} data's {split} split": getattr(data, split).x
                                for split in ("fit", "val", "test")})
        self.data = data
        self.run_dir = run_dir
        self.dist = dist or DistInfo()
        self.progress = progress
        self.log = log if self.dist.is_main else (lambda *_: None)
        torch.manual_seed(cfg.seed)
        self.model = DynaLay(cfg.model_config(data))
        if cfg.knob is not None:
            self.model.default_lam = cfg.knob
        width = mlp_hidden_for_params(data.in_features, data.num_classes,
                                      sum(p.numel() for p in self.model.parameters()
                                          if not _is_value(self.model, p)))
        self.mlp = MLPBaseline(data.in_features, data.num_classes, width, cfg.mlp_dropout)
        self.opt_mlp = torch.optim.AdamW(self.mlp.parameters(), lr=cfg.mlp_lr, weight_decay=cfg.weight_decay)
        self.opt_bb = torch.optim.AdamW(list(self.model.backbone_parameters()), lr=cfg.lr,
                                        weight_decay=cfg.weight_decay)
        self.opt_ag = torch.optim.Adam(list(self.model.agent_parameters()), lr=cfg.agent_lr)
        self.phase, self.epoch = 0, 0  # next (phase index, epoch) to run
        self.history: List[dict] = []
        self.cost_ref = self.model.static_flops_per_sample()
        # the agent's data: the val split, less (tree method) a seeded held-out share that picks
        # the agent phase's best epoch
        nv = len(data.val)
        n_sel = int(round(cfg.agent_select_fraction * nv)) if cfg.agent_method == "tree" else 0
        vp = torch.randperm(nv, generator=_gen(cfg.seed, 99))
        self.agent_idx, self.select_idx = vp[n_sel:].sort().values, vp[:n_sel].sort().values
        if cfg.agent_method == "tree":
            mc = self.model.cfg
            n = tree_solves(nv, mc.num_layers, mc.max_steps)
            if n > MAX_TREE_SOLVES:
                raise ValueError(
                    f"agent_method='tree' would solve {n:,} states per tree ({nv} samples, L={mc.num_layers} "
                    f"layers, T={mc.max_steps} steps: N * (L + ... + L^T); limit {MAX_TREE_SOLVES:,}): use "
                    f"agent_method='reinforce' (--agent-method reinforce --reward-accuracy prob), or fewer "
                    f"layers or steps")
        self.agent_best: Optional[dict] = None  # {"score", "epoch", "policy"}: best held-out epoch so far
        self.calibration: Optional[dict] = None  # how the default knob was set (calibrate)
        self._tree = self._sel_tree = None  # decision-tree caches (rebuilt when the backbone changes)
        self._broadcast()

    # -------------------------------------------------------------- bookkeeping
    def meta(self) -> dict:
        return dict(dataset=self.cfg.dataset, model=self.model.cfg.to_dict(), mlp=self.mlp.config(),
                    seed=self.cfg.seed, val_fraction=self.cfg.val_fraction)

    def state(self) -> dict:
        return dict(model=self.model.state_dict(), mlp=self.mlp.state_dict(), opt_mlp=self.opt_mlp.state_dict(),
                    opt_bb=self.opt_bb.state_dict(), opt_ag=self.opt_ag.state_dict(), agent_best=self.agent_best)

    def checkpoint_path(self) -> Optional[str]:
        return None if self.run_dir is None else os.path.join(self.run_dir, "checkpoint.pt")

    def save(self, complete: bool = False) -> Optional[str]:
        path = self.checkpoint_path()
        if path is None or not self.dist.is_main:
            return None
        return save_checkpoint(path, dict(state=self.state(), meta=self.meta(), train_config=self.cfg.to_dict(),
                                          position=[self.phase, self.epoch], complete=complete,
                                          history=self.history, data_mean=self.data.mean,
                                          data_std=self.data.std, calibration=self.calibration))

    def resume(self, path: Optional[str] = None) -> bool:
        """Load the run's checkpoint (if any) and continue from its position."""
        path = path or self.checkpoint_path()
        if path is None or not os.path.exists(path):
            return False
        ck = load_checkpoint(path, expect=dict(dataset=self.cfg.dataset, model=self.model.cfg.to_dict(),
                                               seed=self.cfg.seed))
        st = ck["state"]
        try:
            self.model.load_state_dict(st["model"])
            self.mlp.load_state_dict(st["mlp"])
            self.opt_mlp.load_state_dict(st["opt_mlp"])
            self.opt_bb.load_state_dict(st["opt_bb"])
            self.opt_ag.load_state_dict(st["opt_ag"])
            self.agent_best = st.get("agent_best")
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path!r} does not fit this model: {e}") from e
        self.phase, self.epoch = ck["position"]
        self.history = list(ck.get("history", []))
        self.calibration = ck.get("calibration")
        self._broadcast()
        return True

    def _broadcast(self) -> None:
        if self.dist.world <= 1:
            return
        import torch.distributed as dist

        for m in (self.model, self.mlp):
            for t in list(m.parameters()) + list(m.buffers()):
                dist.broadcast(t.data, 0)

    def _reduce(self, params: List[Tensor], loss: Tensor) -> bool:
        """Average gradients over ranks (one all_reduce) and agree on whether the loss was finite."""
        bad = 0.0 if bool(torch.isfinite(loss.detach())) else 1.0
        if self.dist.world > 1:
            import torch.distributed as dist

            flat = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
            buf = torch.cat(flat + [torch.tensor([bad], dtype=flat[0].dtype)])
            dist.all_reduce(buf)
            bad = float(buf[-1])
            buf = buf[:-1] / self.dist.world
            off = 0
            for p in params:
                n = p.numel()
                g = buf[off:off + n].view_as(p)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
                off += n
        return bad == 0.0

    def _shard(self, idx: Tensor) -> Tensor:
        return idx[self.dist.rank::self.dist.world] if self.dist.world > 1 else idx

    def _check(self, ok: bool, where: str, loss: Tensor) -> None:
        if not ok:
            raise TrainingDiverged(
                f"training stopped: the loss became {float(loss.detach())} in phase '{where}' "
                f"(epoch {self.epoch}); no checkpoint was written for this state"
                + (f" (the last good one, if any, is {self.checkpoint_path()})" if self.run_dir else "")
                + ". Lower --lr, or check the input data for NaN/inf.")

    @staticmethod
    def _lr_factor(step: int, total: int, warm: float = 0.05, floor: float = 0.05) -> float:
        w = max(1, int(warm * total))
        if step < w:
            return (step + 1) / w
        p = (step - w) / max(1, total - w)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    def _steps(self, n: int, b: int) -> int:
        return max(1, math.ceil(n / b))

    def plan(self) -> List[tuple]:
        c, d = self.cfg, self.data
        fit_steps = self._steps(len(d.fit), c.batch_size)
        return [("mlp", c.mlp_epochs, fit_steps), ("warmup", c.warmup_epochs, fit_steps),
                ("agent", c.agent_epochs, self._steps(len(self.agent_idx), c.agent_batch)),
                ("joint", c.joint_epochs, fit_steps),
                ("refit", c.refit_epochs, self._steps(len(self.agent_idx), c.agent_batch))]

    # -------------------------------------------------------------- steps
    def _mlp_step(self, xb, yb, gstep, total):
        for g in self.opt_mlp.param_groups:
            g["lr"] = self.cfg.mlp_lr * self._lr_factor(gstep, total)
        self.mlp.train()
        loss = F.cross_entropy(self.mlp(xb), yb)
        self.opt_mlp.zero_grad(set_to_none=False)
        loss.backward()
        ok = self._reduce(list(self.mlp.parameters()), loss)
        self._check(ok, "mlp", loss)
        torch.nn.utils.clip_grad_norm_(self.mlp.parameters(), self.cfg.grad_clip)
        self.opt_mlp.step()
        return float(loss.detach())

    def _deep_sup(self, out, yb) -> Tensor:
        """CE of the head on the final state, plus ``ds_weight`` x the mean CE on every visited state
        after the input, plus ``h0_weight`` x the CE on the input state (so the head's confidence
        means something wherever a sample may stop)."""
        B = yb.shape[0]
        ce = [F.cross_entropy(lg, yb[rows], reduction="sum") / B for rows, lg in out.inter_logits]
        loss = F.cross_entropy(out.logits, yb)
        if len(ce) > 1:
            loss = loss + self.cfg.ds_weight * sum(ce[1:]) / (len(ce) - 1)
        if ce and self.cfg.h0_weight:
            loss = loss + self.cfg.h0_weight * ce[0]
        return loss

    def _mixed_actions(self, B: int, gen: torch.Generator) -> Tensor:
        a = self.model.static_actions(B)
        if self.cfg.mix_prob > 0:
            r = torch.rand(a.shape, generator=gen) < self.cfg.mix_prob
            rnd = torch.randint(0, self.model.cfg.num_layers, a.shape, generator=gen)
            a = torch.where(r, rnd, a)
        return a

    def _backbone_step(self, xb, yb, gen, gstep, total, joint: bool):
        c = self.cfg
        for g in self.opt_bb.param_groups:
            g["lr"] = c.lr * self._lr_factor(gstep, total)
        self.model.train()
        W = self.model.pool.effective_weight()
        out = self.model.run(xb, policy="forced", forced=self._mixed_actions(xb.shape[0], gen), W=W, record=True)
        loss = self._deep_sup(out, yb)
        if joint:
            lam = self._sample_lam(xb.shape[0], gen)
            with _frozen(self.model.agent_parameters()):
                oa = self.model.run(xb, policy="sample", lam=c.reward.lam if lam is None else lam, generator=gen,
                                    W=W, record=True)
            loss = loss + F.cross_entropy(oa.logits, yb)
            for rows, lg in oa.inter_logits[1:]:
                loss = loss + c.ds_weight * 0.5 * F.cross_entropy(lg, yb[rows], reduction="sum") / (
                    yb.shape[0] * max(1, len(oa.inter_logits) - 1))
        params = list(self.model.backbone_parameters())
        self.opt_bb.zero_grad(set_to_none=False)
        loss.backward()
        ok = self._reduce(params, loss)
        self._check(ok, "joint" if joint else "warmup", loss)
        torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        self.opt_bb.step()
        return float(loss.detach())

    def _sample_lam(self, n: int, gen: torch.Generator) -> Optional[Tensor]:
        """Per-trajectory price of compute: log-uniform over the model's [lam_min, lam_max]."""
        if not self.cfg.lam_sampling:
            return None
        mc = self.model.cfg
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        return torch.exp(math.log(mc.lam_min) + u * (math.log(mc.lam_max) - math.log(mc.lam_min)))

    def _step_cost(self, out) -> Tensor:
        """Cost charged to each decision: FLOPs actually spent (default), or with
        ``reward.cost="latency"`` the per-layer latency table measured at start-up on the running
        backend, rescaled to the FLOP table's mean so that lambda keeps its meaning."""
        if self.cfg.reward.cost == "flops":
            return out.step_flops
        L = self.model.cfg.num_layers
        per_layer = self._latency_per_layer()
        a = out.actions
        is_layer = (a >= 0) & (a < L)
        return torch.where(is_layer, per_layer[a.clamp(0, L - 1)], torch.zeros((), dtype=torch.float64))

    def _agent_step(self, xb, yb, gen):
        c, m = self.cfg, self.model
        m.train()
        xr, yr = xb.repeat(c.rollouts, 1), yb.repeat(c.rollouts)
        lam = self._sample_lam(xb.shape[0], gen)  # one price per input, shared by its rollouts
        lam = None if lam is None else lam.repeat(c.rollouts)
        lam_run = c.reward.lam if lam is None else lam
        with _frozen(m.backbone_parameters()):
            W = self._frozen_weight()
            out = m.run(xr, policy="sample", lam=lam_run, generator=gen, W=W, record=True)
            R = compute_rewards(out.actions, self._step_cost(out), out.state_change, out.logits, yr,
                                m.cfg.num_layers, self.cost_ref, c.reward, out.decided, lam=lam)
            dec = out.decided
            if c.baseline == "rloo":  # leave-one-out mean of the other rollouts of the same input
                Rt = R.total.view(c.rollouts, -1)
                base = (Rt.sum(0, keepdim=True) - Rt) / max(1, c.rollouts - 1)
                adv = (Rt - base).reshape(-1)[:, None].expand_as(R.returns)
            elif c.baseline == "rloo_step":  # per-decision return-to-go minus the other rollouts' mean
                G = R.returns.view(c.rollouts, -1, R.returns.shape[1])
                D = dec.view(c.rollouts, -1, dec.shape[1]).double()
                s_, n_ = (G * D).sum(0, keepdim=True), D.sum(0, keepdim=True)
                base = (s_ - G * D) / (n_ - D).clamp(min=1)
                adv = (G - base).reshape(R.returns.shape)
            elif c.baseline == "self_critical":
                with torch.no_grad():
                    og = m.run(xr, policy="greedy", lam=lam_run, W=W, record=True)
                    Rg = compute_rewards(og.actions, self._step_cost(og), og.state_change, og.logits, yr,
                                         m.cfg.num_layers, self.cost_ref, c.reward, og.decided, lam=lam)
                adv = (R.total - Rg.total)[:, None].expand_as(R.returns)
            else:
                adv = R.returns - out.values.detach().double()
            adv = adv[dec].float()
            if c.adv_norm == "std" and adv.numel() > 1:
                adv = (adv - adv.mean()) / (adv.std() + 1e-6)
            elif c.adv_norm == "center" and adv.numel() > 1:
                adv = adv - adv.mean()
            pg = -(adv * out.log_probs[dec]).mean()
            vl = (out.values[dec] - R.returns[dec].float()).pow(2).mean()
            ent = out.entropy[dec].mean()
            loss = pg + c.value_coef * vl - c.entropy_beta * ent
        self._agent_update(list(m.agent_parameters()), loss)
        return float(loss.detach()), float(R.total.mean()), float(out.steps.double().mean())

    @torch.no_grad()
    def _frozen_weight(self) -> Tensor:
        """The pool's effective weight without a step of the spectral bound's power iteration (which
        runs in train mode): the agent's updates leave the backbone exactly as it was."""
        pool = self.model.pool
        was = pool.training
        pool.eval()
        try:
            return pool.effective_weight()
        finally:
            pool.train(was)

    def _build_trees(self, select: bool = True) -> None:
        """The decision trees (:mod:`dynalay.train.tree`) of the agent's samples and (``select``) of
        the held-out selection samples, on the backbone as it is now."""
        m, c, v = self.model, self.cfg, self.data.val
        was = m.training
        m.eval()
        W = self._frozen_weight()
        lat = None
        if c.reward.cost == "latency":
            lat = self._latency_per_layer()
        self._tree = build_tree(m, v.x[self.agent_idx], v.y[self.agent_idx], c.reward, self.cost_ref, W=W,
                                layer_cost=lat)
        self._sel_tree = None if not select or self.select_idx.numel() == 0 else build_tree(
            m, v.x[self.select_idx], v.y[self.select_idx], c.reward, self.cost_ref, W=W, layer_cost=lat)
        m.train(was)

    def _tree_step(self, pos: Tensor, gen: torch.Generator, beta: float):
        """One step of the exact policy gradient on the agent's samples at positions ``pos`` of the
        tree: maximise the expected reward (each sample at its own sampled lambda) plus ``beta`` x
        the reach-weighted entropy."""
        c, m = self.cfg, self.model
        sub = self._tree.select(pos)
        lam = self._sample_lam(pos.numel(), gen)
        lam = torch.full((pos.numel(),), float(c.reward.lam), dtype=torch.float64) if lam is None else lam
        tv = expected_return(m, sub, lam)
        loss = -(tv.value.mean() + beta * tv.entropy.mean())
        self._agent_update(list(m.policy.parameters()), loss)
        return float(loss.detach()), float(tv.value.detach().mean()), float(tv.steps.mean())

    def _agent_update(self, params: List[Tensor], loss: Tensor) -> None:
        """One optimiser step of the agent on ``loss`` (gradients averaged over ranks, clipped)."""
        self.opt_ag.zero_grad(set_to_none=False)
        loss.backward()
        ok = self._reduce(params, loss)
        self._check(ok, "agent", loss)
        torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.opt_ag.step()

    def _agent_batch(self, name: str, e: int, pos: Tensor, gen: torch.Generator):
        """One agent step on the agent samples at positions ``pos`` (of ``agent_idx``), by the
        configured method: ``(loss, mean reward, mean layers)``."""
        if self.cfg.agent_method == "tree":
            return self._tree_step(pos, gen, self._tree_beta(name, e))
        vi = self.agent_idx[pos]
        return self._agent_step(self.data.val.x[vi], self.data.val.y[vi], gen)

    def _phase_epochs(self, name: str) -> int:
        return getattr(self.cfg, f"{name}_epochs")

    def _tree_beta(self, name: str, e: int) -> float:
        """The entropy bonus of the tree method: ``entropy_beta`` decaying linearly to 0 at 80% of
        the agent and refit phases (the evaluation is greedy), 0 in the joint phase."""
        if name not in ("agent", "refit"):
            return 0.0
        return self.cfg.entropy_beta * max(0.0, 1.0 - e / max(1.0, 0.8 * self._phase_epochs(name)))

    @torch.no_grad()
    def select_score(self) -> float:
        """Held-out objective of the agent: the *greedy* policy's exact expected reward on the
        selection samples' tree, averaged over 9 prices log-spaced over [lam_min, lam_max]."""
        mc, t = self.model.cfg, self._sel_tree
        n = t.num_samples
        lo, hi = math.log(mc.lam_min), math.log(mc.lam_max)
        tot = 0.0
        for i in range(9):
            lam = torch.full((n,), math.exp(lo + (hi - lo) * i / 8), dtype=torch.float64)
            tot += float(expected_return(self.model, t, lam, greedy=True).value.mean())
        return tot / 9

    def _maybe_select(self, name: str, e: int) -> Optional[float]:
        c = self.cfg
        if self._sel_tree is None or not ((e + 1) % c.agent_select_every == 0 or e + 1 == self._phase_epochs(name)):
            return None
        score = self.select_score()
        if self.agent_best is None or score > self.agent_best["score"]:
            self.agent_best = dict(score=score, epoch=e,
                                   policy={k: v.detach().clone() for k, v in self.model.policy.state_dict().items()})
        return score

    def _set_agent_lr(self, name: str, e: int) -> None:
        """The agent's learning rate at epoch ``e`` of phase ``name``: ``agent_lr`` in the joint
        phase; in the agent and refit phases, with ``agent_lr_decay="linear"``, falling linearly to
        2% of it at the last epoch.  Set from ``(name, e)`` alone, so a resumed run agrees."""
        c = self.cfg
        f = 1.0
        if c.agent_lr_decay == "linear" and name in ("agent", "refit"):
            f = max(0.02, 1.0 - e / max(1, self._phase_epochs(name)))
        for g in self.opt_ag.param_groups:
            g["lr"] = c.agent_lr * f

    def _reset_agent(self) -> None:
        """The refit phase starts the agent afresh (seeded) on the final backbone."""
        # Policy's own initialisation, from the global RNG that fit() seeds at every epoch
        self.model.policy.load_state_dict(Policy(self.model.cfg).state_dict())
        self.opt_ag = torch.optim.Adam(list(self.model.agent_parameters()), lr=self.cfg.agent_lr)
        self.agent_best = None

    def _end_agent_phase(self) -> None:
        """Tree method: keep the policy of the best held-out epoch."""
        if self.cfg.agent_method == "tree" and self.agent_best is not None:
            self.model.policy.load_state_dict(self.agent_best["policy"])
            self.log(f"agent: kept epoch {self.agent_best['epoch']} (held-out objective "
                     f"{self.agent_best['score']:.4f})")

    def _latency_per_layer(self) -> Tensor:
        """``reward.cost="latency"``: the per-layer latency table measured at start-up on the running
        backend, rescaled to the FLOP table's mean so that lambda keeps its meaning."""
        m = self.model
        L = m.cfg.num_layers
        if not bool((m.latency_ms[:L] > 0).all()):
            m.measure_latency(batch=self.cfg.eval_batch)
        lat = m.latency_ms[:L].to(torch.float64)
        flops = torch.tensor([m.cost_table()[f"layer{i}"] for i in range(L)], dtype=torch.float64)
        return lat * (flops.mean() / lat.mean())

    def calibrate(self) -> float:
        """Set the default knob ``model.default_lam`` at the end of training from the held-out val
        split (``calibrate_knob`` with ``cfg.knob``, ``cfg.knob_flops``, ``cfg.knob_tolerance``)
        and record how in ``self.calibration``.  Leaves the model in train mode."""
        c = self.cfg
        lam, self.calibration = calibrate_knob(self.model, self.data.val.x, self.data.val.y, knob=c.knob,
                                               knob_flops=c.knob_flops, knob_tolerance=c.knob_tolerance)
        cal = self.calibration
        if cal["mode"] != "fixed":
            self.log(f"calibrated default knob on val ({cal['mode']}): lambda = {lam:.4g}, "
                     f"{cal['val_accuracy'] * 100:.1f}% at {cal['val_flops_ratio']:.2f}x static's FLOPs "
                     f"(static {cal['val_static_accuracy'] * 100:.1f}%)")
        self.model.train()
        return lam

    # -------------------------------------------------------------- loop
    def fit(self, resume: bool = False):
        c = self.cfg
        if resume and self.resume():
            self.log(f"resumed seed {c.seed} at phase '{PHASES[self.phase] if self.phase < len(PHASES) else 'done'}' "
                     f"epoch {self.epoch}")
        plan = self.plan()
        total_steps = sum(e * s for _, e, s in plan)
        done_steps = sum(e * s for _, e, s in plan[:self.phase]) + (self.epoch * plan[self.phase][2]
                                                                     if self.phase < len(plan) else 0)
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=total_steps, initial=done_steps, desc=f"seed {c.seed}", unit="step", leave=False,
                       dynamic_ncols=True, mininterval=0.5)
        try:
            while self.phase < len(plan):
                name, epochs, spe = plan[self.phase]
                bb_total = (c.warmup_epochs + c.joint_epochs) * plan[1][2]
                while self.epoch < epochs:
                    e = self.epoch
                    torch.manual_seed(_gen(c.seed, self.phase, e, 1).initial_seed())
                    g_order = _gen(c.seed, self.phase, e, 2)
                    g_pol = _gen(c.seed, self.phase, e, 3 + self.dist.rank)
                    stats = self._run_epoch(name, e, spe, g_order, g_pol, bb_total, bar)
                    self.history.append(dict(phase=name, epoch=e, **stats))
                    if bar is not None:
                        bar.set_postfix(phase=name, **{k: f"{v:.3f}" for k, v in stats.items()})
                    self.epoch += 1
                    self._broadcast()
                    if c.ckpt_every and self.epoch % c.ckpt_every == 0 and self.epoch < epochs:
                        self.save()
                if name in ("agent", "refit"):
                    self._end_agent_phase()
                self.phase, self.epoch = self.phase + 1, 0
                if self.phase >= len(plan):
                    self.calibrate()
                    self.save(complete=True)
                elif epochs:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        self.model.eval()
        self.mlp.eval()
        return self.model, self.mlp

    def _run_epoch(self, name, e, spe, g_order, g_pol, bb_total, bar) -> Dict[str, float]:
        c, d = self.cfg, self.data
        losses: List[float] = []
        extra: Dict[str, List[float]] = {"reward": [], "layers": []}
        tree = c.agent_method == "tree"
        if name == "refit" and e == 0:
            self._reset_agent()
        if name in ("agent", "joint", "refit"):
            self._set_agent_lr(name, e)
        if tree and name == "joint" or tree and name in ("agent", "refit") and (e == 0 or self._tree is None):
            self._build_trees(select=name != "joint")  # the joint phase moves the backbone: every epoch
        n_ag = len(self.agent_idx)
        if name in ("mlp", "warmup", "joint"):
            perm = torch.randperm(len(d.fit), generator=g_order)
            vperm = torch.randperm(n_ag, generator=g_order)
            vpos = 0
            for s in range(spe):
                idx = self._shard(perm[s * c.batch_size:(s + 1) * c.batch_size])
                if idx.numel() == 0:
                    continue
                xb, yb = d.fit.x[idx], d.fit.y[idx]
                if name == "mlp":
                    losses.append(self._mlp_step(xb, yb, e * spe + s, c.mlp_epochs * spe))
                else:
                    off = 0 if name == "warmup" else c.warmup_epochs * spe
                    losses.append(self._backbone_step(xb, yb, g_pol, off + e * spe + s, bb_total,
                                                      joint=name == "joint"))
                    if name == "joint":
                        vb = vperm[vpos:vpos + c.agent_batch]
                        if vb.numel() < c.agent_batch:
                            vperm = torch.randperm(n_ag, generator=g_order)
                            vpos, vb = 0, vperm[:c.agent_batch]
                        vpos += c.agent_batch
                        _, r, nl = self._agent_batch(name, e, self._shard(vb), g_pol)
                        extra["reward"].append(r)
                        extra["layers"].append(nl)
                if bar is not None:
                    bar.update(1)
        else:  # agent, refit
            vperm = torch.randperm(n_ag, generator=g_order)
            for s in range(spe):
                vb = self._shard(vperm[s * c.agent_batch:(s + 1) * c.agent_batch])
                if vb.numel() == 0:
                    continue
                lo, r, nl = self._agent_batch(name, e, vb, g_pol)
                losses.append(lo)
                extra["reward"].append(r)
                extra["layers"].append(nl)
                if bar is not None:
                    bar.update(1)
        sel = self._maybe_select(name, e) if tree and name in ("agent", "refit") else None
        out = {"loss": sum(losses) / max(1, len(losses))}
        if sel is not None:
            out["select"] = sel
        for k, v in extra.items():
            if v:
                out[k] = sum(v) / len(v)
        return out


def _is_value(model: DynaLay, p) -> bool:
    return any(p is q for q in model.value.parameters())


class _frozen:
    """Temporarily turn off requires_grad for some parameters (no graph is built through them)."""

    def __init__(self, params):
        self.params = [p for p in params]

    def __enter__(self):
        self.saved = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, s in zip(self.params, self.saved):
            p.requires_grad_(s)
        return False
