"""The GPU check's CPU side: train_step.py's FLOPs and output, gpu_check.py's table, the smoke path.

The dry run of gpu_check.sh (every part at tiny sizes on the CPU, a few minutes) runs only with
ST_AR_DRY_RUN=1 (``make gpu-check-dry``); the tiny smoke run is marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import smoke_imagenet  # noqa: E402
import train_step as bench  # noqa: E402

from st_ar.objectives.settings import ObjectiveConfig  # noqa: E402


@pytest.mark.parametrize(
    "variant,objective,accum",
    [
        ("baseline", {}, 1),
        ("mim", {}, 1),
        ("step", {}, 1),
        ("star", {}, 1),
        ("star-1view", {}, 1),
        ("star-share0.5", {}, 1),
        ("star-after-ssl", {}, 1),
        ("mim", {"masked_share": 0.5}, 1),  # L_MIM alone: the teacher runs the masked sequences only
        ("mim+step", {"student_views": 1}, 1),  # no L_view: the teacher runs the student's view only
        ("star", {}, 2),
    ],
)
def test_step_flops_match_torch_flop_counter(variant, objective, accum):
    from torch.utils.flop_counter import FlopCounterMode

    from st_ar.train.flops import matmul_params, run_step_flops, step_flops
    from st_ar.train.loop import train_step

    state, batch = bench.make_state(
        "GPT-debug", variant, 8, "fp32", torch.device("cpu"), 16, [f"optim.grad_accum={accum}"], objective
    )
    cfg, gpt = state.cfg, state.student.config
    step = bench.TIMED_AT.get(variant, 0)
    ssl = cfg.objective.ssl_on(step, cfg.train.steps)
    assert ssl == (cfg.objective.needs_teacher and variant != "star-after-ssl")
    analytic = run_step_flops(cfg, gpt, ssl=ssl)
    images = batch[0].shape[0]
    assert analytic == accum * step_flops(gpt, cfg.objective, images // accum, ssl=ssl)
    micro = [(batch[0][i::accum], batch[1][i::accum]) for i in range(accum)]
    with FlopCounterMode(display=False) as counter:
        train_step(state, micro, step)
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.01)
    blocks, head = matmul_params(gpt)
    assert blocks == sum(p.numel() for p in state.student.layers.parameters() if p.dim() >= 2)
    assert head == state.student.output.weight.numel()


def test_open_variants_cost_what_they_say_per_image():
    from st_ar.models.gpt import GPTConfig
    from st_ar.train.flops import step_flops, teacher_sequences

    gpt = GPTConfig.from_name("GPT-debug", block_size=16)
    per_image = {
        name: step_flops(gpt, ObjectiveConfig(**bench.VARIANTS[name]), 4, ssl=name != "star-after-ssl") / 4
        for name in ("baseline", "ar2", "star", "star-1view", "star-share0.5", "star-after-ssl")
    }
    extra = per_image["star"] - 2 * per_image["baseline"]  # ST-AR's two teacher forwards and its projector
    projector = step_flops(gpt, ObjectiveConfig(**bench.VARIANTS["star-1view"]), 4) / 4 - per_image["baseline"]
    # student on one view: the baseline's step, two teacher forwards, the projector on one view
    assert per_image["baseline"] < per_image["star-1view"] < per_image["baseline"] + extra
    assert projector > 0 and per_image["star-share0.5"] == per_image["star"]  # the mask is not discounted
    assert per_image["star-after-ssl"] == per_image["ar2"] == 2 * per_image["baseline"]
    assert teacher_sequences(ObjectiveConfig(mim=True, step=False, view=False, masked_share=0.25), 4) == 2
    assert teacher_sequences(ObjectiveConfig(student_views=1), 4) == 8
    assert teacher_sequences(ObjectiveConfig(view=False, student_views=1), 4) == 4


def test_variants_cover_every_loss_combination():
    combos = {(v.get("mim"), v.get("step"), v.get("view")) for k, v in bench.VARIANTS.items() if k != "baseline"}
    assert len(combos) == 8  # all on/off combinations, AR alone on two views included
    assert bench.parse_variants("paper") == ["baseline", "mim", "mim+step", "mim+view", "star"]
    assert bench.parse_variants("star,all")[0] == "star" and len(bench.parse_variants("all")) == 9
    with pytest.raises(SystemExit):
        bench.parse_variants("mim+nothing")


def test_train_step_script_keeps_its_table_and_writes_json(tmp_path):
    out = tmp_path / "train.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--models", "GPT-debug", "--block-size", "16"]
    cmd += ["--sequences", "4", "--repeats", "1", "--precisions", "fp32", "--no-memory", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| model | precision | sequences | baseline s/step | ST-AR s/step |" in r.stdout
    assert "matmul peaks measured now: fp32" in r.stdout and "| s/image |" in r.stdout
    data = json.loads(out.read_text())
    assert set(data["peaks"]) == {"fp32", "bf16"}
    star = next(row for row in data["rows"] if row["variant"] == "star")
    assert star["images"] == 2 and star["views"] == 2 and star["s_per_image"] == pytest.approx(2 * star["s_per_seq"])


# ----------------------------------------------------------------------------- the table


def write_parts(work: Path) -> None:
    (work / "header.txt").write_text("host, torch 2.x, NVIDIA H200\n")
    (work / "tests.rc").write_text("1\n")
    (work / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_bf16_training_step_is_finite_and_learns"/>'
        '<testcase classname="tests.test_gpu" name="test_flex_attention_matches_sdpa">'
        '<skipped message="no FlexAttention setting"/></testcase>'
        '<testcase classname="tests.test_gpu" name="test_compiled_training_forward_has_no_graph_breaks">'
        '<failure message="Unsupported: graph break in apply_rope&#10;more">trace</failure></testcase>'
        "</testsuite></testsuites>"
    )
    row = dict(model="GPT-L", precision="bf16", variant="baseline", images=64, views=1, steps_per_s=2.0)
    row.update(mfu=0.41, s_per_image=0.0078)
    (work / "train-L.json").write_text(json.dumps({"peaks": {"bf16": 7.5e14, "fp32": 5e13}, "rows": [row]}))
    (work / "train-L.rc").write_text("0\n")
    (work / "train-B.rc").write_text("124\n")
    (work / "train-B.log").write_text("building GPT-B\nstep 3\n")
    decode = {"model": "GPT-B", "precision": "bf16", "cfg_scale": 2.0, "compiled": False, "note": "no compile"}
    decode["rows"] = [dict(batch=8, tokens_per_s=1234.0, ms_per_step=6.5, first_call_s=40.0)]
    (work / "decode.json").write_text(json.dumps(decode))
    (work / "decode.rc").write_text("0\n")
    (work / "smoke.rc").write_text("skipped: no time left in the 570 s budget\n")


def test_table_has_a_row_for_every_part_and_failure(tmp_path, capsys):
    write_parts(tmp_path)
    gpu_check.main(["table", str(tmp_path), "--out", str(tmp_path / "table.md")])
    text = capsys.readouterr().out
    assert text == (tmp_path / "table.md").read_text()
    lines = text.splitlines()
    row = lambda *words: next(line for line in lines if all(w in line for w in words))  # noqa: E731
    assert "| pass |" in row("test_bf16_training_step")
    assert "| skip |" in row("test_flex_attention") and "no FlexAttention setting" in row("test_flex_attention")
    assert "| FAIL |" in row("test_compiled_training_forward") and "graph break" in row("test_compiled_training")
    assert "2.00 steps/s" in row("GPT-L bf16 baseline") and "NOT met" in row("GPT-L bf16 baseline")
    assert "| TIMEOUT |" in row("train-B") and "step 3" in row("train-B")
    assert "1234 tokens/s" in row("batch 8") and "EAGER" in row("batch 8")
    assert "| not run |" in row("smoke-imagenet") and "no time left" in row("smoke-imagenet")
    assert lines[0] == "# gpu_check: host, torch 2.x, NVIDIA H200"


def test_table_when_nothing_ran(tmp_path, capsys):
    gpu_check.main(["table", str(tmp_path)])
    text = capsys.readouterr().out
    for part in ("gpu tests", "train step", "sampling", "smoke-imagenet"):
        assert f"| {part} |" in text


# ----------------------------------------------------------------------------- smoke path


def test_smoke_names_the_stage_that_failed(tmp_path):
    with pytest.raises(smoke_imagenet.StageFailed, match="stage 'extract' failed") as e:
        smoke_imagenet.smoke(tmp_path / "smoke", tiny=True, device="no-such-device", report=lambda s: None)
    assert e.value.stage == "extract"
    assert (tmp_path / "smoke" / "logs" / "extract.log").exists()


@pytest.mark.slow
def test_smoke_tiny_runs_every_stage(tmp_path):
    times = smoke_imagenet.smoke(tmp_path / "smoke", tiny=True, device="cpu", report=lambda s: None)
    assert tuple(times) == smoke_imagenet.STAGES
    fid = json.loads((tmp_path / "smoke" / "fid.json").read_text())
    assert fid["num_samples"] == 4


@pytest.mark.skipif(os.environ.get("ST_AR_DRY_RUN") != "1", reason="a few minutes: set ST_AR_DRY_RUN=1")
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stdout + r.stderr
    table = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in table
    for part in (
        "| gpu tests |",
        "| train step | GPT-debug bf16 baseline",
        "| sampling | GPT-debug",
        "| smoke-imagenet |",
    ):
        assert part in table, table
    assert "0 failed or timed out" in table, table
