"""Train or evaluate a VQ image tokenizer.

    st-ar tokenizer train --dataset mnist --out runs/vq-mnist       # the CPU demo: about 4 minutes
    st-ar tokenizer train --out runs/vq-mnist --resume --steps 600  # continue the same run
    torchrun --nproc-per-node 4 -m st_ar.cli tokenizer train --dataset /data/imagenet --image-size 256 ...
    st-ar tokenizer eval --ckpt runs/vq-mnist/tokenizer.pt --dataset mnist

A run folder holds config.json, checkpoints/last.pt, tokenizer.pt (load it with
VQModel.from_checkpoint(path)), eval.json, recon/*.png, metrics.jsonl and tensorboard/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from torch.utils.data import Subset

from ..data.datasets import open_dataset
from ..models.vq import VQ_PRESETS, VQModel
from ..tokenizer.train import (
    TokenizerImages,
    TokenizerTrainConfig,
    evaluate,
    stored_config,
    train,
)
from . import json_object, resolve_device

HELP = "train or evaluate a VQ image tokenizer"

_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(TokenizerTrainConfig) if f.default is not dataclasses.MISSING
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add_train(
        sub.add_parser(
            "train",
            help="train a tokenizer (or continue one with --resume)",
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    _add_eval(sub.add_parser("eval", help="held-out PSNR, codebook usage and perplexity of a tokenizer file"))


def _add_train(p: argparse.ArgumentParser) -> None:
    # Defaults are not filled in by argparse (SUPPRESS) so that --resume can tell the flags given
    # now from the stored ones; the help shows the TokenizerTrainConfig default.
    p.argument_default = argparse.SUPPRESS
    p.add_argument("--out", required=True, help="run folder (created; refused if it already holds a run)")
    p.add_argument(
        "--resume",
        action="store_true",
        default=False,
        help="continue the run in --out from checkpoints/last.pt with its stored settings; only --steps, "
        "--eval-every, --eval-samples, --save-every, --log-every, --num-workers and --device may change",
    )
    g = p.add_argument_group("data")
    arg = _group_arg(g)
    arg("--dataset", field="dataset", help="mnist, fashion-mnist, or a folder of class subfolders")
    arg("--data-root", field="data_root", help="folder holding the mnist / fashion-mnist files, if not found")
    arg("--train-split", field="train_split", help="split to train on")
    arg("--eval-split", field="eval_split", help="held-out split for PSNR / usage / perplexity")
    arg(
        "--image-size",
        field="image_size",
        type=int,
        help="training resolution; smaller images are padded with black (MNIST 28 -> 32), larger ones "
        "centre-cropped (ADM crop); must be a multiple of the downsample factor",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--preset", dest="preset", help=f"VQ preset: {', '.join(VQ_PRESETS)} (default: {_DEFAULTS['preset']})"
    )
    g.add_argument(
        "--vq-args",
        dest="vq_args",
        type=json_object,
        metavar="JSON",
        help='VQConfig fields overriding the preset, e.g. \'{"codebook_size": 1024, "ch": 64}\'',
    )

    g = p.add_argument_group("optimisation")
    arg = _group_arg(g)
    arg("--steps", field="steps", type=int, help="total optimizer steps of the run; raise it with --resume to extend")
    arg("--batch-size", field="batch_size", type=int, help="global batch (split over torchrun ranks)")
    arg(
        "--lr",
        field="lr",
        type=float,
        help="AdamW learning rate; 1e-3 is stable for the small demo presets, LlamaGen uses 1e-4 for VQ-16",
    )
    arg("--lr-schedule", field="lr_schedule", choices=["constant", "cosine"], help="after warm-up; cosine ends at 0")
    arg("--warmup-steps", field="warmup_steps", type=int, help="linear warm-up steps")
    arg("--beta1", field="beta1", type=float, help="AdamW beta1")
    arg("--beta2", field="beta2", type=float, help="AdamW beta2")
    arg("--weight-decay", field="weight_decay", type=float, help="AdamW weight decay on conv weights")
    arg("--grad-clip", field="grad_clip", type=float, help="max gradient norm; 0 = off")
    arg(
        "--precision",
        field="precision",
        choices=["auto", "fp32", "bf16"],
        help="auto = bf16 autocast on CUDA, fp32 on CPU (the quantizer always runs in fp32)",
    )

    g = p.add_argument_group("losses")
    arg = _group_arg(g)
    arg("--recon-loss", field="recon_loss", choices=["l2", "l1"], help="pixel reconstruction loss")
    arg("--codebook-weight", field="codebook_weight", type=float, help="weight of the codebook loss")
    arg(
        "--commit-beta",
        field="commit_beta",
        type=float,
        help="commitment weight; 0.25 is the usual stable value (VQ-VAE, LlamaGen)",
    )
    arg(
        "--entropy-weight",
        field="entropy_weight",
        type=float,
        help="entropy loss weight (confident codes, spread over the codebook); 0 = off, as LlamaGen's default",
    )
    arg(
        "--gan-weight",
        field="gan_weight",
        type=float,
        help="PatchGAN hinge loss weight; 0 = off. With --gan-adaptive, 0.5 (LlamaGen) to 0.8 (VQGAN) is stable",
    )
    arg(
        "--gan-start-step",
        field="gan_start_step",
        type=int,
        help="step at which the GAN starts; start it after reconstructions are decent (e.g. half the run)",
    )
    g.add_argument(
        "--gan-adaptive",
        dest="gan_adaptive",
        action=argparse.BooleanOptionalAction,
        help="scale the GAN loss by VQGAN's adaptive weight (default: on); off = fixed --gan-weight",
    )
    g.add_argument("--disc-lr", dest="disc_lr", type=float, help="discriminator learning rate (default: --lr)")
    arg("--disc-channels", field="disc_channels", type=int, help="discriminator base width")
    arg(
        "--disc-layers",
        field="disc_layers",
        type=int,
        help="discriminator stride-2 layers; needs images of at least 3 * 2^N px",
    )
    arg(
        "--perceptual-weight",
        field="perceptual_weight",
        type=float,
        help="perceptual loss weight; 0 = off; needs --perceptual-weights. LlamaGen uses 1.0 with LPIPS",
    )
    arg(
        "--perceptual-weights",
        field="perceptual_weights",
        metavar="PATH",
        help="local feature network, torch.export (.pt2) or TorchScript (images in [-1, 1] -> feature map(s)); "
        "nothing is downloaded",
    )
    arg(
        "--dead-code-reinit",
        field="dead_code_reinit",
        type=int,
        metavar="N",
        help="every N steps move codes unused since the last check onto random encoder outputs; 0 = off",
    )
    arg(
        "--ema-decay",
        field="ema_decay",
        type=float,
        help="EMA of the tokenizer weights (used for eval and tokenizer.pt); 0 = off; 0.999 for runs of "
        "thousands of steps",
    )

    g = p.add_argument_group("run")
    arg = _group_arg(g)
    arg("--seed", field="seed", type=int, help="initial weights and data order")
    arg("--eval-every", field="eval_every", type=int, help="held-out eval + reconstruction grid every N steps; 0 = end")
    arg("--eval-samples", field="eval_samples", type=int, help="held-out images per periodic eval (final: all)")
    arg("--save-every", field="save_every", type=int, help="checkpoint every N steps; 0 = only at the end")
    arg("--log-every", field="log_every", type=int, help="scalars to metrics.jsonl / TensorBoard every N steps")
    arg("--num-workers", field="num_workers", type=int, help="DataLoader workers per rank; -1 = 0 on CPU, else 8")
    arg("--device", field="device", help="auto (this rank's GPU when available), cpu, cuda, cuda:1")


def _group_arg(g):
    def arg(*flags, field: str, help: str, **kw) -> None:
        g.add_argument(*flags, dest=field, help=f"{help} (default: {_DEFAULTS[field]})", **kw)

    return arg


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="tokenizer file: ours (tokenizer.pt), or LlamaGen's with --vq-model")
    p.add_argument("--vq-model", help="VQ preset for files without a stored config (LlamaGen's)")
    p.add_argument("--dataset", required=True, help="mnist, fashion-mnist, or a folder of class subfolders")
    p.add_argument("--data-root", help="folder holding the mnist / fashion-mnist files, if not found")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--image-size", type=int, default=32, help="as in training (default: 32)")
    p.add_argument("--limit", type=int, default=0, help="first N images only; 0 = all")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects")
    p.add_argument("--json", metavar="PATH", help="also write the metrics here")


def run(args: argparse.Namespace) -> None:
    if args.action == "train":
        _run_train(args)
    else:
        _run_eval(args)


def config_from_args(args: argparse.Namespace) -> tuple[TokenizerTrainConfig, bool]:
    """The run's config: the defaults (or, with --resume, the stored config) plus the flags given."""
    given = {k: v for k, v in vars(args).items() if k in _DEFAULTS or k == "vq_args"}
    given.pop("resume", None)
    if args.resume:
        fields = stored_config(args.out)
        fields.update(given)
    else:
        fields = given
    return TokenizerTrainConfig.from_dict(fields), args.resume


def _run_train(args: argparse.Namespace) -> None:
    config, resume = config_from_args(args)
    train(config, resume=resume)  # a NonFiniteLossError is reported by st_ar.cli (exit status 3)


def _run_eval(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    model = VQModel.from_checkpoint(args.ckpt, args.vq_model, trust=args.trust_checkpoint).to(device)
    base = open_dataset(args.dataset, args.split, root=args.data_root)
    images = TokenizerImages(base, args.image_size)
    if 0 < args.limit < len(images):
        images = Subset(images, range(args.limit))
    start = time.perf_counter()
    metrics = evaluate(model, images, batch_size=args.batch_size, device=device)
    metrics.update({"ckpt": os.path.abspath(args.ckpt), "dataset": args.dataset, "split": args.split})
    print(
        f"{metrics['images']} images in {time.perf_counter() - start:.1f} s: PSNR {metrics['psnr']:.2f} dB "
        f"(of mean MSE {metrics['psnr_of_mean_mse']:.2f} dB), codebook usage {metrics['codebook_usage']:.1%} "
        f"({metrics['codes_used']}/{metrics['codebook_size']}), perplexity {metrics['perplexity']:.1f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
