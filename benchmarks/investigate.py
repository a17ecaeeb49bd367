"""Follow-ups to the ablation that need no training: sampling temperature, and the EMA teacher's weights.

    python benchmarks/investigate.py [--dataset fashion-mnist] [--runs baseline-s0,star-s0,baseline-ec-s0]

Re-samples finished runs of benchmarks/reproduce.py (their checkpoints under runs/reproduce) at other
temperatures and, for ST-AR runs, from ema.pt (the teacher), and evaluates every sample set exactly as
the sweep does. Prints a markdown table and writes benchmarks/results/<dataset>/investigate.json.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ablation  # noqa: E402
from ablation import ROOT, SAMPLING  # noqa: E402
from reproduce import evaluator, prepare_data  # noqa: E402

from st_ar import pipeline  # noqa: E402
from st_ar.runfolder import write_json_atomic  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--runs", default="baseline-s0,star-s0,baseline-ec-s0")
    p.add_argument("--temperatures", default="0.9,1.0")
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "reproduce"))
    args = p.parse_args()

    data = prepare_data(args.dataset, args.work)  # the sweep's tokenizer and codes (already built)
    tokenizer = data["tokenizer"]
    evaluate = evaluator(args.dataset, data)
    rows = []
    for name in args.runs.split(","):
        run = os.path.join(args.work, args.dataset, "runs", name)
        weights = ["model.pt"] + (["ema.pt"] if os.path.isfile(os.path.join(run, "ema.pt")) else [])
        seed = int(name.rsplit("-s", 1)[1])
        for w in weights:
            for t in (float(x) for x in args.temperatures.split(",")):
                out = os.path.join(run, f"investigate_{w.split('.')[0]}_t{t}")
                sampling = dict(SAMPLING, seed=seed, temperature=t)
                pipeline.sample_model(os.path.join(run, w), tokenizer, out, **sampling)
                m = evaluate(os.path.join(run, w), os.path.join(out, "samples.npz"))
                probe = {int(s): a for s, a in m["probe"].items()}
                rows.append(
                    dict(
                        run=name,
                        weights=w,
                        temperature=t,
                        fid=m["fid"],
                        domain_fid=m["domain_fid"],
                        class_accuracy=m["class_accuracy"],
                        probe_last=probe[max(probe)],
                    )
                )
                r = rows[-1]
                print(
                    f"| {name} | {w} | {t} | {r['fid']:.2f} | {r['domain_fid']:.2f} | "
                    f"{100 * r['class_accuracy']:.1f}% | {100 * r['probe_last']:.1f}% |",
                    flush=True,
                )
    write_json_atomic(os.path.join(ablation.RESULTS, args.dataset, "investigate.json"), rows)


if __name__ == "__main__":
    main()
