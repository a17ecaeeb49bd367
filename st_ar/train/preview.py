"""Sample grids during training, so a person can watch the generator improve.

Every ``train.sample_every`` steps the student samples the same classes from the same seed and
rank 0 writes ``OUT/samples/step_NNNNNN.png`` (one column per class, ``PREVIEW_ROWS`` rows) and
the grid to TensorBoard. Sampling uses its own generator and eval mode, so the training run's
weights and random streams are exactly those of a run without previews.
"""

from __future__ import annotations

import os

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ..images import make_grid, save_grid
from ..models.gpt import GPT
from ..models.vq import VQModel
from ..sampling.generate import generate_images

PREVIEW_COLUMNS = 8  # classes shown, evenly spaced over the label range
PREVIEW_ROWS = 2  # samples per class
PREVIEW_SEED = 0


def preview_classes(num_classes: int, columns: int = PREVIEW_COLUMNS) -> list[int]:
    k = min(num_classes, columns)
    return [i * num_classes // k for i in range(k)]


def tokenizer_for_preview(configured: str, codes_meta: dict) -> str:
    """The VQ checkpoint that decodes previews: the configured one, else the one the codes came from."""
    path = configured or codes_meta.get("tokenizer_path", "")
    if not path:
        raise ValueError("train.sample_every needs a tokenizer to decode samples: set train.sample_tokenizer=PATH")
    if not os.path.isfile(path):
        where = "train.sample_tokenizer" if configured else "the codes' meta.json (tokenizer_path)"
        raise FileNotFoundError(f"tokenizer {path} (from {where}) does not exist: set train.sample_tokenizer=PATH")
    return path


class Previewer:
    """Writes a sample grid of the student. Call on every rank: under FSDP gathering the weights is a
    collective; rank 0 then samples alone."""

    def __init__(self, cfg, codes_meta: dict, gpt_config, device: torch.device, is_main: bool):
        self.every = cfg.train.sample_every
        self.cfg_scale = cfg.train.sample_cfg_scale
        self.sharded = cfg.train.parallel == "fsdp"
        self.out = os.path.join(cfg.train.out_dir, "samples")
        self.is_main = is_main
        self.device = device
        self.gpt_config = gpt_config
        self.vq = None
        self.copy: GPT | None = None  # FSDP: an unsharded copy on rank 0, refreshed for every grid
        if self.every > 0:  # checked on every rank, so a bad path stops all of them before step 1
            path = tokenizer_for_preview(cfg.train.sample_tokenizer, codes_meta)
            with torch.random.fork_rng(devices=[]):  # building the VQ draws initial weights from the global RNG
                vq = VQModel.from_checkpoint(path)
            if vq.config.codebook_size != gpt_config.vocab_size:
                raise ValueError(
                    f"preview tokenizer has {vq.config.codebook_size} codes but the GPT vocabulary is "
                    f"{gpt_config.vocab_size}: set train.sample_tokenizer to the tokenizer of the codes"
                )
            self.vq = vq.to(device) if is_main else None
        classes = preview_classes(gpt_config.num_classes)
        self.columns = len(classes)
        self.labels = torch.tensor(classes * PREVIEW_ROWS, device=device)

    def due(self, step: int, last: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == last)

    def __call__(self, student: GPT, step: int, autocast, log) -> str | None:
        gpt = self._unsharded(student)
        if not self.is_main:
            return None
        was_training = gpt.training
        gpt.eval()
        try:
            generator = torch.Generator(self.device).manual_seed(PREVIEW_SEED)
            with autocast():
                _, images = generate_images(
                    gpt,
                    self.vq,
                    self.labels,
                    batch_size=len(self.labels),
                    generator=generator,
                    cfg_scale=self.cfg_scale,
                )
        finally:
            gpt.train(was_training)
        path = os.path.join(self.out, f"step_{step:06d}.png")
        save_grid(images, path, nrow=self.columns)
        log.image(step, "samples", make_grid(images, nrow=self.columns))
        return path

    def _unsharded(self, student: GPT) -> GPT:
        if not self.sharded:
            return student
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(student, options=options)  # a collective: every rank calls it
        if self.is_main:
            if self.copy is None:
                with torch.random.fork_rng(devices=[]):
                    self.copy = GPT(self.gpt_config).to(self.device)
            self.copy.load_state_dict(weights)
        return self.copy
