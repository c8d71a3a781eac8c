"""The DynaLay model (arXiv 2312.12781): an encoder, a pool of ``L`` fixed-point-iterative (FPI)
layers, a classifier head that reads any state, and an agent that, per sample and per step,
picks one of the ``L`` layers or NOP.

Step ``t = 0 .. T-1`` for every still-active sample:

1. the head reads the current state ``h_t`` (``logits_t``);
2. the agent reads the introspection features (the head's confidence and entropy on ``h_t``,
   whether its prediction changed since the previous state and the previous confidence, the
   relative change of the state made by the last layer, the step index, the sample's previous
   actions, the last solve's iterations and convergence flag, the compute price ``lam``, and
   optionally a learned projection of ``h_t``) and scores ``L + 1`` actions;
3. NOP ends the sample: its prediction is ``logits_t`` and it leaves the active batch (no compute
   at later steps); any other action ``a`` advances ``h_{t+1} = FPI_a(h_t)`` (the fixed point of
   ``z = tanh(W_a z + U_a h_t + b_a)``), all rows of the step in one ``dynalay.dynamic_step``.

After step ``T-1`` the head reads the remaining samples' final states.  Layers may be picked
again (recomputation on hard inputs).

Compute is *measured*: every row's FLOPs are summed from what was actually run (the
iterations each solve spent, see :class:`CostModel`), and ``rows_per_step`` records how many
rows each ``dynamic_step`` call received.

Inference-time knobs (no retraining): ``lam``, the price of compute the agent is conditioned on
(it was trained for every ``lam`` in ``[lam_min, lam_max]``: larger is cheaper); ``nop_bias`` is
added to the NOP logit (``> 0``: stop earlier, cheaper; ``< 0``: compute more); ``budget`` is a
hard per-batch FLOP budget (average
FLOPs per sample times the batch size) that is never exceeded: before each step the rows that
want to continue are ranked by the agent's preference (best layer logit minus NOP logit) and
only as many are admitted as the remaining budget can pay for in the worst case (``max_iter``
iterations); the others stop.

The same module also runs the baselines on the same layers: ``run(x, forced=...)`` applies a
per-row action table (``static``: layers in fixed order at every step; ``truncation``: the static
order cut after ``k`` steps) and ``exit_threshold`` adds a confidence exit (``early_exit``).
"""
from __future__ import annotations

import functools
import math
import time
import weakref
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _ext, backends
from ..nn.dynamic import DynamicFPIStep
from ..ops._common import EPS_MIN, SolverConfig, check_finite, is_real, tracing
from ..ops.dispatch import dynamic_step

__all__ = ["DynaLayConfig", "DynaLay", "DynaLayOutput", "CostModel", "Policy", "MLPBaseline", "mlp_hidden_for_params",
           "head_stats", "relative_change", "advance_history_"]


def config_from_dict(cls, d: dict):
    """``cls(**d)`` for a config dataclass, with a ``ValueError`` naming any field ``cls`` does not
    have (fields ``d`` lacks take their defaults: older checkpoints load)."""
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)}")
    return cls(**d)


@dataclass
class DynaLayConfig:
    """Architecture and solver settings (everything needed to rebuild the module)."""

    in_features: int
    num_classes: int
    hidden: int = 128            # H: state width
    num_layers: int = 4          # L: FPI layers in the pool (action L = NOP)
    max_steps: int = 4           # T: decisions per sample (static applies T layers)
    tol: float = 1e-2            # per-row relative residual at which a solve freezes
    max_iter: int = 6            # cap on f-evaluations per solve (accuracy saturates at ~4)
    backward: str = "implicit"   # "implicit" (IFT adjoint solve) or "phantom"
    backward_max_iter: int = 12
    spectral_bound: float = 0.9  # ||W_l||_2 <= bound: every layer is a contraction
    agent_state_dim: int = 0     # P: width of a learned projection of the state fed to the agent
                                 # (0: off; the agent still reads the state's statistics: RMS,
                                 # relative change, the head's confidence/entropy on it)
    agent_hidden: int = 64       # A: agent MLP width
    agent_prior: float = 2.0     # initial logit prior for the static schedule (Policy.step_bias)
    agent_conf: str = "logodds"  # the agent's confidence feature: "logodds" (clipped log-odds of the
                                 # max probability, see head_stats) or "prob" (the max probability)
    lam_min: float = 0.02        # the agent is conditioned on the compute price lambda in
    lam_max: float = 2.0         # [lam_min, lam_max] (log scale): the inference-time knob
    backend: Optional[str] = None  # dynalay backend (None: auto)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DynaLayConfig":
        return config_from_dict(cls, d)

    def validate(self) -> "DynaLayConfig":
        for k in ("in_features", "num_classes", "hidden", "num_layers", "max_steps", "max_iter",
                  "backward_max_iter", "agent_state_dim", "agent_hidden"):
            v = getattr(self, k)
            lo = 0 if k == "agent_state_dim" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"DynaLayConfig.{k} must be an int >= {lo} (got {v!r})")
        if self.num_classes < 2:
            raise ValueError("DynaLayConfig.num_classes must be >= 2")
        if not (self.tol >= EPS_MIN and math.isfinite(self.tol)):  # as the ops require
            raise ValueError(f"DynaLayConfig.tol must be a finite float >= {EPS_MIN:.4g} (got {self.tol!r})")
        if self.agent_conf not in CONF_FEATURES:
            raise ValueError(f"DynaLayConfig.agent_conf must be one of {CONF_FEATURES} (got {self.agent_conf!r})")
        if not (0 < self.lam_min < self.lam_max):
            raise ValueError(f"DynaLayConfig needs 0 < lam_min < lam_max (got {self.lam_min}, {self.lam_max})")
        return self

    @property
    def conf_mode(self) -> int:
        """``agent_conf`` as the C++ kernels' ``conf_mode`` (0: max probability, 1: log-odds)."""
        return CONF_FEATURES.index(self.agent_conf)

    @property
    def history_dim(self) -> int:
        # layer-use counts / T | last action one-hot | last solve's iters / max_iter | last converged |
        # relative state change of the last layer | confidence on the previous state | lambda
        return 2 * self.num_layers + 5

    @property
    def feature_dim(self) -> int:
        # proj(LayerNorm(h)) (agent_state_dim, 0 = off) | the head's confidence (agent_conf) and normalised
        # entropy on h, prediction changed since the previous state | history  (+ a learned per-step
        # embedding and logit prior inside the policy: the step index)
        return self.agent_state_dim + 3 + self.history_dim

    def lam_feature(self, lam):
        """lambda -> [-1, 1] on a log scale over [lam_min, lam_max] (clamped)."""
        lo, hi = math.log(self.lam_min), math.log(self.lam_max)
        if isinstance(lam, Tensor):
            return ((lam.clamp(self.lam_min, self.lam_max).log() - lo) / (hi - lo)) * 2 - 1
        return ((math.log(min(max(float(lam), self.lam_min), self.lam_max)) - lo) / (hi - lo)) * 2 - 1


class CostModel:
    """FLOPs per row (a multiply-add counts 2; activations, norms' and softmax's element-wise work
    are counted as listed).  Everything the forward runs is charged:

    ============  =======================================================================
    encoder       ``2 D H + H``                        (Linear D->H, tanh)
    head          ``2 H C + 5 H``                      (LayerNorm, Linear H->C)
    agent         ``2 H P + 2 F A + A + 2 A (L+1) + (L+1) + 6 C + 6 H``  (projection, MLP with step
                                                        embedding, softmax/entropy features, relative
                                                        state change; ``+ C + 2`` for the log-odds
                                                        confidence: a sum, a log, a clip)
    layer solve   ``2 H^2 + k * 2 H^2``                (projection U h + b, then k f-evaluations
                                                        z <- tanh(W z + U h + b), k = iterations
                                                        the solve actually spent)
    NOP           ``0``
    ============  =======================================================================
    """

    def __init__(self, cfg: DynaLayConfig):
        D, H, C, L = cfg.in_features, cfg.hidden, cfg.num_classes, cfg.num_layers
        P, A, Fd = cfg.agent_state_dim, cfg.agent_hidden, cfg.feature_dim
        self.encoder = float(2 * D * H + H)
        self.head = float(2 * H * C + 5 * H)
        self.agent = float(2 * H * P + 2 * Fd * A + A + 2 * A * (L + 1) + (L + 1) + 6 * C + 6 * H
                           + (C + 2 if cfg.agent_conf == "logodds" else 0))
        self.layer_fixed = float(2 * H * H)
        self.per_iter = float(2 * H * H)
        self.max_iter = cfg.max_iter
        self.num_layers = L

    def layer(self, iters: Tensor) -> Tensor:
        return self.layer_fixed + iters.to(torch.float64) * self.per_iter

    @property
    def constants(self) -> List[float]:
        """[encoder, layer_fixed, per_iter, head, agent]: what the C++ inference loop sums per row
        in the order of :meth:`per_sample`."""
        return [self.encoder, self.layer_fixed, self.per_iter, self.head, self.agent]

    def per_sample(self, layers: Tensor, iters: Tensor, head_states: Tensor, agent_states: Tensor) -> Tensor:
        """FLOPs of samples that applied ``layers`` solves spending ``iters`` f-evaluations in
        all, with the head run on ``head_states`` and the agent on ``agent_states`` states."""
        d = torch.float64
        return (self.encoder + self.layer_fixed * layers.to(d) + self.per_iter * iters.to(d)
                + self.head * head_states.to(d) + self.agent * agent_states.to(d))

    @property
    def worst_layer(self) -> float:
        return self.layer_fixed + self.max_iter * self.per_iter

    def table(self, mean_iters: Optional[Tensor] = None) -> Dict[str, float]:
        """Per-action cost table: expected FLOPs of one application of each layer (with the given
        mean iterations per layer, else ``max_iter``), NOP 0, plus the fixed per-state costs."""
        t = {}
        for layer in range(self.num_layers):
            k = self.max_iter if mean_iters is None else float(mean_iters[layer])
            t[f"layer{layer}"] = self.layer_fixed + k * self.per_iter
        t["nop"] = 0.0
        t.update(encoder=self.encoder, head=self.head, agent=self.agent)
        return t


@functools.lru_cache(maxsize=16)
def _solve_args(tol: float, max_iter: int) -> tuple:
    """The solver arguments of the C++ ops for the model's solves (validated once)."""
    return SolverConfig(tol, max_iter).validate().op_args()


CONF_FEATURES = ("prob", "logodds")
LOGODDS_CLIP = 6.0  # the log-odds confidence feature: clip(log(p / (1 - p)), -6, 6) / 3


def head_stats(logits: Tensor, conf: str = "prob"):
    """The agent's view of the head on a state: ``(conf, ent, pred)``: the confidence ``(n, 1)``,
    the entropy normalised by ``log C`` ``(n, 1)`` and the argmax ``(n,)``.

    ``conf="prob"``: the max probability ``p``.  ``conf="logodds"``: ``clip(log(p / (1 - p)), -6, 6)
    / 3``, computed as ``-log(sum_{j != argmax} exp(l_j - max))`` (no cancellation in ``1 - p``).
    On ``p`` the confident range where stopping decisions are made (``p`` = 0.8 .. 0.998) is
    squeezed into 0.2; in log-odds it spans 1.4 .. 6.  The C++ kernels (``conf_mode`` 1) compute
    the same."""
    if conf not in CONF_FEATURES:
        raise ValueError(f"conf must be one of {CONF_FEATURES} (got {conf!r})")
    lg = logits.detach()
    mx, pred = lg.max(1, keepdim=True)
    z = lg - mx
    e = z.exp()
    s_ = e.sum(1, keepdim=True)
    p = s_.reciprocal()
    ent = (s_.log() - (e * z).sum(1, keepdim=True) * p) * (1.0 / math.log(lg.shape[1]))
    if conf == "logodds":
        other = e.scatter(1, pred, 0.0).sum(1, keepdim=True)
        p = (-other.log()).clamp(-LOGODDS_CLIP, LOGODDS_CLIP) * (1.0 / 3.0)
    return p, ent, pred.squeeze(1)


@torch.no_grad()
def relative_change(h0: Tensor, h1: Tensor, n0: Optional[Tensor] = None):
    """``(||h1 - h0|| / (||h0|| + 1e-6), ||h1||)`` per row, from two reductions (``n0 = ||h0||``
    when the caller carries it)."""
    h0, h1 = h0.detach(), h1.detach()
    if n0 is None:
        n0 = torch.linalg.vector_norm(h0, dim=1)
    n1 = torch.linalg.vector_norm(h1, dim=1)
    d2 = (n1 * n1 + n0 * n0 - 2 * torch.linalg.vecdot(h1, h0)).clamp_(min=0)
    return d2.sqrt_() / (n0 + 1e-6), n1


def advance_history_(hist: Tensor, a: Tensor, iters: Tensor, converged: Tensor, dch: Tensor, conf: Tensor,
                     cfg: "DynaLayConfig") -> Tensor:
    """The agent's history after the rows of ``hist`` applied layers ``a`` (in place; ``hist``
    must be the caller's own): layer-use counts / T, last action one-hot, the solve's iterations /
    max_iter, its convergence flag, the relative state change and the confidence before the step
    (the last column, lambda, is kept)."""
    L = cfg.num_layers
    ac = a.unsqueeze(1)
    hist[:, :L].scatter_add_(1, ac, hist.new_full((ac.shape[0], 1), 1.0 / cfg.max_steps))
    last_oh = hist[:, L:2 * L]
    last_oh.zero_()
    last_oh.scatter_(1, ac, 1.0)
    hist[:, 2 * L].copy_(iters).mul_(1.0 / cfg.max_iter)
    hist[:, 2 * L + 1].copy_(converged)
    hist[:, 2 * L + 2].copy_(dch)
    hist[:, 2 * L + 3].copy_(conf)
    return hist


class DynaLayOutput(NamedTuple):
    logits: Tensor                 # (B, C) prediction of each sample (the head on its final state)
    flops: Tensor                  # (B,) float64 FLOPs spent on each sample (CostModel)
    steps: Tensor                  # (B,) int64 layers applied to each sample
    iters: Tensor                  # (B,) int64 f-evaluations spent on each sample (all its solves)
    rows_per_step: List[int]       # rows handed to dynamic_step at each step
    actions: Optional[Tensor] = None     # (B, T) layer, L = NOP, -1 = already done (details/record)
    step_iters: Optional[Tensor] = None  # (B, T) int32 f-evaluations per step (details/record)
    # training only (record=True)
    log_probs: Optional[Tensor] = None     # (B, T) log pi(a_t) where the agent decided, else 0
    entropy: Optional[Tensor] = None       # (B, T)
    values: Optional[Tensor] = None        # (B, T) learned baseline V(features_t, t)
    decided: Optional[Tensor] = None       # (B, T) bool: the agent decided at step t
    step_flops: Optional[Tensor] = None    # (B, T) FLOPs charged to the decision at step t
    state_change: Optional[Tensor] = None  # (B, T) ||h_{t+1} - h_t|| / ||h_t|| (0 for NOP)
    inter_logits: Optional[List] = None    # [(rows, logits)] the head on every visited state


class Policy(nn.Module):
    """The agent: ``features -> Linear -> + step embedding -> tanh -> Linear -> L+1 logits``.
    ``proj`` maps the (layer-normalised) state to ``agent_state_dim`` introspection features."""

    def __init__(self, cfg: DynaLayConfig):
        super().__init__()
        A, L = cfg.agent_hidden, cfg.num_layers
        self.proj = nn.Linear(cfg.hidden, cfg.agent_state_dim) if cfg.agent_state_dim > 0 else None
        self.inp = nn.Linear(cfg.feature_dim, A)
        self.step_emb = nn.Parameter(torch.zeros(cfg.max_steps, A))
        self.out = nn.Linear(A, L + 1)
        # per-step logit prior, learned: initialised to prefer the static schedule (layer t mod L at
        # step t) over the other layers and to continue rather than stop, so that exploration starts
        # around the schedule the layers were warmed up on
        prior = torch.zeros(cfg.max_steps, L + 1)
        for t in range(cfg.max_steps):
            prior[t, t % L] = cfg.agent_prior
        prior[:, L] = 0.5 * cfg.agent_prior
        self.step_bias = nn.Parameter(prior)

    def forward(self, f: Tensor, t: int) -> Tensor:
        return self.out(torch.tanh(self.inp(f) + self.step_emb[t])) + self.step_bias[t]


def _check_knobs(lam, nop_bias, budget, exit_threshold, B: int, dev: torch.device) -> None:
    """The inference knobs of ``DynaLay.run`` (``B`` rows of ``x`` on ``dev``): a clear error
    naming the bad one."""
    if lam is not None:
        if isinstance(lam, Tensor):
            if not lam.is_floating_point() or lam.device != dev or tuple(lam.shape) not in ((), (B,)):
                raise ValueError(f"lam as a tensor must be a floating-point scalar or ({B},) tensor on {dev} "
                                 f"(got {lam.dtype} {tuple(lam.shape)} on {lam.device})")
            if lam.numel() and not tracing(lam) and not bool(torch.isfinite(lam).all() & (lam >= 0).all()):
                raise ValueError("lam must hold finite values >= 0 (got NaN, Inf or a negative value)")
        elif not is_real(lam) or not (0 <= lam < math.inf):
            raise ValueError(f"lam must be a finite number >= 0 or a (B,) tensor (got {lam!r})")
    if not is_real(nop_bias) or nop_bias != nop_bias:
        raise ValueError(f"nop_bias must be a number (+-inf allowed), not NaN (got {nop_bias!r})")
    if budget is not None and (not is_real(budget) or not (0 < budget < math.inf)):
        raise ValueError(f"budget must be None or a finite number of FLOPs per sample > 0 (got {budget!r})")
    if exit_threshold is not None and (not is_real(exit_threshold) or exit_threshold != exit_threshold):
        raise ValueError(f"exit_threshold must be None or a number, not NaN (got {exit_threshold!r})")


class DynaLay(nn.Module):
    """See the module docstring.  ``forward(x, nop_bias=0., budget=None)`` returns greedy logits;
    ``run(...)`` returns a :class:`DynaLayOutput` with per-sample compute."""

    def __init__(self, cfg: DynaLayConfig):
        super().__init__()
        self.cfg = cfg.validate()
        H, L, T = cfg.hidden, cfg.num_layers, cfg.max_steps
        self.encoder = nn.Linear(cfg.in_features, H)
        self.pool = DynamicFPIStep(L, H, spectral_bound=cfg.spectral_bound, tol=cfg.tol, max_iter=cfg.max_iter,
                                   backward=cfg.backward, backward_max_iter=cfg.backward_max_iter, check="none",
                                   backend=cfg.backend)
        self.head = nn.Sequential(nn.LayerNorm(H), nn.Linear(H, cfg.num_classes))
        self.policy = Policy(cfg)
        self._static_rows: Dict[tuple, Tensor] = {}  # static_actions' row per (steps, device)
        # learned baseline for REINFORCE (training only: never run, never charged at inference)
        self.value = nn.Sequential(nn.Linear(cfg.feature_dim + T, cfg.agent_hidden), nn.Tanh(),
                                   nn.Linear(cfg.agent_hidden, 1))
        self.costs = CostModel(cfg)
        # the knob used when run() gets no lam (a buffer, so that it travels with the checkpoint)
        self.register_buffer("default_knob", torch.tensor(0.3, dtype=torch.float64))
        self.register_buffer("mean_iters", torch.full((L,), float(cfg.max_iter)))  # running mean, cost table
        self.register_buffer("latency_ms", torch.zeros(L + 1))  # optional: measure_latency()
        self.nop = L

    # ------------------------------------------------------------------ helpers
    @property
    def default_lam(self) -> float:
        return float(self.default_knob)

    @default_lam.setter
    def default_lam(self, v: float) -> None:
        self.default_knob.fill_(float(v))

    def backbone_parameters(self):
        for m in (self.encoder, self.pool, self.head):
            yield from m.parameters()

    def agent_parameters(self):
        for m in (self.policy, self.value):
            yield from m.parameters()

    def solve_kwargs(self) -> dict:
        c = self.cfg
        return dict(tol=c.tol, max_iter=c.max_iter, backward=c.backward, backward_max_iter=c.backward_max_iter,
                    check="none", backend=c.backend)

    def static_order(self, steps: Optional[int] = None) -> List[int]:
        T = self.cfg.max_steps if steps is None else steps
        return [t % self.cfg.num_layers for t in range(T)]

    def static_actions(self, B: int, steps: Optional[int] = None, device=None) -> Tensor:
        """(B, T) action table of the static model (layer ``t mod L`` at step ``t``); with
        ``steps=k < T`` the rest is NOP (truncation)."""
        T = self.cfg.max_steps
        k = T if steps is None else int(steps)
        if not 0 <= k <= T:
            raise ValueError(f"steps must be in [0, {T}] (got {steps})")
        key = (k, torch.device("cpu") if device is None else torch.device(device))
        row = self._static_rows.get(key)
        if row is None:  # built once per (steps, device): a batch-1 call is ~100 us in all
            row = torch.tensor(self.static_order(T)[:k] + [self.nop] * (T - k), dtype=torch.int64, device=key[1])
            self._static_rows[key] = row
        return row.expand(B, T).clone()

    @torch.no_grad()
    def inference_weight(self) -> Tensor:
        """The pool's effective weight for inference (pass it as ``run(..., W=...)`` across
        batches): the same values as ``pool.effective_weight()``, detached and, on CPU, laid out
        column-major (``W.transpose(1, 2)`` is contiguous).  The solves multiply ``z W^T``; with
        this layout MKL runs its NN GEMM kernel instead of NT, measured 15-40% faster for 1 to
        128 rows at H = 256 on the 2-core CI machine.  The copy (~0.25 ms at L = 4, H = 256)
        is paid once, not per batch."""
        W = self.pool.effective_weight().detach()
        if W.device.type != "cpu":
            return W
        return W.transpose(1, 2).contiguous().transpose(1, 2)

    def cost_table(self) -> Dict[str, float]:
        return self.costs.table(self.mean_iters)

    def static_flops_per_sample(self) -> float:
        """FLOPs of the static model per sample with ``max_iter`` iterations per solve (worst case)."""
        c = self.costs
        return c.encoder + self.cfg.max_steps * c.worst_layer + c.head

    @torch.no_grad()
    def _track_iters(self, a: Tensor, it: Tensor) -> None:
        L = self.cfg.num_layers
        n = torch.bincount(a, minlength=L)[:L].to(self.mean_iters.dtype)
        s = torch.bincount(a, weights=it.to(self.mean_iters.dtype), minlength=L)[:L]
        seen = n > 0
        self.mean_iters[seen] = 0.95 * self.mean_iters[seen] + 0.05 * (s[seen] / n[seen])

    def _admit(self, a: Tensor, g: Tensor, live: Tensor, remaining: float, per_row: float) -> Tensor:
        """Hard budget: of the live rows that want a layer, admit those the agent prefers most
        (best layer logit minus NOP logit), as many as ``remaining`` pays for at worst-case cost."""
        L = self.cfg.num_layers
        want = live & (a != L)
        n_want = int(want.sum())
        room = remaining / per_row + 1e-9  # inf for a huge budget: never converted to an int
        if n_want <= room:
            return a
        k = max(0, int(math.floor(room)))
        rows = want.nonzero().squeeze(1)  # ascending: the same order with and without compaction
        pref = (g[rows, :L].amax(1) - g[rows, L]).detach().float()
        # a stable sort: equal preferences (duplicate rows, an infinite nop_bias) go by row order
        keep = rows[torch.sort(pref, descending=True, stable=True).indices[:k]]
        stop = want.clone()
        stop[keep] = False
        return torch.where(stop, torch.full_like(a, L), a)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, lam: Optional[float] = None, nop_bias: float = 0.0,
                budget: Optional[float] = None) -> Tensor:
        return self.run(x, lam=lam, nop_bias=nop_bias, budget=budget).logits

    def run(self, x: Tensor, *, policy: str = "greedy", lam=None, nop_bias: float = 0.0,
            budget: Optional[float] = None,
            forced: Optional[Tensor] = None, exit_threshold: Optional[float] = None, compact: bool = True,
            generator: Optional[torch.Generator] = None, W: Optional[Tensor] = None, details: bool = False,
            record: bool = False, fused: Optional[bool] = None) -> DynaLayOutput:
        """Run the model on ``x`` (``(B, D)``).

        policy: ``"greedy"`` (argmax of the agent, evaluation), ``"sample"`` (training) or
            ``"forced"`` (the per-row action table ``forced`` ``(B, T)``, no agent; an entry ``L``
            stops the row: ``static_actions`` builds the static / truncation tables).
        lam: the price of compute the agent is conditioned on (the main inference knob: larger is
            cheaper); a float or a ``(B,)`` tensor (training samples one per trajectory); default
            ``default_lam``.
        nop_bias: added to the NOP logit (a second knob; > 0 stops earlier, < 0 computes more).
        budget: hard per-batch budget in FLOPs per sample: the batch never spends more than
            ``budget * B`` FLOPs (CostModel).  It must cover the encoder, head and agent on the input.
        exit_threshold: with ``forced``, a row also stops as soon as the head's max probability on
            its state reaches the threshold (early exit; the head then runs at every state).
        compact: True (default; measured faster on CPU): finished rows leave the batch
            (index_select of the active rows; later steps compute on active rows only); False:
            finished rows stay and are passed action NOP (identical results).
        generator: for ``policy="sample"``.
        W: the pool's effective weight (training computes it once per optimisation step).
        details: also return the per-step action and iteration tables.
        record: also return the training fields (implies ``details``).
        fused: run the whole loop in one C++ call (``dynalay_C::run_model``: the same actions,
            iterations and FLOPs, logits equal to rounding; see :meth:`fused_reason`): ``None``
            (default) when it can, ``True`` requires it (``RuntimeError`` with the reason
            otherwise), ``False`` runs the Python loop.
        """
        cfg, cost = self.cfg, self.costs
        L, T, C = cfg.num_layers, cfg.max_steps, cfg.num_classes
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point torch.Tensor (got {getattr(x, 'dtype', type(x).__name__)})")
        if x.dim() != 2 or x.shape[1] != cfg.in_features:
            raise ValueError(f"x must have shape (B, {cfg.in_features}) (got {tuple(x.shape)})")
        B, dev = x.shape[0], x.device
        if B == 0:
            raise ValueError("x is an empty batch")
        w_enc = self.encoder.weight
        if x.dtype != w_enc.dtype or dev != w_enc.device:
            raise ValueError(f"x must have the model's dtype and device ({w_enc.dtype} on {w_enc.device}; got "
                             f"{x.dtype} on {dev}): convert the input or the model with .to()")
        if policy not in ("greedy", "sample", "forced"):
            raise ValueError(f"policy must be 'greedy', 'sample' or 'forced' (got {policy!r})")
        use_agent = policy != "forced"
        if use_agent:
            if exit_threshold is not None or forced is not None:
                raise ValueError("forced / exit_threshold need policy='forced'")
        else:
            if forced is None or tuple(forced.shape) != (B, T):
                raise ValueError(f"policy='forced' needs forced of shape ({B}, {T})")
            if budget is not None:
                raise ValueError("budget applies to the agent's policy, not to a forced action table")
            if forced.dtype != torch.int64 or forced.device != dev:
                raise ValueError(f"forced must be a ({B}, {T}) int64 table on {dev} (got {forced.dtype} on "
                                 f"{forced.device})")
            if nop_bias:
                raise ValueError("nop_bias applies to the agent's policy, not to a forced action table")
        _check_knobs(lam, nop_bias, budget, exit_threshold, B, dev)
        check_finite("warn", x=x)
        if W is not None:
            self._check_weight(W)
        out = self._run(x, policy, lam, nop_bias, budget, forced, exit_threshold, compact, generator, W,
                        details or record, record, fused)
        # inference: one small read for NaN/Inf from W or the parameters (in training a non-finite
        # loss stops the run on every rank: TrainingDiverged)
        if not record and not torch.is_grad_enabled() and not tracing(out.logits):
            try:
                check_finite("warn", logits=out.logits)
            except ValueError:
                self._raise_non_finite(W)
                raise
        return out

    def _check_weight(self, W: Tensor) -> None:
        """NaN/Inf in a passed ``W`` (an Inf can saturate tanh into finite, wrong logits).  The
        evaluation passes the same tensor for every batch: it is scanned once per version."""
        version = None if W.is_inference() else W._version  # inference tensors keep no version counter
        seen = self.__dict__.get("_w_checked")
        if seen is not None and seen[0]() is W and seen[1] == version:
            return
        if not tracing(W):
            check_finite("warn", W=W)
            self.__dict__["_w_checked"] = (weakref.ref(W), version)

    def _raise_non_finite(self, W: Optional[Tensor]) -> None:
        """Name the input that made the logits non-finite (x is checked before the run)."""
        if W is not None:
            check_finite("warn", W=W)
        for name, p in self.named_parameters():
            check_finite("warn", **{f"parameter {name}": p.detach()})

    def _run(self, x: Tensor, policy: str, lam, nop_bias: float, budget: Optional[float], forced: Optional[Tensor],
             exit_threshold: Optional[float], compact: bool, generator: Optional[torch.Generator],
             W: Optional[Tensor], details: bool, record: bool, fused: Optional[bool]) -> DynaLayOutput:
        cfg, cost = self.cfg, self.costs
        L, T, C = cfg.num_layers, cfg.max_steps, cfg.num_classes
        B, dev = x.shape[0], x.device
        use_agent = policy != "forced"
        if fused is not False:
            lam_v = self.default_lam if lam is None else lam
            why = self.fused_reason(x, policy=policy, lam=lam_v, budget=budget, compact=compact, record=record)
            if why is None:
                return self._run_fused(x, policy, lam_v, nop_bias, forced, exit_threshold, W, details)
            if fused:
                raise RuntimeError(f"DynaLay.run(fused=True) cannot run: {why}")
        head_every_state = use_agent or exit_threshold is not None or record
        if W is None:
            W = self.pool.effective_weight()
        U, b = self.pool.U, self.pool.b
        skw = self.solve_kwargs()
        ln, head_lin = self.head[0], self.head[1]
        P = cfg.agent_state_dim
        fuse = use_agent and P > 0 and not record and not torch.is_grad_enabled()
        if fuse:  # one matmul for the head and the agent's state projection
            w_cat = torch.cat([head_lin.weight, self.policy.proj.weight])
            b_cat = torch.cat([head_lin.bias, self.policy.proj.bias])
        i64 = torch.int64

        h = torch.tanh(self.encoder(x))
        rows = torch.arange(B, device=dev)          # the rows the per-row tensors below refer to
        hs = h                                      # their states
        hist = prev_pred = None
        if use_agent:
            hist = h.new_zeros(B, cfg.history_dim)
            lam = self.default_lam if lam is None else lam
            hist[:, -1] = cfg.lam_feature(lam.to(h.dtype) if isinstance(lam, Tensor) else lam)
            prev_pred = torch.full((B,), -1, dtype=i64, device=dev)
        hist_base_ptr = hist.data_ptr() if hist is not None else None
        hn = None  # norms of the current states (agent)
        live = None if compact else torch.ones(B, dtype=torch.bool, device=dev)
        layers_all = torch.zeros(B, dtype=i64, device=dev)
        iters_all = torch.zeros(B, dtype=i64, device=dev)
        final = h.new_zeros(B, C) if not record else None
        out_rows: List[Tensor] = []
        out_logits: List[Tensor] = []
        rows_per_step: List[int] = []
        actions = torch.full((B, T), -1, dtype=i64, device=dev) if details else None
        step_iters = torch.zeros(B, T, dtype=torch.int32, device=dev) if details else None
        if record:
            rec: List = []
            step_flops = torch.zeros(B, T, dtype=torch.float64, device=dev)
            state_change = h.new_zeros(B, T)
            inter: List = []
        spent = 0.0
        total_budget = None
        if budget is not None:
            total_budget = float(budget) * B
            mandatory = cost.encoder + cost.head + cost.agent
            if mandatory > float(budget) * (1 + 1e-12):
                raise ValueError(f"budget {float(budget):.4g} FLOPs/sample is below the minimum {mandatory:.4g} "
                                 f"(encoder + head + agent on the input)")
            spent = B * mandatory
        # inference of the greedy agent on the cpp backend: the decision is the C++ kernel that the
        # one-call loop (run_model) uses, so the two paths agree
        c_decide = use_agent and policy == "greedy" and budget is None and \
            self.fused_reason(x, lam=lam, compact=True, record=record) is None
        agent_w = self._agent_weights()[:6] if c_decide else None
        bias_vec = None
        if use_agent and nop_bias:
            bias_vec = torch.zeros(L + 1, dtype=h.dtype, device=dev)
            bias_vec[L] = float(nop_bias)

        for t in range(T + 1):
            last_step = t == T
            n = rows.shape[0]
            # ---- the head (and the agent's projection) on the current states
            logits_t = proj = None
            if head_every_state:
                zn = ln(hs)
                if fuse:
                    both = F.linear(zn, w_cat, b_cat)
                    logits_t, proj = both[:, :C], both[:, C:]
                else:
                    logits_t = head_lin(zn)
                    if use_agent and P > 0 and not last_step:
                        proj = self.policy.proj(zn.detach())
                if record:
                    inter.append((rows if compact else rows[live], logits_t if compact else logits_t[live]))
            # ---- decide
            g = None
            if last_step:
                a = torch.full((n,), L, dtype=i64, device=dev)
            elif use_agent and c_decide:  # the agent_decide kernel (the fused loop's arithmetic)
                a, conf, pred = torch.ops.dynalay_C.agent_decide(logits_t, proj, hist, prev_pred, agent_w, t,
                                                                 float(nop_bias), cfg.conf_mode)
            elif use_agent:
                conf, ent, pred = head_stats(logits_t, cfg.agent_conf)
                changed = (pred != prev_pred).unsqueeze(1).to(h.dtype)
                f = torch.cat([proj, conf, ent, changed, hist] if P > 0 else [conf, ent, changed, hist], 1)
                conf = conf.squeeze(1)
                g = self.policy(f, t)
                if bias_vec is not None:
                    g = g + bias_vec
                nop_only = nop_bias == math.inf  # the softmax's limit: NOP with probability 1
                if policy == "greedy":
                    a = g.argmax(1)
                elif nop_only:
                    a = torch.full((n,), L, dtype=i64, device=dev)
                else:
                    a = torch.multinomial(F.softmax(g.detach().float(), 1), 1, generator=generator).squeeze(1)
                if record:
                    if nop_only:
                        logp_all = torch.full_like(g, -math.inf).index_fill(1, torch.tensor([L], device=dev), 0.0)
                    else:
                        logp_all = F.log_softmax(g, 1)  # a -inf NOP logit (nop_bias=-inf): log-prob -inf
                    lp = logp_all.gather(1, a[:, None]).squeeze(1)
                    p_all = logp_all.exp()
                    en = -torch.where(p_all > 0, p_all * logp_all, torch.zeros_like(p_all)).sum(1)
                    onehot_t = f.new_zeros(n, T)
                    onehot_t[:, t] = 1.0
                    v = self.value(torch.cat([f.detach(), onehot_t], 1)).squeeze(1)
                    sel = slice(None) if compact else live
                    rec.append((t, rows[sel], lp[sel], en[sel], v[sel]))
            else:
                a = forced[rows, t]
                if exit_threshold is not None:
                    conf = F.softmax(logits_t.detach(), 1).amax(1)
                    a = torch.where(conf >= exit_threshold, torch.full_like(a, L), a)
            if not compact:
                a = torch.where(live, a, torch.full_like(a, L))
            if total_budget is not None and not last_step:
                per_row = cost.worst_layer + cost.head + (cost.agent if t + 1 < T else 0.0)
                a = self._admit(a, g, torch.ones_like(a, dtype=torch.bool) if compact else live,
                                total_budget - spent, per_row)
            if details and not last_step:
                if compact:
                    actions[rows, t] = a
                else:
                    actions[:, t] = torch.where(live, a, actions[:, t])
            stop = a == L
            if not compact:
                stop = stop & live
            # ---- rows that stop now: their prediction is the head on their current state
            sidx = stop.nonzero().squeeze(1)
            n_stop = sidx.shape[0]
            if n_stop:
                srows = rows.index_select(0, sidx)
                if logits_t is None:  # static / truncation: the head only runs where a row ends
                    sl = self.head(hs.index_select(0, sidx))
                else:
                    sl = logits_t.index_select(0, sidx)
                if record:
                    out_rows.append(srows)
                    out_logits.append(sl)
                else:
                    final.index_copy_(0, srows, sl)
            n_live = n if compact else int(live.sum())
            n_run = n_live - n_stop
            if last_step or n_run == 0:
                break
            # ---- advance the running rows through the layers they chose: one dynamic_step
            if compact:
                if n_stop:
                    ridx = (~stop).nonzero().squeeze(1)
                    rows, hs, a = rows.index_select(0, ridx), hs.index_select(0, ridx), a.index_select(0, ridx)
                    if hist is not None:
                        hist, conf, pred = hist.index_select(0, ridx), conf.index_select(0, ridx), \
                            pred.index_select(0, ridx)
                        if hn is not None:
                            hn = hn.index_select(0, ridx)
                run_mask = None
            else:
                run_mask = live & ~stop
                a = torch.where(run_mask, a, torch.full_like(a, L))
            rows_per_step.append(int(rows.shape[0]))
            r = dynamic_step(hs, a, U, W, b, **skw)
            it = r.iters
            # ---- bookkeeping
            if compact:
                layers_all.index_add_(0, rows, torch.ones_like(rows))
                iters_all.index_add_(0, rows, it.to(i64))
            else:
                layers_all += run_mask.to(i64)
                iters_all += it.to(i64)  # NOP rows report 0
            if total_budget is not None:
                spent += n_run * (cost.layer_fixed + cost.head + (cost.agent if t + 1 < T else 0.0)) \
                    + float(it.sum()) * cost.per_iter
            if hist is not None:
                dch, hn = relative_change(hs, r.h, hn)  # the norm of the state is carried
                if compact:  # update the running rows' history in place (hist is theirs alone)
                    if hist.data_ptr() == hist_base_ptr:
                        hist = hist.clone()
                    advance_history_(hist, a, it, r.converged, dch, conf, cfg)
                    prev_pred = pred
                else:
                    oh = F.one_hot(a.clamp(max=L - 1), L).to(h.dtype)
                    new_hist = torch.cat([hist[:, :L] + oh * (1.0 / T), oh,
                                          torch.stack([it.to(h.dtype) * (1.0 / cfg.max_iter), r.converged.to(h.dtype),
                                                       dch.to(h.dtype), conf], 1), hist[:, -1:]], 1)
                    hist = torch.where(run_mask[:, None], new_hist, hist)
                    prev_pred = torch.where(run_mask, pred, prev_pred)
            if details:
                if compact:
                    step_iters[rows, t] = it
                else:
                    step_iters[:, t] = it
            if record:
                ran = rows if compact else rows[run_mask]
                it_r = it if compact else it[run_mask]
                nxt = cost.head + (cost.agent if (use_agent and t + 1 < T) else 0.0)
                step_flops[ran, t] = cost.layer(it_r) + nxt
                with torch.no_grad():
                    h0r, h1r = (hs, r.h) if compact else (hs[run_mask], r.h[run_mask])
                    dh = (h1r - h0r).norm(dim=1) / (h0r.norm(dim=1) + 1e-6)
                state_change[ran, t] = dh.to(state_change.dtype)
            if self.training:
                self._track_iters(a if compact else a[run_mask], it if compact else it[run_mask])
            hs = r.h
            if not compact:
                live = run_mask

        # ---- per-sample FLOPs from what ran (CostModel)
        if use_agent:
            head_states = layers_all + 1
            agent_states = torch.clamp(layers_all + 1, max=T)
        else:
            head_states = layers_all + 1 if head_every_state else torch.ones_like(layers_all)
            agent_states = torch.zeros_like(layers_all)
        flops = cost.per_sample(layers_all, iters_all, head_states, agent_states)
        if total_budget is not None and float(flops.sum()) > total_budget * (1 + 1e-9):
            raise RuntimeError("internal error: the hard budget was exceeded")  # admission is worst-case
        if record:
            logits = torch.cat(out_logits).new_zeros(B, C).index_copy(0, torch.cat(out_rows), torch.cat(out_logits))
        else:
            logits = final
        if not record:
            return DynaLayOutput(logits, flops, layers_all, iters_all, rows_per_step, actions, step_iters)
        log_probs, entropy, values = h.new_zeros(B, T), h.new_zeros(B, T), h.new_zeros(B, T)
        decided = torch.zeros(B, T, dtype=torch.bool, device=dev)
        if rec:
            ti = torch.cat([torch.full_like(p[1], p[0]) for p in rec])
            ri = torch.cat([p[1] for p in rec])
            log_probs = log_probs.index_put((ri, ti), torch.cat([p[2] for p in rec]))
            entropy = entropy.index_put((ri, ti), torch.cat([p[3] for p in rec]))
            values = values.index_put((ri, ti), torch.cat([p[4] for p in rec]))
            decided[ri, ti] = True
        return DynaLayOutput(logits, flops, layers_all, iters_all, rows_per_step, actions, step_iters, log_probs,
                             entropy, values, decided, step_flops, state_change, inter)

    def fused_reason(self, x: Tensor, *, policy: str = "greedy", lam=None, budget=None, compact: bool = True,
                     record: bool = False) -> Optional[str]:
        """Why ``run`` cannot take the one-call C++ inference loop for these arguments (None: it can).
        It covers inference (no gradient, eval mode) of the greedy agent or a forced table (static,
        truncation, early exit) with compaction and no hard budget, on the ``cpp`` backend."""
        if record or self.training or torch.is_grad_enabled():
            return "training (record, train mode or gradient enabled)"
        if policy == "sample" or budget is not None or not compact:
            return "sampled policy, hard budget or compact=False"
        if isinstance(lam, Tensor):
            return "lam is a tensor"
        U = self._modules["pool"]._parameters["U"]
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or U.dtype != x.dtype:
            return "needs float32/float64 CPU tensors of the model's dtype"
        if tracing(x, U):
            return "tracing (torch.compile or a dispatch mode)"
        if backends.select(x.device, x.dtype, ("picard",), self.cfg.backend) != "cpp":
            return "the selected backend is not cpp"
        return _ext.cpp_error() or None

    def _agent_weights(self) -> List[Tensor]:
        """The policy's weights in the order of the C++ kernels (agent_decide takes the first 6)."""
        pol = self._modules["policy"]
        mods, ps = pol._modules, pol._parameters
        inp, out = mods["inp"]._parameters, mods["out"]._parameters
        w = [inp["weight"], inp["bias"], ps["step_emb"], out["weight"], out["bias"], ps["step_bias"]]
        proj = mods.get("proj")  # absent (an attribute set to None) without agent_state_dim
        if proj is not None:
            w += [proj._parameters["weight"], proj._parameters["bias"]]
        return w

    def _run_fused(self, x, policy, lam, nop_bias, forced, exit_threshold, W, details) -> DynaLayOutput:
        cfg, cost = self.cfg, self.costs
        # registered parameters read from the modules' dicts (this and _agent_weights): on a batch of
        # one row, nn.Module's __getattr__ for the ~20 lookups was ~15% of the call
        mods = self._modules
        pool, head = mods["pool"], mods["head"]._modules
        enc, ln, head_lin = mods["encoder"]._parameters, head["0"], head["1"]._parameters
        if W is None:
            W = pool.effective_weight()
        agent, lam_feature = [], 0.0
        if policy != "forced":
            agent = self._agent_weights()
            lam_feature = cfg.lam_feature(lam)
        from ..backends import cpp as cpp_backend
        logits, flops, layers, iters, actions, step_iters, rps = cpp_backend.run_model(
            x, enc["weight"], enc["bias"], pool._parameters["U"], W, pool._parameters["b"],
            _solve_args(cfg.tol, cfg.max_iter), ln._parameters["weight"], ln._parameters["bias"], ln.eps,
            head_lin["weight"], head_lin["bias"], agent, float(nop_bias), lam_feature,
            forced if policy == "forced" else None, None if exit_threshold is None else float(exit_threshold),
            cfg.max_steps, cost.constants, cfg.conf_mode)
        rows_per_step = [v for v in rps.tolist() if v > 0]
        return DynaLayOutput(logits, flops, layers, iters, rows_per_step, actions if details else None,
                             step_iters if details else None)

    # ------------------------------------------------------------------ conveniences
    def run_static(self, x: Tensor, steps: Optional[int] = None, exit_threshold: Optional[float] = None,
                   **kw) -> DynaLayOutput:
        """The baselines on the same layers: ``static`` (no args), ``truncation`` (``steps=k``),
        ``early_exit`` (``exit_threshold=p``)."""
        return self.run(x, policy="forced", forced=self.static_actions(x.shape[0], steps, x.device),
                        exit_threshold=exit_threshold, **kw)

    @torch.no_grad()
    def measure_latency(self, batch: int = 256, repeats: int = 5) -> Tensor:
        """Per-layer latency table on the running backend (ms per row for one solve of each layer
        on a batch of ``batch`` rows; NOP 0), stored in ``self.latency_ms``.  Optional: the reward's
        compute term can use it instead of FLOPs (``RewardConfig(cost="latency")``)."""
        L, H = self.cfg.num_layers, self.cfg.hidden
        dev = self.pool.U.device
        W = self.pool.effective_weight()
        gen = torch.Generator(device="cpu").manual_seed(0)
        h = torch.tanh(torch.randn(batch, H, generator=gen)).to(dev)
        out = torch.zeros(L + 1)
        skw = self.solve_kwargs()
        for layer in range(L):
            a = torch.full((batch,), layer, dtype=torch.int64, device=dev)
            dynamic_step(h, a, self.pool.U, W, self.pool.b, **skw)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                dynamic_step(h, a, self.pool.U, W, self.pool.b, **skw)
                ts.append(time.perf_counter() - t0)
            out[layer] = sorted(ts)[len(ts) // 2] * 1e3 / batch
        self.latency_ms.copy_(out)
        return out


# ---------------------------------------------------------------------------------------------
# MLP baseline
# ---------------------------------------------------------------------------------------------
def mlp_hidden_for_params(in_features: int, num_classes: int, params: int) -> int:
    """Width ``w`` of a 2-hidden-layer MLP (D->w->w->C) with about ``params`` parameters."""
    D, C = in_features, num_classes
    # w^2 + (D + C + 3) w + C = params
    a, bq, c = 1.0, float(D + C + 3), float(C - params)
    w = (-bq + math.sqrt(bq * bq - 4 * a * c)) / (2 * a)
    return max(8, int(round(w)))


class MLPBaseline(nn.Module):
    """``D -> w -> w -> C`` with ReLU (and dropout while training)."""

    def __init__(self, in_features: int, num_classes: int, width: int, dropout: float = 0.1):
        super().__init__()
        self.in_features, self.num_classes, self.width, self.dropout = in_features, num_classes, width, dropout
        self.net = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def flops_per_sample(self) -> float:
        D, w, C = self.in_features, self.width, self.num_classes
        return float(2 * (D * w + w * w + w * C) + 2 * w)

    def config(self) -> dict:
        return dict(in_features=self.in_features, num_classes=self.num_classes, width=self.width,
                    dropout=self.dropout)
