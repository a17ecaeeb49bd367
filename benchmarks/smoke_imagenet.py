"""The paper's ImageNet path end to end, at its real shapes, on a handful of generated images.

    python benchmarks/smoke_imagenet.py                     # or: make smoke-imagenet
    python benchmarks/smoke_imagenet.py --device cuda --out /tmp/smoke

Stages, each through the `st-ar` command line in its own process, timed, stopped at the first failure
(named in the error):

  images     6 generated 256-px JPEGs in 3 class subfolders (an ImageNet-style folder)
  tokenizer  a random-weight VQ-16 saved in the library's own tokenizer format (VQModel.save)
  extract    st-ar extract --image-size 256 --crops ten: (6, 10, 256) uint16 codes
  train      st-ar train --config imagenet-b-star (GPT-B, vocabulary 16384, 256 tokens, 1000 classes,
             two views, every loss, EMA teacher) for 2 steps of 2 images
  sample     st-ar sample: 4 images of the trained GPT through the VQ-16 decoder, samples.npz (4, not 2:
             eval fid refuses fewer than 4, which its precision/recall with k = 3 need)
  fid        st-ar eval fid against the image folder (InceptionV3 features)

Nothing is downloaded. ``--tiny`` runs the same stages on GPT-debug and VQ-debug at 8 px (seconds, for
the tests). The weights are random, so the figures mean nothing; the point is that every preset, file
format and command the paper's run needs works with the others.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))
STAGES = ("images", "tokenizer", "extract", "train", "sample", "fid")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, detail: str):
        super().__init__(f"smoke-imagenet: stage {stage!r} failed: {detail}")
        self.stage = stage


def make_images(folder: Path, classes: int, per_class: int, size: int, seed: int = 0) -> list[Path]:
    """``classes`` x ``per_class`` smooth random RGB JPEGs of ``size`` x ``size``, one subfolder per class,
    a little larger than square like photographs (the ADM centre crop has something to do)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for c in range(classes):
        for i in range(per_class):
            coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            coarse[..., c % 3] = np.maximum(coarse[..., c % 3], 160)  # a colour cast per class
            img = Image.fromarray(coarse).resize((size * 4 // 3, size), Image.BICUBIC)
            path = folder / f"class{c:02d}" / f"img{i:02d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, quality=90)
            paths.append(path)
    return paths


def make_tokenizer(path: Path, preset: str, seed: int = 0) -> None:
    """A random-weight tokenizer in our checkpoint format, as `st-ar tokenizer train` would leave one."""
    import torch

    from st_ar.models.vq import VQConfig, VQModel

    torch.manual_seed(seed)
    VQModel(VQConfig.from_name(preset)).save(path)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "st_ar.cli", *args]


def run_stage(stage: str, cmd: list[str], log: Path, timeout: float | None) -> None:
    """Run one command; its output goes to ``log``; a non-zero exit raises StageFailed with the tail."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise StageFailed(stage, f"timed out after {timeout:.0f} s (log {log})") from None
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise StageFailed(stage, f"exit code {rc} (log {log}):\n{tail}")


def smoke(
    out: Path,
    *,
    device: str = "auto",
    tiny: bool = False,
    classes: int = 3,
    per_class: int = 2,
    samples: int = 4,
    steps: int = 2,
    batch_size: int = 2,
    timeout: float | None = None,
    report=print,
) -> dict[str, float]:
    """Run every stage into ``out`` (emptied first); returns the seconds of each stage."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if tiny:
        model = ["model.name=GPT-debug", 'model.args={"vocab_size": 64, "block_size": 16}']
        vq_preset, size = "VQ-debug", 8
    else:
        vq_preset, size, model = "VQ-16", 256, []  # imagenet-b-star as it is: GPT-B, 16384 codes, 1000 classes
    images, vq, codes, run, sampled = out / "images", out / "tokenizer.pt", out / "codes", out / "run", out / "samples"
    logs = out / "logs"
    logs.mkdir()
    times: dict[str, float] = {}

    def stage(name: str, work) -> None:
        start = time.perf_counter()
        try:
            if isinstance(work, list):
                run_stage(name, work, logs / f"{name}.log", timeout)
            else:
                work()
        except StageFailed:
            raise
        except Exception as e:  # the in-process stages: name them too
            raise StageFailed(name, f"{type(e).__name__}: {e}") from e
        times[name] = time.perf_counter() - start
        report(f"[smoke-imagenet] {name:<9} {times[name]:7.1f} s")

    stage("images", lambda: make_images(images, classes, per_class, size * 9 // 8))
    stage("tokenizer", lambda: make_tokenizer(vq, vq_preset))
    stage(
        "extract",
        cli(
            "extract",
            "--dataset",
            f"folder:{images}",
            "--split",
            "train",
            "--vq-ckpt",
            str(vq),
            "--image-size",
            str(size),
            "--crops",
            "ten",
            "--batch-size",
            "2",
            "--num-workers",
            "0",
            "--device",
            device,
            "--no-progress",
            "--out",
            str(codes),
        ),
    )
    stage(
        "train",
        cli(
            "train",
            "--config",
            "imagenet-b-star",
            f"data.codes={codes}",
            "data.num_workers=0",
            f"optim.batch_size={batch_size}",
            f"train.steps={steps}",
            f"train.save_every={steps}",
            "train.log_every=1",
            f"train.device={device}",
            f"train.out_dir={run}",
            *model,
        ),
    )
    stage(
        "sample",
        cli(
            "sample",
            "--ckpt",
            str(run / "model.pt"),
            "--vq-ckpt",
            str(vq),
            "--classes",
            ",".join(str(i % classes) for i in range(samples)),
            "--batch-size",
            str(samples),
            "--cfg-scale",
            "2.0",
            "--seed",
            "0",
            "--device",
            device,
            "--out",
            str(sampled),
        ),
    )
    stage(
        "fid",
        cli(
            "eval",
            "fid",
            "--samples",
            str(sampled / "samples.npz"),
            "--ref",
            str(images),
            "--ref-split",
            "train",
            "--no-cache",
            "--device",
            device,
            "--out",
            str(out / "fid.json"),
        ),
    )
    check_outputs(out, classes * per_class, samples, 256 if not tiny else 16)
    return times


def check_outputs(out: Path, num_images: int, samples: int, tokens: int) -> None:
    """The files each stage promises, with the paper's shapes."""
    codes = np.load(out / "codes" / "codes.npy", mmap_mode="r")
    if codes.shape != (num_images, 10, tokens) or codes.dtype != np.uint16:
        raise StageFailed(
            "extract", f"codes.npy is {codes.dtype} {codes.shape}, expected uint16 {(num_images, 10, tokens)}"
        )
    for name in ("model.pt", "ema.pt"):
        if not (out / "run" / name).exists():
            raise StageFailed("train", f"no {name} in {out / 'run'}")
    with np.load(out / "samples" / "samples.npz") as z:
        if z["arr_0"].shape[0] != samples or z["arr_0"].dtype != np.uint8:
            raise StageFailed("sample", f"samples.npz holds {z['arr_0'].dtype} {z['arr_0'].shape}")
    fid = json.loads((out / "fid.json").read_text())
    if not np.isfinite(fid.get("fid", float("nan"))):
        raise StageFailed("fid", f"FID is {fid.get('fid')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/smoke-imagenet", help="work folder (emptied first)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--tiny", action="store_true", help="GPT-debug and VQ-debug at 8 px: the plumbing in seconds")
    p.add_argument(
        "--samples", type=int, default=4, help="images to sample (eval fid's precision/recall need more than 3)"
    )
    p.add_argument("--timeout", type=float, help="seconds allowed to each command")
    p.add_argument("--json", metavar="PATH", help="write the stage times (and the failed stage) as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work folder (default: removed after a pass)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    start = time.perf_counter()
    result: dict = {"ok": False, "stages": {}}
    try:
        result["stages"] = smoke(out, device=args.device, tiny=args.tiny, samples=args.samples, timeout=args.timeout)
        result["ok"] = True
    except StageFailed as e:
        result["failed_stage"] = e.stage
        result["error"] = str(e)
        print(e, file=sys.stderr)
    result["seconds"] = time.perf_counter() - start
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not result["ok"]:
        return 1
    fid = json.loads((out / "fid.json").read_text())["fid"]
    print(f"[smoke-imagenet] all {len(STAGES)} stages passed in {result['seconds']:.1f} s (FID of noise: {fid:.1f})")
    if not args.keep:
        shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
