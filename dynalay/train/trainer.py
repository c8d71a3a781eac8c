"""Training DynaLay: schedule, policy gradient, supervised loss through the implicit gradients.

Schedule (one seed; every phase is a number of epochs in :class:`TrainConfig`):

1. ``mlp``: the MLP baseline (AdamW, cosine LR, dropout) on the ``fit`` split.
2. ``warmup``: the backbone (encoder, FPI pool, head) on the ``fit`` split, supervised along the
   static order (layer ``t mod L`` at step ``t``) where each step's layer is replaced by a random
   one with probability ``mix_prob`` (so every layer learns to read every state), with deep
   supervision: cross-entropy of the head on *every* visited state (``ds_weight``) plus the final
   state.  Gradients reach the FPI layers through ``dynamic_step``'s implicit (IFT) backward.
3. ``agent``: the backbone is frozen; the agent learns by REINFORCE on the held-out ``val`` split
   (``rollouts`` sampled trajectories per input), with the per-decision return-to-go of
   :mod:`dynalay.train.reward`, a learned baseline ``V(features_t)`` (or ``baseline=
   "self_critical"``: the greedy rollout's reward), advantage normalisation and an entropy bonus
   ``entropy_beta``.
4. ``joint``: alternation, one backbone step then one agent step: the backbone takes the
   cross-entropy at the final state of the trajectories the agent *sampled* on a ``fit`` batch
   (through the implicit gradients of every solve on the path) plus the deep-supervised static
   trajectory (which keeps intermediate states classifiable and the static baseline sharp); the
   agent takes a REINFORCE step on a ``val`` batch.

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
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import DynaLay, DynaLayConfig, MLPBaseline, mlp_hidden_for_params
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import DataBundle
from .reward import RewardConfig, compute_rewards

PHASES = ("mlp", "warmup", "agent", "joint")
BASELINES = ("learned", "self_critical", "rloo", "rloo_step")


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
    lr: float = 2e-3
    weight_decay: float = 1e-4
    mix_prob: float = 0.0
    ds_weight: float = 1.0
    h0_weight: float = 0.1
    agent_lr: float = 1e-2
    agent_batch: int = 64
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
    knob: Optional[float] = 0.3  # default lambda at inference ("dynalay"); None: calibrate on val
    knob_tolerance: float = 0.0  # calibration: cheapest lambda within this of static's val accuracy
    knobs: List[float] = field(default_factory=lambda: [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0])
    exit_thresholds: List[float] = field(default_factory=lambda: [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
                                                                  0.95, 0.99, 1.01])
    timing_repeats: int = 15
    ckpt_every: int = 5

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reward"] = self.reward.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {sorted(unknown)}")
        d = dict(d)
        if isinstance(d.get("reward"), dict):
            d["reward"] = RewardConfig(**d["reward"])
        return cls(**d)

    def model_config(self, data: DataBundle) -> DynaLayConfig:
        return DynaLayConfig(in_features=data.in_features, num_classes=data.num_classes, hidden=self.hidden,
                             num_layers=self.num_layers, max_steps=self.max_steps, tol=self.tol,
                             max_iter=self.max_iter, backward_max_iter=self.backward_max_iter,
                             spectral_bound=self.spectral_bound, agent_state_dim=self.agent_state_dim,
                             agent_hidden=self.agent_hidden, lam_min=self.lam_min, lam_max=self.lam_max,
                             backend=self.backend)

    def validate(self) -> "TrainConfig":
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES} (got {self.baseline!r})")
        if self.adv_norm not in ("std", "center", "none"):
            raise ValueError(f"adv_norm must be 'std', 'center' or 'none' (got {self.adv_norm!r})")
        for k in ("mlp_epochs", "warmup_epochs", "agent_epochs", "joint_epochs"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0")
        if self.batch_size < 1 or self.agent_batch < 1 or self.rollouts < 1:
            raise ValueError("batch_size, agent_batch and rollouts must be >= 1")
        if not (0.0 <= self.mix_prob <= 1.0):
            raise ValueError("mix_prob must be in [0, 1]")
        if len(self.knobs) < 1:
            raise ValueError("knobs needs at least one value")
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
        self._broadcast()

    # -------------------------------------------------------------- bookkeeping
    def meta(self) -> dict:
        return dict(dataset=self.cfg.dataset, model=self.model.cfg.to_dict(), mlp=self.mlp.config(),
                    seed=self.cfg.seed, val_fraction=self.cfg.val_fraction)

    def state(self) -> dict:
        return dict(model=self.model.state_dict(), mlp=self.mlp.state_dict(), opt_mlp=self.opt_mlp.state_dict(),
                    opt_bb=self.opt_bb.state_dict(), opt_ag=self.opt_ag.state_dict())

    def checkpoint_path(self) -> Optional[str]:
        return None if self.run_dir is None else os.path.join(self.run_dir, "checkpoint.pt")

    def save(self, complete: bool = False) -> Optional[str]:
        path = self.checkpoint_path()
        if path is None or not self.dist.is_main:
            return None
        return save_checkpoint(path, dict(state=self.state(), meta=self.meta(), train_config=self.cfg.to_dict(),
                                          position=[self.phase, self.epoch], complete=complete,
                                          history=self.history, data_mean=self.data.mean,
                                          data_std=self.data.std))

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
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path!r} does not fit this model: {e}") from e
        self.phase, self.epoch = ck["position"]
        self.history = list(ck.get("history", []))
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
                ("agent", c.agent_epochs, self._steps(len(d.val), c.agent_batch)),
                ("joint", c.joint_epochs, fit_steps)]

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
        m = self.model
        L = m.cfg.num_layers
        if not bool((m.latency_ms[:L] > 0).all()):
            m.measure_latency(batch=self.cfg.eval_batch)
        lat = m.latency_ms[:L].to(torch.float64)
        flops = torch.tensor([m.cost_table()[f"layer{i}"] for i in range(L)], dtype=torch.float64)
        per_layer = lat * (flops.mean() / lat.mean())
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
            with torch.no_grad():
                W = m.pool.effective_weight()
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
        params = list(m.agent_parameters())
        self.opt_ag.zero_grad(set_to_none=False)
        loss.backward()
        ok = self._reduce(params, loss)
        self._check(ok, "agent", loss)
        torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        self.opt_ag.step()
        return float(loss.detach()), float(R.total.mean()), float(out.steps.double().mean())

    @torch.no_grad()
    def calibrate(self) -> float:
        """Set the default knob (``cfg.knob``, or when None: the largest lambda of a log grid over
        [lam_min, lam_max] whose greedy accuracy on the held-out val split is within
        ``knob_tolerance`` of the static model's there).  Uses no test data."""
        m, c = self.model, self.cfg
        m.eval()
        if c.knob is not None:
            m.default_lam = c.knob
        else:
            x, y = self.data.val.x, self.data.val.y
            W = m.inference_weight()
            st = float((m.run_static(x, W=W).logits.argmax(1) == y).double().mean())
            lo, hi = math.log(m.cfg.lam_min), math.log(m.cfg.lam_max)
            grid = [math.exp(lo + (hi - lo) * i / 24) for i in range(25)]
            best = m.cfg.lam_min
            for lam in grid:
                acc = float((m.run(x, lam=lam, W=W).logits.argmax(1) == y).double().mean())
                if acc >= st - c.knob_tolerance:
                    best = lam
            m.default_lam = round(best, 4)
            self.log(f"calibrated default knob: lambda = {m.default_lam:.4g} (val: static {st * 100:.1f}%)")
        m.train()
        return m.default_lam

    # -------------------------------------------------------------- loop
    def fit(self, resume: bool = False):
        c, d = self.cfg, self.data
        if resume and self.resume():
            self.log(f"resumed seed {c.seed} at phase '{PHASES[self.phase] if self.phase < 4 else 'done'}' "
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
        if name in ("mlp", "warmup", "joint"):
            perm = torch.randperm(len(d.fit), generator=g_order)
            vperm = torch.randperm(len(d.val), generator=g_order)
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
                            vperm = torch.randperm(len(d.val), generator=g_order)
                            vpos, vb = 0, vperm[:c.agent_batch]
                        vpos += c.agent_batch
                        vb = self._shard(vb)
                        _, r, nl = self._agent_step(d.val.x[vb], d.val.y[vb], g_pol)
                        extra["reward"].append(r)
                        extra["layers"].append(nl)
                if bar is not None:
                    bar.update(1)
        else:  # agent
            vperm = torch.randperm(len(d.val), generator=g_order)
            for s in range(spe):
                vb = self._shard(vperm[s * c.agent_batch:(s + 1) * c.agent_batch])
                if vb.numel() == 0:
                    continue
                lo, r, nl = self._agent_step(d.val.x[vb], d.val.y[vb], g_pol)
                losses.append(lo)
                extra["reward"].append(r)
                extra["layers"].append(nl)
                if bar is not None:
                    bar.update(1)
        out = {"loss": sum(losses) / max(1, len(losses))}
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
