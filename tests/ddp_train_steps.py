"""Run two ST-AR training steps, with a sample grid between them, and save the weights: alone, or
as two gloo ranks under torchrun. The grid goes to OUT.pt's folder, samples-<ddp|fsdp>-<ranks>/.

python tests/ddp_train_steps.py CODES OUT.pt [ddp|fsdp]
python -m torch.distributed.run --nproc_per_node 2 tests/ddp_train_steps.py CODES OUT.pt [ddp|fsdp]
"""

import os
import sys

import torch

from st_ar.config import apply_overrides, preset
from st_ar.distributed import cleanup_distributed, init_distributed
from st_ar.runlog import RunLogger
from st_ar.train.loop import full_state_dicts, setup, train_step
from st_ar.train.preview import Previewer


def main(codes: str, out: str, parallel: str) -> None:
    preview_dir = os.path.join(os.path.dirname(out), f"samples-{parallel}-{os.environ.get('WORLD_SIZE', 1)}")
    cfg = apply_overrides(
        preset("debug"),
        [
            f"data.codes={codes}",
            'model.args={"vocab_size": 64, "block_size": 64, "num_classes": 10, "token_dropout_p": 0, '
            '"resid_dropout_p": 0, "ffn_dropout_p": 0}',
            "objective.label_dropout=0",
            "objective.mask_ratio=0",  # masks are drawn per rank; with none hidden both runs see the same
            "optim.batch_size=8",
            "data.num_workers=0",
            f"train.parallel={parallel}",
            f"train.out_dir={preview_dir}",
            "train.sample_every=1",
        ],
    )
    info = init_distributed("cpu")
    state, loader, sampler = setup(cfg, info)
    sampler.set_epoch(0)
    loader.dataset.set_epoch(0)
    batches = iter(loader)
    previewer = Previewer(cfg, loader.dataset.meta, state.student.config, info.device, info.is_main)
    log = RunLogger(cfg.train.out_dir, enabled=info.is_main, tensorboard=False)
    for step in range(2):
        train_step(state, [next(batches)], step)
        if step == 0:  # every rank samples (FSDP gathers weights collectively); the next step must be unaffected
            previewer(state.student, 1, state.autocast, log)
    log.close()
    weights = full_state_dicts(state)  # a collective under FSDP: every rank calls it
    if info.is_main:
        torch.save({"student": weights["model"], "teacher": weights["teacher"]}, out)


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "ddp")
    finally:
        # after main returns, so the DDP model and its pending gloo work are freed first: a process
        # group torn down (or an interpreter finalized) under a live DDP reducer can abort the rank
        cleanup_distributed()
