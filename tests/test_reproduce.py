"""benchmarks/ablation.py, reproduce.py, results_report.py: the plan holds the runs the ablation needs, each
run trains what its name says, and the report turns result files into tables (mean and spread over seeds) and
figures."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import ablation  # noqa: E402
import reproduce  # noqa: E402
import results_report  # noqa: E402


def test_plan_has_every_ablation_row_sweep_and_seed():
    runs = {r.key: r for r in ablation.plan()}
    assert len(runs) == len(ablation.plan())  # no duplicate names
    for dataset in ("fashion-mnist", "mnist"):
        for seed in (0, 1):
            for variant in ("baseline", "mim", "mim-step", "mim-view", "star", "baseline-ec"):
                assert f"{dataset}/{variant}-s{seed}" in runs
    for name in ("mask0.15-s0", "mask0.35-s0", "mask0.45-s0", "layer1of4-s0", "layer3of4-s0", "layer4of4-s0"):
        assert f"fashion-mnist/{name}" in runs
    assert runs["fashion-mnist/layer1of4-s0"].objective["contrastive_layer"] == 1
    assert runs["fashion-mnist/mask0.45-s0"].objective["mask_ratio"] == 0.45
    assert runs["fashion-mnist/baseline-ec-s1"].equal_compute
    assert runs["fashion-mnist/ema-fast-s0"].teacher == {"ema_start": 0.9, "ema_decay": 0.99}
    # the main comparison comes first, so a partial sweep answers it
    assert [r.name for r in ablation.plan()[:3]] == ["baseline-s0", "star-s0", "baseline-ec-s0"]


def test_each_variant_trains_the_losses_its_name_says(tiny_codes, tmp_path):
    expected = {
        "baseline": (False, False, False, 1),
        "mim": (True, False, False, 2),
        "mim-step": (True, True, False, 2),
        "mim-view": (True, False, True, 2),
        "star": (True, True, True, 2),
    }
    for variant, (mim, step, view, views) in expected.items():
        run = ablation.Run("mnist", f"{variant}-s0", 0, dict(ablation.VARIANTS[variant]))
        cfg = run.config(tiny_codes, str(tmp_path / variant), steps=5)
        o = cfg.objective
        assert (o.mim, o.step, o.view, o.num_views) == (mim, step, view, views), variant
        assert cfg.optim.batch_size == ablation.IMAGES_PER_STEP and cfg.train.steps == 5
        assert cfg.model.name == ablation.MODEL and cfg.model.args["resid_dropout_p"] == 0.0
        assert (cfg.teacher.ema_schedule, cfg.teacher.ema_start, cfg.teacher.ema_decay) == ("cosine", 0.99, 0.999)
    slow = ablation.Run(
        "mnist", "ema-slow-s0", 0, dict(ablation.VARIANTS["star"]), {"ema_start": 0.999, "ema_decay": 0.9999}
    )
    cfg = slow.config(tiny_codes, str(tmp_path / "slow"), steps=5)
    assert (cfg.teacher.ema_schedule, cfg.teacher.ema_start, cfg.teacher.ema_decay) == ("cosine", 0.999, 0.9999)


def _fake_result(run, fid, probe_last):
    probe = {str(s): 0.5 for s in range(8, 65, 8)}
    probe["64"] = probe_last
    return {
        "steps": run.steps,
        "s_per_step": 0.2,
        "metrics": {"fid": fid, "domain_fid": fid / 10, "class_accuracy": 0.5, "probe": probe},
    }


def test_report_gives_mean_and_spread_over_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(results_report, "DOC", str(tmp_path / "RESULTS.md"))
    monkeypatch.setattr(results_report, "FIGURES", str(tmp_path / "results"))
    (tmp_path / "RESULTS.md").write_text(f"intro\n{results_report.START}\nold\n{results_report.END}\noutro\n")
    monkeypatch.setattr(ablation, "RESULTS", str(tmp_path / "benchmark_results"))
    runs = ablation.plan()
    for run in runs:
        if run.dataset == "fashion-mnist" and run.name in ("baseline-s0", "baseline-s1", "star-s0"):
            fid = {"baseline-s0": 10.0, "baseline-s1": 14.0, "star-s0": 8.0}[run.name]
            os.makedirs(os.path.dirname(run.result_path), exist_ok=True)
            with open(run.result_path, "w") as f:
                json.dump(_fake_result(run, fid, 0.6), f)
    results_report.write_results(runs)
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "3 of" in text
    assert "| LlamaGen baseline | 2 | 800 | 0.200 ± 0.000 | 12.00 ± 2.83 |" in text  # mean and sample std
    assert "| ST-AR (all three) | 1 | 800 | 0.200 | 8.00 |" in text
    assert "| + MIM | (not run yet) |" in text
    assert (tmp_path / "results" / "probe_fashion-mnist.png").stat().st_size > 1000


def test_report_refuses_a_page_without_markers(tmp_path, monkeypatch):
    monkeypatch.setattr(results_report, "DOC", str(tmp_path / "RESULTS.md"))
    monkeypatch.setattr(results_report, "FIGURES", str(tmp_path / "results"))
    (tmp_path / "RESULTS.md").write_text("no markers here\n")
    with pytest.raises(ValueError, match="markers"):
        results_report.write_results([])


def test_list_shows_each_run_of_the_plan_and_whether_it_has_a_result(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ablation, "RESULTS", str(tmp_path))
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "star-s0.json").write_text("{}")
    reproduce.main(["--list", "--only", "mnist/star"])
    assert capsys.readouterr().out.splitlines() == ["done  mnist/star-s0", "todo  mnist/star-s1"]
