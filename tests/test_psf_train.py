"""PSF's samplers, losses and the three training stages end to end on a tiny model (seconds)."""
from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from tests.helpers import tiny_config
from zoo.errors import ConfigError, DataError
from zoo.metrics import chamfer_distance
from zoo.models.psf.flow import OneStepGenerator, flow_loss, sample_euler, sample_rk45
from zoo.train.engine import TrainConfig, setup_distributed
from zoo.train.psf import PSFConfig, PSFTask, join_pairs, load_velocity, run_pipeline


class LinearTimeField(nn.Module):
    """v(x, t) = t * x: from x0 at t = 0 the flow reaches x0 * exp(1/2) at t = 1."""

    def forward(self, x, t):
        return t.view(-1, 1, 1) * x


class ZeroField(nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


def test_samplers_integrate_a_known_field():
    x0 = torch.randn(2, 5, 3, dtype=torch.float64)
    exact = x0 * math.exp(0.5)
    field = LinearTimeField()
    # one Euler step evaluates v at t = 0 only
    torch.testing.assert_close(sample_euler(field, x0, steps=1), x0)
    err_10 = (sample_euler(field, x0, 10) - exact).abs().max()
    err_1000 = (sample_euler(field, x0, 1000) - exact).abs().max()
    assert err_1000 < err_10 / 50  # first-order convergence
    x1, nfe = sample_rk45(field, x0)
    torch.testing.assert_close(x1, x0 * math.exp((1 - 1e-6) / 2), rtol=1e-5, atol=1e-6)
    assert 0 < nfe < 100
    _, traj = sample_euler(field, x0, 4, return_trajectory=True)
    assert len(traj) == 5 and torch.equal(traj[0], x0)


def test_flow_loss_regresses_the_straight_velocity():
    x1, x0 = torch.randn(3, 7, 3), torch.randn(3, 7, 3)
    torch.testing.assert_close(flow_loss(ZeroField(), x1, x0), (x1 - x0).pow(2).mean((1, 2)))

    class Oracle(nn.Module):  # knows the pairing: outputs x1 - x0 from x_t and t
        def forward(self, xt, t):
            return x1 - x0

    assert flow_loss(Oracle(), x1, x0).abs().max() == 0


def test_three_stages_end_to_end(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config().replace(dropout=0.0)  # dropout swamps a network this small
    tc = lambda e, lr: TrainConfig(epochs=e, opt="adam", lr=lr, weight_decay=0.0, batch_size=4,  # noqa: E731
                                   log_interval=0)
    # later stages fine-tune from the previous one: a lower learning rate
    paths = run_pipeline(tmp_path, cfg, {"flow": tc(3, 2e-3), "reflow": tc(3, 5e-4), "distill": tc(3, 5e-4)},
                         num_shapes=12,
                         num_pairs=8, reflow_steps=4, distill_steps=4, batch_size=4, distill_pairs=12)
    for key in ("flow", "reflow", "distill", "pairs_reflow", "pairs_distill"):
        assert paths[key].is_file(), key
    # stage 1 learns: the held-out flow loss falls
    rows = list(csv.DictReader(open(tmp_path / "flow" / "summary.csv")))
    assert float(rows[-1]["eval_loss"]) < float(rows[0]["eval_loss"])
    # the reflow pairs are the stage-1 model's 4-step samples of the stored noise
    flow_model = load_velocity(paths["flow"], cfg).eval()
    pairs = load_file(str(paths["pairs_reflow"]))
    assert pairs["x0"].shape == (8, cfg.num_points, 3)
    assert load_file(str(paths["pairs_distill"]))["x0"].shape == (12, cfg.num_points, 3)  # its own count
    torch.testing.assert_close(sample_euler(flow_model, pairs["x0"], 4), pairs["x1"], atol=1e-5, rtol=1e-4)
    # reflow and distillation each improve on the model they start from, on their pairs
    # (8 and 12 pairs: too few to hold any out, so this shows optimization, not generalization)
    env = setup_distributed("cpu")
    for stage, start in (("reflow", "flow"), ("distill", "reflow")):
        check = PSFTask(PSFConfig(stage=stage, model=cfg, pairs=str(paths[f"pairs_{stage}"]), val_fraction=0,
                                  batch_size=4), env)
        before = check.evaluate(load_velocity(paths[start], cfg))["loss"]
        after = check.evaluate(load_velocity(paths[stage], cfg))["loss"]
        assert after < before, (stage, before, after)
    task = PSFTask(PSFConfig(stage="distill", model=cfg, pairs=str(paths["pairs_distill"]), batch_size=4), env)
    # the one-step generator is the distilled velocity's single Euler step
    gen = OneStepGenerator(load_velocity(paths["distill"], cfg)).eval()
    d = load_file(str(paths["pairs_distill"]))
    with torch.no_grad():
        torch.testing.assert_close(gen(d["x0"]), sample_euler(gen.velocity, d["x0"], 1))
        assert chamfer_distance(gen(d["x0"]), d["x1"]).mean() == pytest.approx(
            task._loss(gen.velocity.eval(), {"x0": d["x0"], "x1": d["x1"]}).mean().item(), rel=1e-5)


def test_distilling_from_the_flow_teacher(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config().replace(dropout=0.0)
    tc = lambda e: TrainConfig(epochs=e, opt="adam", lr=1e-3, weight_decay=0.0, batch_size=4, log_interval=0)  # noqa: E731
    # same count and steps: the distillation trains on the reflow pairs, the flow's own samples
    same = run_pipeline(tmp_path / "same", cfg, {"flow": tc(1), "reflow": tc(1), "distill": tc(1)}, num_shapes=8,
                        num_pairs=8, reflow_steps=3, distill_steps=3, batch_size=4, distill_teacher="flow")
    assert same["pairs_distill"] == same["pairs_reflow"]
    assert not (tmp_path / "same" / "pairs_distill.safetensors").exists()
    # more pairs: the reflow pairs first, then fresh ones sampled by the flow model, not by the reflow model
    other = run_pipeline(tmp_path / "other", cfg, {"flow": tc(1), "reflow": tc(1), "distill": tc(1)}, num_shapes=8,
                         num_pairs=8, reflow_steps=3, distill_steps=3, batch_size=4, distill_pairs=12,
                         distill_teacher="flow")
    d, first = load_file(str(other["pairs_distill"])), load_file(str(other["pairs_reflow"]))
    assert d["x0"].shape[0] == 12 and not (tmp_path / "other" / "pairs_distill_fresh.safetensors").exists()
    torch.testing.assert_close(d["x0"][:8], first["x0"], rtol=0, atol=0)
    torch.testing.assert_close(d["x1"][:8], first["x1"], rtol=0, atol=0)
    assert (d["x0"][8:, None] - first["x0"][None]).abs().amax((2, 3)).min() > 0.1  # new noise
    with torch.no_grad():
        flow_x1 = sample_euler(load_velocity(other["flow"], cfg).eval(), d["x0"][8:], 3)
        reflow_x1 = sample_euler(load_velocity(other["reflow"], cfg).eval(), d["x0"][8:], 3)
    torch.testing.assert_close(d["x1"][8:], flow_x1, atol=1e-5, rtol=1e-4)
    assert (d["x1"][8:] - reflow_x1).abs().max() > 1e-3
    # fewer: the first of the reflow pairs
    few = run_pipeline(tmp_path / "few", cfg, {"flow": tc(1), "reflow": tc(1), "distill": tc(1)}, num_shapes=8,
                       num_pairs=8, reflow_steps=3, distill_steps=3, batch_size=4, distill_pairs=4,
                       distill_teacher="flow")
    d, first = load_file(str(few["pairs_distill"])), load_file(str(few["pairs_reflow"]))
    assert d["x0"].shape[0] == 4
    torch.testing.assert_close(d["x1"], first["x1"][:4], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="distill_teacher"):
        run_pipeline(tmp_path / "bad", cfg, {}, distill_teacher="student")


def test_stage_configuration_errors(tmp_path):
    from safetensors.torch import save_file

    env = setup_distributed("cpu")
    save_file({"x0": torch.zeros(2, 4, 3), "x1": torch.zeros(2, 4, 3)}, str(tmp_path / "gen.safetensors"))
    save_file({"x0": torch.zeros(2, 4, 3), "x1": torch.zeros(2, 4, 3), "given": torch.zeros(2, 2, 3)},
              str(tmp_path / "cond.safetensors"))
    with pytest.raises(DataError, match="one kind"):
        join_pairs([tmp_path / "gen.safetensors", tmp_path / "cond.safetensors"], tmp_path / "joined.safetensors")
    assert not (tmp_path / "joined.safetensors").exists()
    with pytest.raises(ConfigError, match="stage"):
        PSFTask(PSFConfig(stage="finetune", model=tiny_config()), env)
    with pytest.raises(ConfigError, match="pairs"):
        PSFTask(PSFConfig(stage="reflow", model=tiny_config()), env)
    with pytest.raises(DataError, match="does not exist"):
        PSFTask(PSFConfig(stage="distill", model=tiny_config(), pairs=str(tmp_path / "none.safetensors")), env)
