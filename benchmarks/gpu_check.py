"""The Python half of benchmarks/gpu_check.sh: the decode benchmark and the final table.

    python benchmarks/gpu_check.py decode --model GPT-B --batches 8,64,256 --json decode.json
    python benchmarks/gpu_check.py table WORK_DIR          # WORK_DIR: what gpu_check.sh's parts wrote

``decode`` samples full 256-token images from a random-weight GPT with ``st_ar.sampling.generate`` and
``compile=True`` (one compiled graph for every position, CUDA graphs on a GPU) where generate takes that
argument, and reports image tokens per second per batch size; the first call (compilation included) is
reported apart. ``table`` reads each part's exit code, log and JSON and prints one Markdown table; a part
that failed, timed out or never ran is a row that says so.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PARTS = ("tests", "train", "decode", "smoke")
MFU_TARGET = {"GPT-L": 0.45}  # the performance issue's target, bf16 against the measured matmul peak


# ----------------------------------------------------------------------------- decode


def decode(args: argparse.Namespace) -> None:
    import torch

    from st_ar.models.gpt import GPT, GPTConfig
    from st_ar.sampling import generate

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(args.model, **json.loads(args.model_args)))
    torch.nn.init.normal_(model.output.weight, std=0.02)  # LlamaGen's zero head would make every logit equal
    model = model.to(device=device, dtype=dtype).eval()
    can_compile = "compile" in inspect.signature(generate).parameters
    compiled = args.compile and can_compile
    extra = {"compile": True} if compiled else {}
    T = model.config.block_size
    result = {
        "model": args.model,
        "precision": args.precision,
        "device": str(device),
        "cfg_scale": args.cfg_scale,
        "compiled": compiled,
        "note": "" if compiled or not args.compile else "generate() has no compile argument here: eager decode",
        "rows": [],
    }
    for batch in [int(b) for b in args.batches.split(",")]:
        cond = torch.arange(batch, device=device) % model.config.num_classes

        def once(cond=cond):
            gen = torch.Generator(device).manual_seed(0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            generate(model, cond, cfg_scale=args.cfg_scale, generator=gen, **extra)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        first = once()  # compiles (and captures the graphs) for this batch size
        best = min(once() for _ in range(args.repeats))
        row = dict(batch=batch, first_call_s=first, s=best, tokens_per_s=batch * T / best, ms_per_step=best / T * 1e3)
        result["rows"].append(row)
        print(
            f"{args.model} batch {batch}: {row['tokens_per_s']:.0f} tokens/s, {row['ms_per_step']:.2f} ms/step "
            f"(first call {first:.1f} s, compiled {compiled})",
            flush=True,
        )
        if args.json:  # rewritten per batch: a timeout keeps the batches already done
            Path(args.json).write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------- table


def _rate(flops_per_s: float | None) -> str:
    if not flops_per_s:
        return "?"
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.1f} GFLOP/s"


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def part_status(work: Path, part: str) -> tuple[str, str]:
    """(status, detail) of a part from WORK/PART.rc and its log: pass, FAIL, TIMEOUT, or not run."""
    rc = _read(work / f"{part}.rc")
    if rc is None:
        return "not run", ""
    rc = rc.strip()
    if rc.startswith("skipped"):
        return "not run", rc
    log = _read(work / f"{part}.log") or ""
    last = next((line.strip() for line in reversed(log.splitlines()) if line.strip()), "")
    if rc in ("124", "137"):
        return "TIMEOUT", f"killed at its time limit; last line: {last[:120]}"
    if rc != "0":
        return "FAIL", f"exit {rc}; last line: {last[:120]}"
    return "pass", ""


def test_rows(work: Path) -> list[tuple[str, str, str, str]]:
    rows = []
    status, detail = part_status(work, "tests")
    xml = work / "tests.xml"
    if xml.exists():
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError:
            root = None
        for case in root.iter("testcase") if root is not None else ():
            name = case.get("name", "?")
            if case.find("failure") is not None or case.find("error") is not None:
                node = case.find("failure") if case.find("failure") is not None else case.find("error")
                rows.append(("gpu tests", name, "FAIL", (node.get("message") or "").splitlines()[0][:120]))
            elif case.find("skipped") is not None:
                rows.append(("gpu tests", name, "skip", (case.find("skipped").get("message") or "")[:120]))
            else:
                rows.append(("gpu tests", name, "pass", ""))
    if not rows or status in ("TIMEOUT", "not run") or (status == "FAIL" and all(r[2] != "FAIL" for r in rows)):
        rows.append(("gpu tests", "pytest -m gpu", status, detail))
    return rows


def train_rows(work: Path) -> list[tuple[str, str, str, str]]:
    rows = []
    for path in sorted(work.glob("train*.json")):
        data = _json(path)
        if not data:
            continue
        peaks = data.get("peaks", {})
        for r in data.get("rows", []):
            peak = peaks.get(r["precision"])
            target = MFU_TARGET.get(r["model"]) if r["variant"] == "baseline" else None
            verdict = f"{r['mfu']:.1%} MFU"
            if target is not None:
                verdict += " (target >= 45%: " + ("met" if r["mfu"] >= target else "NOT met") + ")"
            rows.append(
                (
                    "train step",
                    f"{r['model']} {r['precision']} {r['variant']} ({r['images']} images x {r['views']} views)",
                    f"{r['steps_per_s']:.2f} steps/s",
                    f"{verdict} vs measured {r['precision']} peak {_rate(peak)}; {r['s_per_image'] * 1e3:.1f} ms/image",
                )
            )
    for part in sorted({p.stem for p in work.glob("train*.rc")}):
        status, detail = part_status(work, part)
        if status != "pass" or not rows:
            rows.append(("train step", part, status, detail))
    if not rows:
        rows.append(("train step", "train", *part_status(work, "train")))
    return rows


def decode_rows(work: Path) -> list[tuple[str, str, str, str]]:
    rows = []
    data = _json(work / "decode.json")
    if data:
        how = "compiled static decode" if data.get("compiled") else "EAGER decode"
        for r in data["rows"]:
            rows.append(
                (
                    "sampling",
                    f"{data['model']} {data['precision']} batch {r['batch']} (CFG {data['cfg_scale']})",
                    f"{r['tokens_per_s']:.0f} tokens/s",
                    f"{how}; {r['ms_per_step']:.2f} ms/step; first call {r['first_call_s']:.1f} s"
                    + (f"; {data['note']}" if data.get("note") else ""),
                )
            )
    status, detail = part_status(work, "decode")
    if status != "pass" or not rows:
        rows.append(("sampling", "decode", status, detail))
    return rows


def smoke_rows(work: Path) -> list[tuple[str, str, str, str]]:
    status, detail = part_status(work, "smoke")
    data = _json(work / "smoke.json")
    if data:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in data.get("stages", {}).items())
        if data.get("ok"):
            return [("smoke-imagenet", "6 JPEGs -> extract -> train -> sample -> fid", "pass", stages)]
        return [("smoke-imagenet", f"stage {data.get('failed_stage')}", "FAIL", (data.get("error") or "")[:160])]
    return [("smoke-imagenet", "smoke", status if status != "pass" else "FAIL", detail or "no smoke.json written")]


def table(args: argparse.Namespace) -> None:
    work = Path(args.work)
    rows = test_rows(work) + train_rows(work) + decode_rows(work) + smoke_rows(work)
    header = _read(work / "header.txt")
    lines = [f"# gpu_check: {header.strip()}" if header else "# gpu_check", ""]
    lines += ["| part | item | result | detail |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d.replace('|', '/')} |" for a, b, c, d in rows]
    failed = sum(r[2] in ("FAIL", "TIMEOUT") for r in rows)
    lines += ["", f"{failed} failed or timed out, {sum(r[2] == 'pass' for r in rows)} passed"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decode", help="sampling tokens/s per batch size")
    d.add_argument("--model", default="GPT-B")
    d.add_argument("--batches", default="8,64,256")
    d.add_argument("--model-args", default="{}", metavar="JSON", help="GPTConfig fields over the preset")
    d.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    d.add_argument("--cfg-scale", type=float, default=2.0, help="2.0: CFG doubles the rows (LlamaGen's B setting)")
    d.add_argument("--repeats", type=int, default=2)
    d.add_argument("--device", default="auto")
    d.add_argument("--no-compile", dest="compile", action="store_false", help="eager decode")
    d.add_argument("--json", metavar="PATH")
    t = sub.add_parser("table", help="one table from the parts' outputs")
    t.add_argument("work", help="the folder gpu_check.sh's parts wrote")
    t.add_argument("--out", help="also write the table here")
    args = p.parse_args(argv)
    {"decode": decode, "table": table}[args.command](args)


if __name__ == "__main__":
    main()
