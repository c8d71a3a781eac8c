"""Training, evaluation, checkpoints, resume, NaN handling, the CLI and DDP (small budgets, digits)."""
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from dynalay.models import DynaLay
from dynalay.train import report as R
from dynalay.train.checkpoint import CheckpointError, digest, load_checkpoint, save_checkpoint
from dynalay.train.cli import load_trained
from dynalay.train.data import load_data
from dynalay.train.trainer import TrainConfig, Trainer, TrainingDiverged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dataset="digits", hidden=64, warmup_epochs=15, agent_epochs=10, joint_epochs=2, mlp_epochs=10,
            timing_repeats=1, knobs=[0.05, 0.15, 0.5], exit_thresholds=[0.0, 0.6, 0.9, 1.01], ckpt_every=2)
TINY_FLAGS = ["--dataset", "digits", "--hidden", "64", "--warmup-epochs", "15", "--agent-epochs", "10",
              "--joint-epochs", "2", "--mlp-epochs", "10", "--timing-repeats", "1", "--latency-batches", "1", "16",
              "--no-progress"]


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", 0.2, split_seed=0)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    tr = Trainer(TrainConfig(**TINY), digits, str(d), progress=False, log=lambda *a: None)
    model, mlp = tr.fit()
    return tr, model, mlp, str(d)


def _accuracy(logits, y):
    return float((logits.argmax(1) == y).double().mean())


def test_tiny_end_to_end_beats_chance(trained, digits):
    tr, model, mlp, _ = trained
    res = R.evaluate(model, mlp, digits, tr.cfg, timing=False)
    m = res["models"]
    for name in ("dynalay", "static", "mlp"):
        assert m[name]["accuracy"] > 0.85, (name, m[name])  # chance is 0.10
    assert m["dynalay"]["flops_per_sample"] < m["static"]["flops_per_sample"]
    assert len(res["pareto"]) == 3 and len(res["truncation"]) == 5 and len(res["early_exit"]) == 4
    rep = R.aggregate([dict(res, seed=0)])
    assert "targets" in rep and rep["targets"]["flops_ratio_vs_static"] < 1
    assert "dynalay" in R.format_table(rep)


def _val_run(model, digits, lam=None):
    """(accuracy, mean FLOPs per sample) of the greedy model (static with lam None) on val."""
    W = model.inference_weight()
    with torch.no_grad():
        o = model.run_static(digits.val.x, W=W) if lam is None else model.run(digits.val.x, lam=lam, W=W)
    return _accuracy(o.logits, digits.val.y), float(o.flops.double().mean())


def test_default_knob_is_calibrated_on_val(trained, digits):
    """The default knob: the smallest grid lambda within knob_flops of static's val FLOPs (the
    grid's previous lambda is over the share); a fixed knob; the accuracy mode.  Each records how
    in ``calibration``, and the model is left in train mode as the trainer expects."""
    from dynalay.train.trainer import KNOB_GRID, knob_grid

    tr, model, _, _ = trained
    model.eval()
    _, st_flops = _val_run(model, digits)
    c = tr.calibration
    assert c["mode"] == "flops" and c["knob_flops"] == 0.45 and c["lam"] == model.default_lam
    grid = knob_grid(model.cfg.lam_min, model.cfg.lam_max)
    assert len(grid) == KNOB_GRID and grid[0] == model.cfg.lam_min and grid[-1] == model.cfg.lam_max
    assert all(a < c for a, c in zip(grid, grid[1:]))
    acc, flops = _val_run(model, digits, c["lam"])
    assert (c["val_accuracy"], c["val_flops_ratio"]) == (acc, flops / st_flops)
    saved = (tr.cfg, tr.calibration, model.default_lam)
    try:
        for share in (0.45, c["val_flops_ratio"] / 2, 0.999):  # the last: nearly static's compute
            tr.cfg = dataclasses.replace(saved[0], knob_flops=share)
            lam = tr.calibrate()
            assert model.training and lam == model.default_lam == tr.calibration["lam"]
            model.eval()
            i = grid.index(lam)
            if share < c["val_flops_ratio"]:
                assert i > 0  # (digits spends ~0.2x at lam_min: only a smaller share moves the knob)
            assert _val_run(model, digits, lam)[1] <= share * st_flops or i == KNOB_GRID - 1
            assert i == 0 or _val_run(model, digits, grid[i - 1])[1] > share * st_flops  # the most compute
        tr.cfg = dataclasses.replace(saved[0], knob=0.3)
        assert tr.calibrate() == 0.3 == model.default_lam and tr.calibration["mode"] == "fixed"
        tr.cfg = dataclasses.replace(saved[0], knob_flops=None, knob_tolerance=0.02)
        lam = tr.calibrate()
        model.eval()
        st_acc = _val_run(model, digits)[0]
        assert tr.calibration["mode"] == "accuracy" and lam in grid
        j = grid.index(lam)
        assert j == 0 or _val_run(model, digits, lam)[0] >= st_acc - 0.02
        assert all(_val_run(model, digits, g)[0] < st_acc - 0.02 for g in grid[j + 1:])
    finally:
        tr.cfg, tr.calibration = saved[:2]
        model.default_lam = saved[2]
        model.eval()
    from dynalay.train import calibrate_knob

    for kw, match in ((dict(knob=-1.0), "knob must"), (dict(knob_flops=0.0), "knob_flops"),
                      (dict(knob_flops=None, knob_tolerance=-0.1), "knob_tolerance")):
        with pytest.raises(ValueError, match=match):
            calibrate_knob(model, digits.val.x, digits.val.y, **kw)
    with pytest.raises(ValueError, match="N >= 1"):
        calibrate_knob(model, digits.val.x, digits.val.y[:-1])
    assert model.default_lam == saved[2]  # a refused call changes nothing
    tiny = knob_grid(1e-5, 2.0)  # a small lam_min keeps 3 significant digits (no 0.0, no repeats)
    assert tiny[0] == 1e-5 and all(a < c for a, c in zip(tiny, tiny[1:]))
    assert knob_grid(0.02, 2.0)[:4] == [0.02, 0.022, 0.0242, 0.0267]  # the default range: 4 decimals
    for bad in (0.0, 1.5, float("nan"), "0.4"):
        with pytest.raises(ValueError, match="knob_flops"):
            dataclasses.replace(saved[0], knob_flops=bad).validate()


def test_wall_time_by_batch_size(trained, digits, tmp_path):
    """The timed evaluation measures every model at each of ``latency_batches`` (the early exit
    nearest to dynalay in FLOPs), aggregates over seeds, prints the table and draws the panel."""
    tr, model, mlp, _ = trained
    cfg = dataclasses.replace(tr.cfg, latency_batches=[1, 64], latency_repeats=1)
    res = R.evaluate(model, mlp, digits, cfg)
    lat = res["latency"]
    ee = {p["threshold"]: p["flops_per_sample"] for p in res["early_exit"]}
    dyf = res["models"]["dynalay"]["flops_per_sample"]
    assert [r["batch_size"] for r in lat] == [1, 64]
    for r in lat:
        assert r["early_exit_threshold"] == min(ee, key=lambda th: (abs(ee[th] - dyf), th))
        assert set(r["wall_time_s"]) == set(R.LATENCY_MODELS)
        assert all(v > 0 and math.isfinite(v) for v in r["wall_time_s"].values())
        assert r["vs_static"]["static"] == 1.0
        assert r["vs_static"]["dynalay"] == pytest.approx(r["wall_time_s"]["dynalay"] / r["wall_time_s"]["static"])
    r2 = dict(res, seed=1, latency=[dict(r, wall_time_s={k: 2 * v for k, v in r["wall_time_s"].items()})
                                    for r in lat])
    rep = R.aggregate([dict(res, seed=0), r2])
    a = rep["latency"][0]
    assert a["batch_size"] == 1 and a["wall_time_s"]["mlp"] == pytest.approx(1.5 * lat[0]["wall_time_s"]["mlp"])
    assert a["vs_static"]["dynalay"] == pytest.approx(lat[0]["vs_static"]["dynalay"])
    assert a["early_exit_threshold"] == [lat[0]["early_exit_threshold"]] * 2
    text = R.format_table(rep)
    assert "by batch size" in text and "\n1 " in text and "\n64 " in text
    png = R.make_plot(rep, str(tmp_path / "p.png"), [res["per_sample_flops"]])
    assert os.path.getsize(png) > 0
    with pytest.raises(ValueError, match="different batch sizes"):
        R.aggregate([dict(res, seed=0), dict(r2, latency=lat[::-1])])
    with pytest.raises(ValueError, match="different batch sizes"):
        R.aggregate([dict(res, seed=0), dict(r2, latency=lat[:1])])
    assert "latency" not in R.evaluate(model, mlp, digits, dataclasses.replace(cfg, latency_batches=[]))


def test_checkpoint_round_trip_gives_identical_predictions(trained, digits):
    tr, model, mlp, d = trained
    path = os.path.join(d, "checkpoint.pt")
    cfg, data, m2, mlp2, ck = load_trained(path)
    assert ck["complete"]
    x = digits.test.x
    with torch.no_grad():
        for lam in (0.05, 0.15, 0.5):
            a, b = model.run(x, lam=lam), m2.run(x, lam=lam)
            assert torch.equal(a.logits, b.logits) and torch.equal(a.flops, b.flops)
        assert torch.equal(model.run_static(x).logits, m2.run_static(x).logits)
        assert torch.equal(mlp(x), mlp2(x))
    assert m2.default_lam == model.default_lam
    assert ck["calibration"] == tr.calibration and ck["calibration"]["lam"] == model.default_lam


def test_corrupt_and_mismatched_checkpoints_fail_clearly(trained, tmp_path):
    _, _, _, d = trained
    good = os.path.join(d, "checkpoint.pt")
    raw = open(good, "rb").read()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(str(trunc))
    flipped = tmp_path / "flipped.pt"
    ck = torch.load(good, weights_only=True)
    ck["state"]["model"]["encoder.weight"][0, 0] += 1.0  # tensor bytes no longer match the digest
    torch.save(ck, str(flipped))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(str(flipped))
    # the configuration, position and metadata are covered too: one changed setting loaded silently
    # would change the predictions
    edits = [lambda c: c["meta"]["model"].update(max_iter=c["meta"]["model"]["max_iter"] + 3),
             lambda c: c["train_config"].update(knob=0.5),
             lambda c: c.update(position=[c["position"][0], c["position"][1] + 1]),
             lambda c: c.update(data_mean=c["data_mean"] + 1e-3)]
    for edit in edits:
        ck = torch.load(good, weights_only=True)
        edit(ck)
        torch.save(ck, str(flipped))
        with pytest.raises(CheckpointError, match="SHA-256"):
            load_checkpoint(str(flipped))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a dynalay checkpoint"):
        load_checkpoint(str(foreign))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(good, expect={"dataset": "mnist1d"})
    # a checkpoint of another architecture cannot be resumed into this one
    other = Trainer(TrainConfig(**dict(TINY, hidden=32)), load_data("digits", 0.2), str(tmp_path / "o"),
                    progress=False)
    with pytest.raises(CheckpointError, match="does not match"):
        other.resume(good)


def test_checkpoint_from_before_the_logodds_feature_loads_as_trained(trained, digits, tmp_path):
    """A checkpoint written before ``agent_conf`` / ``agent_lr_decay`` existed was trained with
    the max-probability feature and a constant agent learning rate: it loads with those, and the
    model then decides as one built with ``agent_conf="prob"``."""
    tr, model, _, d = trained
    assert model.cfg.agent_conf == "logodds" and tr.cfg.agent_lr_decay == "linear"  # the defaults
    ck = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True)
    del ck["meta"]["model"]["agent_conf"], ck["train_config"]["agent_conf"], ck["train_config"]["agent_lr_decay"]
    ck["version"], ck["sha256"] = 1, digest(ck["state"])  # such files are version 1: the hash covers the state
    old = tmp_path / "old.pt"
    torch.save(ck, str(old))
    cfg, _, m2, _, _ = load_trained(str(old))
    assert (m2.cfg.agent_conf, cfg.agent_conf, cfg.agent_lr_decay) == ("prob", "prob", "none")
    x = digits.test.x
    with torch.no_grad():
        ref = DynaLay(dataclasses.replace(model.cfg, agent_conf="prob")).eval()
        ref.load_state_dict(model.state_dict())
        for lam in (0.05, 0.5):
            a, b = m2.run(x, lam=lam, details=True), ref.run(x, lam=lam, details=True)
            assert torch.equal(a.actions, b.actions) and torch.equal(a.logits, b.logits)
        # the confidence feature is an input of the agent: the two features decide differently
        c = model.run(x, lam=0.05, details=True)
        assert not torch.equal(c.actions, m2.run(x, lam=0.05, details=True).actions)


def test_agent_learning_rate_schedule(digits):
    """agent_lr_decay="linear": agent_lr falling to 2% over the agent and refit phases, agent_lr in
    the joint phase; "none": constant."""
    for decay in ("linear", "none"):
        tr = Trainer(TrainConfig(**dict(TINY, agent_epochs=10, refit_epochs=4, agent_lr_decay=decay)), digits, None,
                     progress=False)
        lr = tr.cfg.agent_lr
        got = {}
        for name, e in (("agent", 0), ("agent", 5), ("agent", 9), ("joint", 1), ("refit", 0), ("refit", 3)):
            tr._set_agent_lr(name, e)
            got[(name, e)] = [g["lr"] for g in tr.opt_ag.param_groups]
        if decay == "none":
            assert all(v == [lr] for v in got.values())
        else:
            assert got[("agent", 0)] == [lr] and got[("agent", 5)] == [0.5 * lr]
            assert got[("agent", 9)] == [pytest.approx(0.1 * lr)] and got[("joint", 1)] == [lr]
            assert got[("refit", 0)] == [lr] and got[("refit", 3)] == [pytest.approx(0.25 * lr)]
    with pytest.raises(ValueError, match="agent_lr_decay"):
        TrainConfig(agent_lr_decay="cosine").validate()


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    p = tmp_path / "c.pt"
    save_checkpoint(str(p), {"state": {"w": torch.ones(2)}})
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(str(p), {"state": {"w": torch.zeros(2)}})
    assert p.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == ["c.pt"]
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(str(p), {"state": {"w": torch.tensor([float("nan")])}})


def test_nan_loss_stops_training_without_a_checkpoint(tmp_path):
    data = load_data("digits", 0.2)
    run = tmp_path / "nan"
    tr = Trainer(TrainConfig(**dict(TINY, mlp_epochs=0)), data, str(run), progress=False)
    with torch.no_grad():
        tr.model.encoder.weight[0, 0] = float("nan")  # the loss of the first step is NaN
    with pytest.raises(TrainingDiverged, match="nan"):
        tr.fit()
    assert not (run / "checkpoint.pt").exists()


def test_non_finite_data_is_rejected_before_training(tmp_path):
    data = load_data("digits", 0.2)
    data.val.x[3, 5] = float("inf")
    with pytest.raises(ValueError, match="val split contains NaN or Inf"):
        Trainer(TrainConfig(**dict(TINY, mlp_epochs=0)), data, str(tmp_path / "r"), progress=False)


@pytest.mark.parametrize("stop_at,position", [(8, (2, 1)), (14, (4, 1))])  # in the agent / refit phase
def test_resume_continues_exactly(digits, tmp_path, monkeypatch, stop_at, position):
    cfg = dict(TINY, warmup_epochs=4, agent_epochs=4, joint_epochs=2, refit_epochs=3, mlp_epochs=2, ckpt_every=1,
               agent_select_fraction=0.25, agent_select_every=1)
    full = Trainer(TrainConfig(**cfg), digits, str(tmp_path / "a"), progress=False)
    full.fit()
    calls = {"n": 0}
    real = Trainer._run_epoch

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "_run_epoch", interrupted)
    part = Trainer(TrainConfig(**cfg), digits, str(tmp_path / "b"), progress=False)
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    monkeypatch.setattr(Trainer, "_run_epoch", real)
    again = Trainer(TrainConfig(**cfg), digits, str(tmp_path / "b"), progress=False)
    assert again.resume() and (again.phase, again.epoch) == position
    again.fit()
    assert [h["phase"] for h in again.history] == [h["phase"] for h in full.history]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    for k, v in full.mlp.state_dict().items():
        assert torch.equal(v, again.mlp.state_dict()[k]), k


def _check_report(rep):
    assert rep["dataset"] == "digits"
    for name in ("dynalay", "static", "mlp"):
        e = rep["models"][name]
        for k in ("accuracy", "fpi_iters_per_sample", "flops_per_sample", "wall_time_s", "batch_size"):
            assert k in e, (name, k)
    for curve, key in (("pareto", "knob"), ("truncation", "budget"), ("early_exit", "threshold")):
        assert rep[curve] and all({key, "accuracy", "flops_per_sample", "wall_time_s"} <= set(p)
                                  for p in rep[curve])
    assert isinstance(rep["difficulty"], dict)
    assert [e["batch_size"] for e in rep["latency"]] == [1, 16]  # TINY_FLAGS' --latency-batches


def test_cli_train_then_eval_reproduces(tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "dynalay", "train", "--seeds", "1", "--out", str(out)] + TINY_FLAGS,
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "static" in r.stdout and (out / "accuracy_vs_compute.png").stat().st_size > 1000
    rep = json.loads((out / "report.json").read_text())
    _check_report(rep)
    assert rep["models"]["dynalay"]["accuracy"] > 0.85
    r2 = subprocess.run([sys.executable, "-m", "dynalay", "eval", "--checkpoint", str(out), "--no-timing"],
                        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    rep2 = json.loads((out / "eval" / "report.json").read_text())
    # the calibrated default knob is kept in the checkpoint and reported by both commands
    cal = rep["knob_calibration"][0]
    assert cal["mode"] == "flops" and rep["default_knob"] == [cal["lam"]] == rep2["default_knob"]
    assert rep2["knob_calibration"] == rep["knob_calibration"]
    assert f"dynalay (lambda {cal['lam']:.4g})" in r.stdout
    for name in ("dynalay", "static", "mlp"):
        assert rep2["models"][name]["accuracy"] == rep["models"][name]["accuracy"]
        assert rep2["models"][name]["flops_per_sample"] == rep["models"][name]["flops_per_sample"]
    r2b = subprocess.run([sys.executable, "-m", "dynalay", "eval", "--checkpoint", str(out), "--out",
                          str(tmp_path / "ev"), "--timing-repeats", "1", "--latency-batches", "32", "--knob", "0.3"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r2b.returncode == 0, r2b.stderr[-3000:]
    rep2b = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert [e["batch_size"] for e in rep2b["latency"]] == [32]
    assert rep2b["default_knob"] == [0.3] and rep2b["knob_calibration"] == [{"mode": "eval --knob", "lam": 0.3}]
    assert "dynalay (lambda 0.3)" in r2b.stdout
    # re-calibrated to another compute share at evaluation, without retraining (on the run's val)
    r2c = subprocess.run([sys.executable, "-m", "dynalay", "eval", "--checkpoint", str(out), "--out",
                          str(tmp_path / "ev2"), "--no-timing", "--knob-flops", "0.05"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r2c.returncode == 0, r2c.stderr[-3000:]
    rep2c = json.loads((tmp_path / "ev2" / "report.json").read_text())
    cal2 = rep2c["knob_calibration"][0]
    assert cal2["mode"] == "eval --knob-flops" and cal2["knob_flops"] == 0.05
    assert rep2c["default_knob"] == [cal2["lam"]] and cal2["lam"] > cal["lam"]
    assert rep2c["models"]["dynalay"]["flops_per_sample"] < rep["models"]["dynalay"]["flops_per_sample"]
    assert "by batch size" in r2b.stdout
    # refusing to overwrite, and a clear error for a corrupt checkpoint
    r3 = subprocess.run([sys.executable, "-m", "dynalay", "train", "--seeds", "1", "--out", str(out)] + TINY_FLAGS,
                        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r3.returncode == 2 and "--resume" in r3.stderr
    # a resume must not mix configurations, and a refused one changes nothing; evaluation-only
    # settings may change
    config = (out / "config.json").read_text()
    for other in (["--hidden", "32"], ["--dataset", "mnist1d"], ["--seed-base", "3"]):
        r5 = subprocess.run([sys.executable, "-m", "dynalay", "train", "--seeds", "1", "--out", str(out), "--resume"]
                            + TINY_FLAGS + other, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        assert r5.returncode == 2 and ("another configuration" in r5.stderr or "--seed-base" in r5.stderr), r5.stderr
        assert (out / "config.json").read_text() == config
    r6 = subprocess.run([sys.executable, "-m", "dynalay", "train", "--seeds", "1", "--out", str(out), "--resume"]
                        + TINY_FLAGS + ["--timing-repeats", "2"], capture_output=True, text=True, timeout=300,
                        cwd=ROOT, env=env)
    assert r6.returncode == 0 and "already done" in r6.stdout, r6.stderr[-3000:]
    ck = out / "seed0" / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    r4 = subprocess.run([sys.executable, "-m", "dynalay", "eval", "--checkpoint", str(ck), "--no-timing"],
                        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r4.returncode == 1 and "corrupt" in r4.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "dynalay", "train", "--seeds", "1",
           "--out", str(out)] + TINY_FLAGS
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "2 rank(s)" in r.stdout
    rep = json.loads((out / "report.json").read_text())
    _check_report(rep)
    assert rep["world_size"] == 2
    assert rep["models"]["static"]["accuracy"] > 0.85 and rep["models"]["dynalay"]["accuracy"] > 0.8
    # only rank 0 wrote: one checkpoint, no stray temporary files
    assert sorted(p.name for p in (out / "seed0").iterdir()) == ["checkpoint.pt", "result.json"]


def test_latency_cost_table_option(digits):
    from dynalay.train.reward import RewardConfig

    cfg = TrainConfig(**dict(TINY, hidden=32, warmup_epochs=2, agent_epochs=1, joint_epochs=0, mlp_epochs=0))
    cfg.reward = RewardConfig(cost="latency")
    tr = Trainer(cfg, digits, None, progress=False)
    tr.fit()
    lat = tr.model.latency_ms
    assert (lat[:-1] > 0).all() and lat[-1] == 0  # measured per layer at start-up; NOP costs nothing


@pytest.mark.parametrize("method", ["tree", "reinforce"])
def test_agent_phase_leaves_the_backbone_untouched(digits, monkeypatch, method):
    """The agent trains on a frozen backbone: weights and the spectral bound's power-iteration
    vectors are bitwise unchanged (the agent computes W with the pool in eval mode).  The tree
    method keeps the policy of the best held-out epoch."""
    cfg = TrainConfig(**dict(TINY, hidden=32, warmup_epochs=2, agent_epochs=4, joint_epochs=0, refit_epochs=0,
                             mlp_epochs=0, agent_method=method, agent_select_fraction=0.25, agent_select_every=1))
    tr = Trainer(cfg, digits, None, progress=False, log=lambda *a: None)
    if method == "tree":
        assert len(tr.agent_idx) + len(tr.select_idx) == len(digits.val)
        assert not set(tr.agent_idx.tolist()) & set(tr.select_idx.tolist()) and len(tr.select_idx) > 0
    else:
        assert tr.agent_idx.tolist() == list(range(len(digits.val))) and len(tr.select_idx) == 0
    before = {}
    real = Trainer._run_epoch
    skip = ("policy.", "value.", "mean_iters", "latency_ms", "default_knob")

    def spy(self, name, *a, **k):
        if name == "agent" and not before:
            before.update({n: v.clone() for n, v in self.model.state_dict().items() if not n.startswith(skip)})
        return real(self, name, *a, **k)

    monkeypatch.setattr(Trainer, "_run_epoch", spy)
    tr.fit()
    after = tr.model.state_dict()
    assert any(n.startswith("pool.spectral") for n in before)
    for n, v in before.items():
        assert torch.equal(v, after[n]), n
    if method == "tree":
        scores = [h["select"] for h in tr.history if h["phase"] == "agent"]
        assert len(scores) == 4
        best = max(range(4), key=lambda i: (scores[i], -i))
        assert tr.agent_best["epoch"] == best and tr.agent_best["score"] == scores[best]
        for n, v in tr.model.policy.state_dict().items():
            assert torch.equal(v, tr.agent_best["policy"][n]), n
        assert tr.select_score() == scores[best]


def test_agent_config_is_validated():
    with pytest.raises(ValueError, match="agent_method"):
        TrainConfig(agent_method="ppo").validate()
    with pytest.raises(ValueError, match="agent_select_fraction"):
        TrainConfig(agent_select_fraction=1.0).validate()
    with pytest.raises(ValueError, match="refit_epochs"):
        TrainConfig(refit_epochs=-1).validate()


def test_tree_method_refuses_a_tree_too_large(digits):
    """L = 6 layers, T = 6 steps: 269 val samples x 55,986 states; the error names the way out."""
    cfg = TrainConfig(**dict(TINY, hidden=16, num_layers=6, max_steps=6))
    with pytest.raises(ValueError, match="agent_method='reinforce'"):
        Trainer(cfg, digits, None, progress=False)
    Trainer(TrainConfig(**dict(TINY, hidden=16, num_layers=6, max_steps=6, agent_method="reinforce")), digits, None,
            progress=False)


@pytest.mark.parametrize("argv,match", [
    (["train", "--threads", "0"], "--threads"), (["eval", "--checkpoint", "x", "--threads", "-1"], "--threads"),
    (["eval", "--checkpoint", "x", "--knob", "nan"], "--knob"), (["train", "--knob", "nan"], "knob"),
    (["train", "--knob", "-1"], "knob"), (["train", "--knob-flops", "0"], "knob_flops"),
    (["train", "--knob-flops", "1.5"], "knob_flops"), (["eval", "--checkpoint", "x", "--knob-flops", "0"], "--knob-flops"),
    (["eval", "--checkpoint", "x", "--knob", "0.1", "--knob-flops", "0.5"], "give one"), (["train", "--lr", "nan"], "lr must"), (["train", "--tol", "0"], "tol"),
    (["train", "--max-iter", "0"], "max_iter"), (["train", "--hidden", "0"], "hidden"),
    (["train", "--steps", "0"], "max_steps"), (["train", "--seeds", "0"], "--seeds"),
    (["train", "--out", "FILE"], "not a folder"), (["train", "--latency-batches", "none", "8"], "cannot be mixed"),
    (["train", "--latency-batches", "0"], "latency_batches")])
def test_cli_rejects_bad_flags_before_any_work(argv, match, tmp_path, capsys):
    from dynalay.cli import main
    f = tmp_path / "file"
    f.write_text("x")
    argv = [str(f) if a == "FILE" else a for a in argv]
    if argv[0] == "train" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_agent_flags_reach_the_config():
    import argparse

    from dynalay.train.cli import _build_config, add_commands

    ap = argparse.ArgumentParser()
    add_commands(ap.add_subparsers())
    args = ap.parse_args(["train", "--agent-method", "reinforce", "--reward-accuracy", "prob", "--refit-epochs", "7"])
    cfg = _build_config(args)
    assert (cfg.agent_method, cfg.reward.accuracy, cfg.refit_epochs) == ("reinforce", "prob", 7)
    for skip in (["--latency-batches"], ["--latency-batches", "none"], ["--latency-batches", "None"]):
        assert _build_config(ap.parse_args(["train"] + skip)).latency_batches == []  # the help's 'none'
    assert _build_config(ap.parse_args(["train", "--latency-batches", "1", "64"])).latency_batches == [1, 64]
    default = _build_config(ap.parse_args(["train"]))
    assert (default.agent_method, default.reward.accuracy, default.knob, default.knob_flops) == \
        ("tree", "correct", None, 0.45)
    assert _build_config(ap.parse_args(["train", "--knob-flops", "0.3"])).knob_flops == 0.3


def test_envelope_and_its_paired_standard_error():
    """The per-sample baseline behind envelope_paired_se averages to envelope_interp's value (its
    upper envelope: a point worse than a cheaper one is replaced by it), and the SE is the
    sample standard deviation of the paired difference over sqrt(n)."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 400
    cs = [rng.random(n) < p for p in (0.5, 0.7, 0.65, 0.8)]  # the third point is below the envelope
    pts = [dict(flops_per_sample=f, accuracy=float(c.mean())) for f, c in zip((1.0, 2.0, 3.0, 4.0), cs)]
    dyn = rng.random(n) < 0.72
    for f, w, lo, hi in ((2.5, 0.5, 1, 1), (3.25, 0.25, 1, 3), (1.0, 0.0, 0, 1)):
        env = R.envelope_interp(pts, f)
        base = (1 - w) * cs[lo] + w * cs[hi]
        assert env == pytest.approx(base.mean(), abs=1e-12)
        d = dyn.astype(float) - base
        assert R.envelope_paired_se(dyn, f, pts, cs) == pytest.approx(d.std(ddof=1) / np.sqrt(n), rel=1e-12)
    assert R.envelope_paired_se(dyn, 0.5, pts, cs) is None and R.envelope_interp(pts, 5.0) is None
    assert R.envelope_paired_se(cs[1], 2.0, pts, cs) == 0.0  # the curve's own point: no difference


def test_config_from_dict_names_unknown_fields():
    """A config (or a checkpoint's) with a field this dynalay does not know fails with the field's
    name, for the train, reward and model configs alike; missing fields take their defaults."""
    from dynalay.models import DynaLayConfig
    for bad, cls in (({"bogus": 1}, "TrainConfig"), ({"reward": {"lam": 0.1, "bogus": 1}}, "RewardConfig")):
        with pytest.raises(ValueError, match=f"unknown {cls} field.*bogus"):
            TrainConfig.from_dict(bad)
    with pytest.raises(ValueError, match="unknown DynaLayConfig field.*bogus"):
        DynaLayConfig.from_dict(dict(in_features=3, num_classes=2, bogus=1))
    c = TrainConfig.from_dict({"reward": {"lam": 0.1}, "hidden": 32})
    assert c.reward.lam == 0.1 and c.hidden == 32 and c.lr == TrainConfig().lr
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_cli_train_no_timing(tmp_path):
    """`dynalay train --no-timing`: no wall-clock measurement, no plot, a table with the accuracy
    and FLOP columns (the flag was only on `eval`, and docs/model.md said it was on both)."""
    out = tmp_path / "nt"
    r = subprocess.run([sys.executable, "-m", "dynalay", "train", "--seeds", "1", "--out", str(out), "--dataset",
                        "digits", "--hidden", "16", "--warmup-epochs", "2", "--agent-epochs", "1", "--joint-epochs",
                        "1", "--refit-epochs", "1", "--mlp-epochs", "1", "--no-timing", "--no-progress"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["models"]["dynalay"]["wall_time_s"] is None and "latency" not in rep
    assert rep["models"]["dynalay"]["flops_per_sample"] > 0
    assert not (out / "accuracy_vs_compute.png").exists() and (out / "table.txt").exists()
