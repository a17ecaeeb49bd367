"""Data pipeline speed: code extraction (images/s) and the training loader against a training step.

Measures, in one process and one run:
  - extraction: images/s (and crops/s) of ``extract_codes`` on MNIST with a demo-sized tokenizer
    (random init unless --vq-ckpt), ten crops at one crop range, image size 32;
  - the loader: sequences/s of ``CodesDataset`` (M = 2 views, batch 128) through a DataLoader,
    with 0 and with --num-workers workers;
  - the consumer: sequences/s of one GPT-S training step (forward + backward + AdamW) at batch 128,
    to show whether the loader can keep up.

    python benchmarks/extract_speed.py                       # 2000 MNIST test images
    python benchmarks/extract_speed.py --limit 10000 --num-workers 4 --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from st_ar.data import CodesDataset, extract_codes, open_dataset
from st_ar.distributed import DistInfo
from st_ar.models.gpt import GPT, GPTConfig
from st_ar.models.vq import VQConfig, VQModel

# The demo tokenizer: downsample 4, so 32 px -> an 8x8 grid of 64 tokens from a 1024-code book.
DEMO_VQ = dict(
    ch=64, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2), z_channels=64, codebook_size=1024, codebook_embed_dim=8
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--split", default="test")
    p.add_argument("--vq-ckpt", help="a trained tokenizer; default: the demo config with random weights")
    p.add_argument("--vq-model", help="preset name for a LlamaGen-style --vq-ckpt")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=2000, help="images to extract")
    p.add_argument("--batch-size", type=int, default=64, help="extraction batch (images)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--loader-batches", type=int, default=100)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    device = torch.device(args.device)
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {device}, load average {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        vq_path = args.vq_ckpt
        if vq_path is None:
            torch.manual_seed(0)
            vq_path = os.path.join(tmp, "vq.pt")
            VQModel(VQConfig(**DEMO_VQ)).save(vq_path)
        dataset = open_dataset(args.dataset, args.split)

        # ---- extraction
        out = os.path.join(tmp, "codes")
        report = extract_codes(
            dataset,
            vq_path,
            out,
            image_size=args.image_size,
            vq_model=args.vq_model,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            limit=args.limit,
            dist_info=DistInfo(device=device),
            progress=False,
        )
        ips = report.encoded_images / report.seconds
        print(
            f"extraction: {report.encoded_images} images x 10 crops in {report.seconds:.1f} s: "
            f"{ips:.1f} images/s, {10 * ips:.0f} crops/s (batch {args.batch_size}, {args.num_workers} workers)"
        )
        # the bound: the tokenizer alone on one batch of crops already in memory
        vq = VQModel.from_checkpoint(vq_path, args.vq_model).to(device)
        crops = torch.rand(10 * args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
        vq.encode(crops)  # warm-up
        start = time.perf_counter()
        vq.encode(crops)
        if device.type == "cuda":
            torch.cuda.synchronize()
        bound = crops.shape[0] / (time.perf_counter() - start)
        print(f"tokenizer alone: {bound:.0f} crops/s (extraction reached {10 * ips / bound:.0%} of it)")

        # ---- loader
        codes = CodesDataset(out, num_views=2)
        for workers in sorted({0, args.num_workers}):
            loader = DataLoader(codes, batch_size=128, shuffle=True, num_workers=workers, drop_last=True)
            seqs, start, batches = 0, None, 0
            while batches < args.loader_batches:
                for x, _ in loader:
                    if start is None:  # the first batch pays for starting the workers
                        start = time.perf_counter()
                        continue
                    seqs += x.shape[0] * x.shape[1]
                    batches += 1
                    if batches >= args.loader_batches:
                        break
            seconds = time.perf_counter() - start
            print(f"loader: {seqs / seconds:.0f} sequences/s (M=2, batch 128, {workers} workers)")

        # ---- training step of a small GPT on those codes
        meta = codes.meta
        torch.manual_seed(0)
        cfg = GPTConfig.from_name(
            "GPT-S", vocab_size=meta["vocab_size"], block_size=meta["seq_len"], num_classes=meta["num_classes"]
        )
        model = GPT(cfg).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        x, y = next(iter(DataLoader(codes, batch_size=64, shuffle=True)))  # 64 images x 2 views
        tokens, labels = x.reshape(128, -1).to(device), y.repeat_interleave(2).to(device)

        def step() -> None:
            logits = model(tokens[:, :-1], labels).logits  # (128, T, V): class token + T-1 inputs
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        step()  # warm-up
        start = time.perf_counter()
        for _ in range(args.train_steps):
            step()
        seconds = (time.perf_counter() - start) / args.train_steps
        print(f"training: {128 / seconds:.0f} sequences/s (GPT-S, batch 128, {seconds * 1e3:.0f} ms/step, AdamW)")


if __name__ == "__main__":
    main()
