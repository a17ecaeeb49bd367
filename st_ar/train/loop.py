"""Training: ``train(cfg)`` runs a whole run; ``train_step(state, batch, step)`` one optimizer step.

The same loop trains the LlamaGen baseline (one view, no teacher) and ST-AR, on one CPU process
or on many GPUs through torchrun:

    setup -> (resume) -> [train_step -> EMA -> log -> checkpoint]* -> final checkpoint -> close

A run folder holds config.json, metrics.jsonl, tensorboard/, checkpoints/last.pt (everything
needed to resume), samples/step_N.png when train.sample_every is set, and, at the end, model.pt /
ema.pt (GPT checkpoints `st-ar sample` reads). A folder that holds checkpoints/last.pt resumes from
it. Precision, parameter groups, the finite-loss check, random streams, the resume rules and the
batch order are runtime.py's and sampler.py's, shared with the tokenizer trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ..config import RunConfig, to_dict
from ..data.codes import check_codes_match, codes_identity, codes_identity_differences
from ..data.views import CodesDataset
from ..distributed import (
    DistInfo,
    GracefulStop,
    all_gather_rows,
    all_reduce_mean,
    any_rank,
    cleanup_distributed,
    init_distributed,
)
from ..models.gpt import GPT, GPTConfig, save_gpt
from ..models.loading import CheckpointError, read_checkpoint
from ..objectives.total import STARObjective, no_gather
from ..progress import progress_bar
from ..runfolder import lock_run_folder, remove_stale_temp_files, write_json_atomic
from ..runlog import RunLogger
from ..sampling.generate import check_sampling_settings
from ..teacher import build_teacher, ema_schedule, update_ema
from . import NonFiniteLoss, runtime
from .flops import run_step_flops
from .parallel import full_tensor, shard_model
from .preview import Previewer
from .runtime import autocast_for, capture_rng, check_finite, check_resumable, param_groups, restore_rng
from .sampler import StepBatches

TRUST_HINT = "model.trust_checkpoint=true"  # how `st-ar train` allows pickled objects (loader errors name it)


class StudentBundle(nn.Module):
    """The trained parameters (GPT + projector) as one module, so DDP/FSDP wrap them together."""

    def __init__(self, gpt: GPT, objective: STARObjective):
        super().__init__()
        self.gpt = gpt
        self.objective = objective
        self.run_gpt: nn.Module = gpt  # replaced by the compiled module when train.compile is on

    def forward(self, teacher, tokens, labels, generator, shared_generator, gather, ssl=True):
        return self.objective(
            self.run_gpt,
            teacher,
            tokens,
            labels,
            null_class=self.gpt.config.null_class,
            generator=generator,
            shared_generator=shared_generator,
            gather=gather,
            ssl=ssl,
        )


@dataclass
class TrainState:
    cfg: RunConfig
    dist: DistInfo
    bundle: StudentBundle  # unwrapped: what checkpoints save
    model: nn.Module  # the bundle as run (DDP-wrapped when distributed)
    teacher: GPT | None
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # this rank's masks and label dropout: saved with the checkpoint
    shared_generator: torch.Generator  # the contrasted steps, identical on every rank
    ema_decay: Any  # step -> decay
    autocast: Any  # () -> context manager
    codes: dict[str, Any] | None = None  # identity of the training codes (codes_identity), checked on resume
    run_teacher: nn.Module | None = None  # the teacher as run: compiled under train.compile
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    flops: float = 0.0  # cumulative analytic training FLOPs of all ranks (flops.py), saved with the checkpoint
    train_seconds: float = 0.0  # cumulative wall time of the training steps, saved with the checkpoint

    @property
    def student(self) -> GPT:
        return self.bundle.gpt


# ----------------------------------------------------------------------------- setup


def build_model(cfg: RunConfig, codes_meta: dict | None = None, *, load_init: bool = True) -> GPT:
    """The student: fresh, or fine-tuned from ``model.init_from`` (LlamaGen's file or ours).

    Either way the architecture is ``model.name`` updated with ``model.args``; a file that does
    not fit it is refused with the mismatch named. ``load_init=False`` (a resumed run, whose
    checkpoint replaces the weights) skips reading ``init_from``.
    """
    try:
        gpt_config = GPTConfig.from_model_args(cfg.model.args, GPTConfig.from_name(cfg.model.name))
    except (ValueError, TypeError) as e:
        raise ValueError(f"model.name={cfg.model.name} model.args={json.dumps(cfg.model.args)}: {e}") from None
    if codes_meta is not None:
        check_codes_match(codes_meta, gpt_config.vocab_size, gpt_config.block_size, gpt_config.num_classes)
    if cfg.model.init_from and load_init:
        return GPT.from_checkpoint(
            cfg.model.init_from,
            cfg.model.name,
            model_args=cfg.model.args,
            trust=cfg.model.trust_checkpoint,
            trust_hint=TRUST_HINT,
        )
    return GPT(gpt_config)


def build_state(
    cfg: RunConfig, dist_info: DistInfo, codes_meta: dict | None = None, *, resuming: bool = False
) -> TrainState:
    """Student, teacher, projector, optimizer and random streams of a run, ready for train_step
    (``resuming``: a checkpoint will replace the weights, so ``model.init_from`` is not read)."""
    device = dist_info.device
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (teacher included)
    student = build_model(cfg, codes_meta, load_init=not resuming).to(device)
    gpt_cfg = student.config
    objective = STARObjective(cfg.objective, gpt_cfg.dim, gpt_cfg.n_layer).to(device)
    teacher = build_teacher(student) if cfg.objective.needs_teacher else None
    bundle = StudentBundle(student, objective)
    student.activation_checkpointing = cfg.train.activation_checkpointing
    run_teacher = teacher
    if cfg.train.compile:  # one graph each (tests/test_train.py checks there are no graph breaks)
        bundle.run_gpt = torch.compile(student)
        run_teacher = torch.compile(teacher) if teacher is not None else None
        objective.compile_losses()
    model: nn.Module = bundle
    if cfg.train.parallel == "fsdp":
        shard_model(bundle, student)  # in place: bundle now holds DTensor shards
        if teacher is not None:
            shard_model(teacher, teacher)
    elif dist_info.distributed:
        # past objective.ssl_until the projector gets no gradient: DDP must look for unused parameters
        unused = cfg.objective.ssl_until < 1.0 and cfg.objective.needs_teacher
        model = DDP(bundle, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)
    # the fused kernel (CPU and CUDA) is ~5x faster than the per-tensor loop on a 2-core CPU
    optimizer = torch.optim.AdamW(
        param_groups(bundle, cfg.optim.weight_decay),
        lr=cfg.optim.effective_lr(),
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        fused=cfg.train.parallel != "fsdp",  # FSDP's DTensor shards take the foreach path
    )
    autocast = autocast_for(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed + dist_info.rank)  # dropout differs per rank, as with independent batches
    generator = torch.Generator(device).manual_seed(cfg.train.seed * 1000 + dist_info.rank)
    shared = torch.Generator(device).manual_seed(cfg.train.seed * 1000 + 999)
    ema = ema_schedule(cfg.teacher.ema_schedule, cfg.teacher.ema_decay, cfg.train.steps, cfg.teacher.ema_start)
    codes = codes_identity(codes_meta) if codes_meta is not None else None
    return TrainState(
        cfg, dist_info, bundle, model, teacher, optimizer, generator, shared, ema, autocast, codes, run_teacher
    )


def build_loader(cfg: RunConfig, dist_info: DistInfo, dataset: CodesDataset) -> tuple[DataLoader, StepBatches]:
    """Micro-batches of (B, M, T) codes: batch_size / (ranks x grad_accum) images each, grad_accum
    of them per step (``sampler.set_steps`` / ``set_epoch`` choose the steps served)."""
    world, accum = dist_info.world_size, cfg.optim.grad_accum
    if cfg.optim.batch_size % (world * accum):
        raise ValueError(
            f"optim.batch_size {cfg.optim.batch_size} is not divisible by {world} ranks x {accum} accumulation steps"
        )
    micro = cfg.optim.batch_size // (world * accum)
    sampler = StepBatches(len(dataset), micro, accum=accum, rank=dist_info.rank, world_size=world, seed=cfg.train.seed)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=dist_info.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.train.seed),  # keeps the global RNG untouched
    )
    return loader, sampler


def setup(cfg: RunConfig, dist_info: DistInfo) -> tuple[TrainState, DataLoader, StepBatches]:
    dataset = CodesDataset(
        cfg.data.codes,
        num_views=cfg.objective.num_views,
        seed=cfg.train.seed,
        same_orientation=cfg.data.same_orientation_views,
    )
    if cfg.train.sample_every > 0:  # the previews' guidance scale, checked before any step
        try:
            check_sampling_settings(cfg_scale=cfg.train.sample_cfg_scale)
        except ValueError as e:
            raise ValueError(f"train.sample_cfg_scale: {e}") from None
    state = build_state(cfg, dist_info, dataset.meta, resuming=os.path.exists(checkpoint_path(cfg)))
    loader, sampler = build_loader(cfg, dist_info, dataset)
    return state, loader, sampler


# ----------------------------------------------------------------------------- one step


def train_step(
    state: TrainState, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], step: int
) -> dict[str, float]:
    """Forward/backward over the micro-batches, clip, AdamW, EMA. Returns this rank's metrics.

    ``step`` is the number of steps done before this one (``state.step``); logs, checkpoints and
    errors call this step ``step + 1``.
    """
    cfg, device = state.cfg, state.dist.device
    state.model.train()
    gather = all_gather_rows if (cfg.objective.gather_negatives and state.dist.distributed) else no_gather
    ssl = cfg.objective.ssl_on(step, cfg.train.steps)  # False past objective.ssl_until: plain next-token
    sums: dict[str, float] = {}
    n = len(micro_batches)
    for i, (tokens, labels) in enumerate(micro_batches):
        tokens, labels = tokens.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        sync = i == n - 1 or not isinstance(state.model, DDP)
        with contextlib.nullcontext() if sync else state.model.no_sync():
            with state.autocast():
                teacher = state.run_teacher if state.run_teacher is not None else state.teacher
                total, losses = state.model(
                    teacher, tokens, labels, state.generator, state.shared_generator, gather, ssl
                )
            (total / n).backward()
        for k, v in {"total": total, **losses}.items():
            sums[f"loss/{k}"] = sums.get(f"loss/{k}", 0.0) + v.detach().float().item() / n
    grad_norm = full_tensor(
        torch.nn.utils.clip_grad_norm_(state.bundle.parameters(), cfg.optim.grad_clip)
        if cfg.optim.grad_clip > 0
        else _grad_norm(state.bundle)
    )
    try:
        check_finite(
            [sums["loss/total"], grad_norm],
            step=step,
            detail=lambda: (
                ", ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in sums.items())
                + f", grad_norm={float(grad_norm):.4g}"
            ),
            device=device,
        )
    except NonFiniteLoss:
        state.optimizer.zero_grad(set_to_none=True)
        raise
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    decay = state.ema_decay(step)
    if state.teacher is not None and ssl:
        if hasattr(state.teacher, "reshard"):
            # FSDP keeps the root unit gathered after a forward without backward; shard it back
            # so teacher and student parameters are the same local shards for the EMA
            state.teacher.reshard()
        update_ema(state.teacher, state.student, decay)
    sums["grad_norm"] = float(grad_norm)
    sums["lr"] = state.optimizer.param_groups[0]["lr"]
    if state.teacher is not None and ssl:
        sums["teacher/decay"] = decay
    state.flops += step_flops_at(state, step)
    return sums


def step_flops_at(state: TrainState, step: int) -> float:
    """Analytic FLOPs of the optimizer step after ``step`` done ones, over all ranks (flops.py)."""
    cfg = state.cfg
    ssl = cfg.objective.ssl_on(step, cfg.train.steps)
    return run_step_flops(cfg, state.student.config, state.dist.world_size, ssl=ssl)


def _grad_norm(module: nn.Module) -> torch.Tensor:
    norms = [full_tensor(p.grad.detach()).float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_path(cfg: RunConfig) -> str:
    return runtime.checkpoint_path(cfg.train.out_dir)


def full_state_dicts(state: TrainState) -> dict[str, Any]:
    """Unsharded CPU state dicts of everything trained; a collective under FSDP (call on every rank)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        "model": get_model_state_dict(state.student, options=opts),
        "teacher": get_model_state_dict(state.teacher, options=opts) if state.teacher is not None else None,
        "projector": get_model_state_dict(state.bundle.objective, options=opts),
        "optimizer": get_optimizer_state_dict(state.bundle, state.optimizer, options=opts),
    }


def save_checkpoint(state: TrainState) -> str:
    """Everything needed to continue the run exactly; a GPT checkpoint `st-ar sample` reads too."""
    path = checkpoint_path(state.cfg)
    weights = full_state_dicts(state)
    rng = capture_rng(state.dist, _generators(state))  # every rank's streams: each continues exactly
    if state.dist.is_main:
        save_gpt(
            path,
            state.student.config,
            weights.pop("model"),
            **weights,
            step=state.step,
            data={"epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch},
            rng=rng,
            compute={"flops": state.flops, "train_seconds": state.train_seconds},
            run_config=to_dict(state.cfg),
            codes=state.codes,
        )
    if state.dist.distributed:
        dist.barrier()
    return path


def load_checkpoint(state: TrainState, path: str) -> None:
    try:
        ckpt = read_checkpoint(path, trust=state.cfg.model.trust_checkpoint, trust_hint=TRUST_HINT)
    except CheckpointError as e:
        raise CheckpointError(
            f"cannot resume the run in {state.cfg.train.out_dir}: {e}\nTo train this run from step 0 instead, "
            f"move {path} out of the way (the run's other files are kept)."
        ) from None
    check_resumable(ckpt.get("run_config", {}), state.cfg, path)
    if ckpt.get("codes") is not None and state.codes is not None:
        diffs = codes_identity_differences(ckpt["codes"], state.codes)
        if diffs:
            raise CheckpointError(
                f"{path} was trained on other codes than data.codes={state.cfg.data.codes}:\n  - "
                + "\n  - ".join(diffs)
                + "\nPoint data.codes at the run's own codes (a moved copy is fine), or start a new train.out_dir."
            )
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(state.student, ckpt["model"], options=opts)
    if state.teacher is not None:
        if ckpt.get("teacher") is None:
            raise CheckpointError(f"{path} has no teacher but this run needs one")
        set_model_state_dict(state.teacher, ckpt["teacher"], options=opts)
    if ckpt["projector"] or any(True for _ in state.bundle.objective.parameters()):
        # the baseline has no projector: an empty state dict is refused by set_model_state_dict
        set_model_state_dict(state.bundle.objective, ckpt["projector"], options=opts)
    set_optimizer_state_dict(state.bundle, state.optimizer, ckpt["optimizer"], options=opts)
    state.step = int(ckpt["step"])
    state.epoch, state.batch_in_epoch = int(ckpt["data"]["epoch"]), int(ckpt["data"]["batch_in_epoch"])
    restore_rng(ckpt["rng"], state.dist, path, _generators(state))
    compute = ckpt.get("compute")
    if compute is not None:
        state.flops, state.train_seconds = float(compute["flops"]), float(compute["train_seconds"])
    else:  # written before compute was recorded: the FLOPs follow from the steps, the seconds are lost
        state.flops = sum(step_flops_at(state, s) for s in range(state.step))


def _generators(state: TrainState) -> dict[str, torch.Generator]:
    return {"objective": state.generator, "shared": state.shared_generator}


# ----------------------------------------------------------------------------- the run


def train(cfg: RunConfig, *, stop_at: int | None = None) -> dict[str, Any]:
    """Run (or resume) a training run. ``stop_at`` ends it early at that step as Ctrl-C would.

    Returns a summary: final step, last logged metrics, checkpoint path, whether it finished, and
    whether it had already finished before this call (then no step ran and no metrics are new).
    """
    dist_info = init_distributed(cfg.train.device)
    try:
        return _train(cfg, dist_info, stop_at)
    finally:
        cleanup_distributed()


def _train(cfg: RunConfig, dist_info: DistInfo, stop_at: int | None) -> dict[str, Any]:
    state, loader, sampler = setup(cfg, dist_info)  # checks settings, data and model: nothing written yet
    out = cfg.train.out_dir
    lock = lock_run_folder(out, "train.out_dir", dist_info)
    try:
        return _train_locked(cfg, dist_info, stop_at, state, loader, sampler)
    finally:
        lock.release()


def _train_locked(cfg, dist_info, stop_at, state, loader, sampler) -> dict[str, Any]:
    out = cfg.train.out_dir
    ckpt = checkpoint_path(cfg)
    if dist_info.is_main:
        remove_stale_temp_files(out, os.path.dirname(ckpt))  # left by a save that was killed
    if os.path.exists(ckpt):
        load_checkpoint(state, ckpt)
    already_finished = state.step >= cfg.train.steps
    if dist_info.is_main:
        write_json_atomic(os.path.join(out, "config.json"), to_dict(cfg))
    log = RunLogger(out, enabled=dist_info.is_main, resume_step=state.step)  # drops lines after the checkpoint
    previewer = Previewer(cfg, loader.dataset.meta, state.student.config, dist_info.device, dist_info.is_main)
    finished = False
    bar = progress_bar(
        total=cfg.train.steps,
        initial=state.step,
        disable=not dist_info.is_main,
        unit="step",
        desc=os.path.basename(out.rstrip("/")) or "train",
        dynamic_ncols=True,
    )
    with GracefulStop() as stop:
        try:
            finished, last = _run_steps(state, loader, sampler, log, bar, previewer, stop, stop_at)
            save_checkpoint(state)
            if not finished:
                return _summary(state, last, finished=False)
            _export(state)
            return _summary(state, last, finished=True, already_finished=already_finished)
        except NonFiniteLoss as e:
            have = os.path.exists(ckpt)
            raise NonFiniteLoss(
                f"{e}. Stopped; {'the last good checkpoint is ' + ckpt if have else 'no checkpoint was written yet'}"
                ". Try a lower optim.lr or optim.grad_clip, or train.precision=fp32."
            ) from None
        finally:
            bar.close()
            log.close()
            if not finished and dist_info.is_main and stop.requested:
                print(f"stopped at step {state.step}; resume by running the same command again")


def _run_steps(state, loader, sampler, log, bar, previewer, stop, stop_at) -> tuple[bool, dict[str, float]]:
    """Steps until train.steps (True) or a stop (Ctrl-C, ``stop_at``: False), with the last logged metrics.

    Each epoch gets its own DataLoader iterator, so the dataset draws that epoch's views."""
    cfg, dist_info = state.cfg, state.dist
    accum = cfg.optim.grad_accum
    seqs_per_step = cfg.optim.batch_size * cfg.objective.num_views
    tokens_per_step = seqs_per_step * state.student.config.block_size
    last: dict[str, float] = {}
    t0, steps_timed = time.perf_counter(), 0
    while state.step < cfg.train.steps:
        epoch = sampler.epoch_of(state.step)
        sampler.set_steps(state.step, min(cfg.train.steps, (epoch + 1) * sampler.steps_per_epoch))
        loader.dataset.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(sampler.start, sampler.stop):
            start = time.perf_counter()  # the step with its batches; logging, previews and saves excluded
            metrics = train_step(state, [next(batches) for _ in range(accum)], state.step)
            if dist_info.device.type == "cuda":
                torch.cuda.synchronize(dist_info.device)  # the step's queued kernels count to it
            state.train_seconds += time.perf_counter() - start
            state.step += 1
            state.epoch, state.batch_in_epoch = sampler.position(state.step)
            steps_timed += 1
            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
                elapsed = time.perf_counter() - t0
                metrics["speed/seqs_per_s"] = seqs_per_step * steps_timed / elapsed
                metrics["speed/tokens_per_s"] = tokens_per_step * steps_timed / elapsed
                t0, steps_timed = time.perf_counter(), 0
                last = _reduce(metrics, dist_info)
                last.update(flops=state.flops, train_seconds=state.train_seconds)  # rank 0's, not averaged
                log.scalars(state.step, last)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in last.items() if k.startswith("loss/")})
            bar.update(1)
            if previewer.due(state.step, cfg.train.steps):
                previewer(state.student, state.step, state.autocast, log)
            if state.step in cfg.train.export_steps:
                _export(state, export_folder(cfg, state.step))
            if state.step % cfg.train.save_every == 0 and state.step < cfg.train.steps:
                save_checkpoint(state)
            if any_rank(stop.requested or state.step == stop_at, dist_info.device):
                return False, last
    return True, last


def _reduce(metrics: dict[str, float], dist_info: DistInfo) -> dict[str, float]:
    speed = {k: v for k, v in metrics.items() if k.startswith("speed/")}
    reduced = all_reduce_mean({k: v for k, v in metrics.items() if not k.startswith("speed/")}, dist_info.device)
    return {**reduced, **speed}


def export_folder(cfg: RunConfig, step: int) -> str:
    """Where train.export_steps keeps the weights of ``step``: OUT/exports/step_N."""
    return os.path.join(cfg.train.out_dir, "exports", f"step_{step}")


def _export(state: TrainState, out: str | None = None) -> None:
    """model.pt (student) and ema.pt (teacher) in ``out`` (default the run folder): plain GPT checkpoints
    for sampling and evaluation."""
    weights = full_state_dicts(state)
    if not state.dist.is_main:
        return
    out = out or state.cfg.train.out_dir
    os.makedirs(out, exist_ok=True)
    # the compute spent to reach these weights travels with them, so an evaluation along the run needs no other record
    compute = {"flops": state.flops, "train_seconds": state.train_seconds}
    meta = {"step": state.step, "run_config": to_dict(state.cfg), "compute": compute}
    save_gpt(os.path.join(out, "model.pt"), state.student.config, weights["model"], **meta)
    if weights["teacher"] is not None:
        save_gpt(os.path.join(out, "ema.pt"), state.student.config, weights["teacher"], **meta)


def _summary(state: TrainState, last: dict, finished: bool, already_finished: bool = False) -> dict[str, Any]:
    return {
        "step": state.step,
        "metrics": last,
        "checkpoint": checkpoint_path(state.cfg),
        "finished": finished,
        "already_finished": already_finished,
        "flops": state.flops,  # cumulative analytic training FLOPs (train/flops.py), all ranks
        "train_seconds": state.train_seconds,  # cumulative wall time of the training steps
        "config": dataclasses.asdict(state.cfg),
    }
