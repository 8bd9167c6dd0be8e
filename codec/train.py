"""Train the RNN-Conv codec on a folder of grayscale PNGs; resumable from checkpoints.

    python -m codec.train IMAGES RUN_DIR [--resume] [--minutes M] [--no-pooling] ...

Images are held in memory as float32 (the NIH train split: 453 images, 1.9 GB) and sampled as random
crops with random flips. Three losses: Toderici's ``l1`` (mean absolute residual after every
iteration, summed over iterations) and ``log-mse`` (the mean over iterations of 10 log10 MSE, i.e.
minus the mean PSNR), which weighs each iteration equally and, unlike L1, weighs a large error
(burned-in text, lead markers, collimator edges) by its size, as PSNR and SSIM do.
``log-mse+ms-ssim`` averages that with the mean over iterations of 10 log10 (1 - MS-SSIM), the
metric the archive is judged on (codec/ssim_loss.py; four scales fit a 128x128 crop).
``--block-stop-fraction`` trains that share of each batch as the adaptive encoder codes
(codec/block_stops.py): 16x16 blocks stop refining once good enough, at a threshold drawn per
crop, so the decoder learns that a neighbour's all-zero code means "stopped", not "no change".
``--hard-fraction`` draws that share of each batch around such sharp edges, which are under 1% of
a radiograph but held most of the squared error of the L1-trained models. ``--half-fraction`` draws
that share at twice the crop size and halves it by 2x2 means, as the encoder halves a tile it codes
at half resolution (codec/resolution.py): at 0.125-0.25 bpp most tiles are coded that way, and a
halved radiograph holds twice the detail per pixel that a full-resolution crop does. A checkpoint
(model, optimiser, step, RNG states) is written atomically every few minutes and at the end, so a
killed run loses at most those minutes. ``--compile`` and ``--bf16`` (torch.compile, bfloat16
autocast) change only how fast the training pass runs: together 1.8x the steps per second on
one thread of this project's CPUs, each step buying what a float32 one does (docs/codec.md,
stop 19).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from codec.block_stops import block_stop_rule
from codec.io import ImageError, read_png
from codec.model import (
    MAX_PRIMING_STEPS,
    ModelConfig,
    RNNConvCodec,
    StopRule,
    count_parameters,
)
from codec.resolution import FACTOR, halve
from codec.ssim_loss import ms_ssim, scales_that_fit


@dataclass(frozen=True)
class TrainConfig:
    crop: int = 128
    batch: int = 8
    iterations: int = 10
    learning_rate: float = 5e-4
    seed: int = 0
    checkpoint_minutes: float = 5.0
    snapshot_every_steps: int = 2000
    loss: str = "l1"
    hard_fraction: float = 0.0
    block_stop_fraction: float = 0.0
    half_fraction: float = 0.0
    #: The training pass under bfloat16 autocast (weights, optimiser and loss stay float32).
    bf16: bool = False


LOSSES = ("l1", "log-mse", "log-mse+ms-ssim")
EDGE_BLOCK = 16
EDGE_STEP = 0.25  # a jump of a quarter of full scale between neighbours: text, markers, edges
#: Thresholds drawn for crops trained with block stops: the range bpp targets of 0.1-0.6 use.
BLOCK_STOP_THRESHOLDS_DB = (10.0, 22.0)


def training_stop_rule(batch: torch.Tensor, fraction: float) -> StopRule | None:
    """Block stops for the first ``fraction`` of ``batch``, each crop at its own threshold
    drawn from :data:`BLOCK_STOP_THRESHOLDS_DB`; the other crops refine every block."""
    stopped = round(batch.shape[0] * fraction)
    if not stopped:
        return None
    low, high = BLOCK_STOP_THRESHOLDS_DB
    thresholds = torch.full((batch.shape[0], 1, 1, 1), math.inf, device=batch.device)
    thresholds[:stopped] = low + (high - low) * torch.rand(stopped, 1, 1, 1, device=batch.device)
    return block_stop_rule(thresholds, torch.ones_like(batch))


def load_images(folder: Path) -> list[np.ndarray]:
    """Every readable PNG under ``folder`` as float32 in [-0.5, 0.5]."""
    images = []
    for path in sorted(folder.rglob("*.png")):
        try:
            image = read_png(path)
        except ImageError as error:
            print(f"skipping {error}")
            continue
        images.append((image.pixels.astype(np.float32) / image.peak - 0.5).astype(np.float32))
    if not images:
        raise SystemExit(f"no readable PNG images under {folder}")
    return images


def edge_blocks(image: np.ndarray) -> np.ndarray:
    """Top-left corners ``(k, 2)`` of the 16x16 blocks holding a jump of at least
    :data:`EDGE_STEP` between horizontal or vertical neighbours."""
    rows, cols = image.shape[0] // EDGE_BLOCK, image.shape[1] // EDGE_BLOCK
    jumps = np.zeros((rows * EDGE_BLOCK, cols * EDGE_BLOCK), dtype=bool)
    view = image[: rows * EDGE_BLOCK, : cols * EDGE_BLOCK]
    jumps[:, 1:] |= np.abs(np.diff(view, axis=1)) >= EDGE_STEP
    jumps[1:, :] |= np.abs(np.diff(view, axis=0)) >= EDGE_STEP
    found = jumps.reshape(rows, EDGE_BLOCK, cols, EDGE_BLOCK).any(axis=(1, 3))
    return np.argwhere(found).astype(np.int32) * EDGE_BLOCK


def sample_batch(
    images: list[np.ndarray],
    crop: int,
    batch: int,
    rng: np.random.Generator,
    hard_fraction: float = 0.0,
    edges: list[np.ndarray] | None = None,
    half_fraction: float = 0.0,
) -> torch.Tensor:
    """Random crops with random flips; ``hard_fraction`` of them (the first) placed over an
    edge block, ``half_fraction`` of them (the last) cut at twice the size and halved."""
    crops = np.empty((batch, 1, crop, crop), dtype=np.float32)
    with_edges = [i for i, found in enumerate(edges or []) if len(found)]
    hard = round(batch * hard_fraction) if with_edges else 0
    first_half = batch - round(batch * half_fraction)
    for i in range(batch):
        size = crop * FACTOR if i >= first_half else crop
        if i < hard:
            index = with_edges[rng.integers(len(with_edges))]
            image = images[index]
            y, x = edges[index][rng.integers(len(edges[index]))]  # type: ignore[index]
            top = int(np.clip(y - rng.integers(size - EDGE_BLOCK + 1), 0, image.shape[0] - size))
            left = int(np.clip(x - rng.integers(size - EDGE_BLOCK + 1), 0, image.shape[1] - size))
        else:
            image = images[rng.integers(len(images))]
            top = rng.integers(image.shape[0] - size + 1)
            left = rng.integers(image.shape[1] - size + 1)
        patch = image[top : top + size, left : left + size]
        if size != crop:
            patch = halve(patch)
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        if rng.random() < 0.5:
            patch = patch[::-1, :]
        crops[i, 0] = patch
    return torch.from_numpy(crops)


def training_loss(
    batch: torch.Tensor, reconstructions: list[torch.Tensor], loss: str
) -> torch.Tensor:
    """The loss named by :data:`LOSSES` over every iteration's reconstruction."""
    if loss == "l1":
        return torch.stack([(batch - r).abs().mean() for r in reconstructions]).sum()
    mse = torch.stack([((batch - r) ** 2).mean() for r in reconstructions])
    log_mse = (10 * torch.log10(mse + 1e-10)).mean()
    if loss == "log-mse":
        return log_mse
    # Both halves in dB, so a 10% smaller MSE and a 10% smaller 1 - MS-SSIM weigh the same.
    scales = scales_that_fit(min(batch.shape[-2:]))
    original = batch + 0.5  # back to [0, 1]: SSIM's luminance term is not shift-invariant
    dissimilarity = torch.stack(
        [1 - ms_ssim(original, r + 0.5, scales=scales).mean() for r in reconstructions]
    )
    return (log_mse + (10 * torch.log10(dissimilarity + 1e-10)).mean()) / 2


def psnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR on the normalised [-0.5, 0.5] scale (peak 1), clipped like real decoded pixels."""
    mse = float(((x - y.clamp(-0.5, 0.5)) ** 2).mean())
    return 10 * math.log10(1 / max(mse, 1e-12))


def save_atomic(payload: dict[str, object], path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def train(
    images_dir: Path,
    run_dir: Path,
    model_config: ModelConfig,
    config: TrainConfig,
    minutes: float,
    resume: bool,
    init_from: Path | None = None,
    until_step: int | None = None,
    compiled: bool = False,
) -> None:
    """Train for ``minutes`` or until the step count reaches ``until_step``, whichever comes
    first; ``resume`` continues RUN_DIR's checkpoint, ``init_from`` starts a new run from another
    run's checkpoint (a fine-tune that may change only the priming). ``compiled`` runs the
    training pass through ``torch.compile``: the same weights and checkpoints, about 20% more
    steps per second on one CPU thread after a warm-up of two to three minutes (docs/codec.md)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / "checkpoint.pt"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    random.seed(config.seed)

    model = RNNConvCodec(model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    step = 0
    if resume and checkpoint_path.exists():
        step = _load_checkpoint(checkpoint_path, model, optimizer, rng, config, device, "resumed")
    elif checkpoint_path.exists():
        raise SystemExit(f"{checkpoint_path} exists: pass --resume or choose another RUN_DIR")
    elif init_from is not None:
        step = _load_checkpoint(init_from, model, optimizer, rng, config, device, "started from")
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate

    images = load_images(images_dir)
    edges = [edge_blocks(image) for image in images] if config.hard_fraction else None
    print(
        f"{len(images)} images, {count_parameters(model):,} parameters, device {device}, "
        f"{torch.get_num_threads()} threads"
        + (", compiled training pass" if compiled else "")
        + (", bfloat16 autocast" if config.bf16 else "")
    )

    def save_checkpoint() -> None:
        save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "model_config": model_config.to_dict(),
                "train_config": config.__dict__,
                "numpy_rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
            },
            checkpoint_path,
        )

    log = (run_dir / "log.jsonl").open("a")
    stop = _stop_on_signals()
    started = last_checkpoint = time.monotonic()
    bits_per_iteration = model_config.bits / 256
    model.train()
    # The compiled module shares the model's parameters: checkpoints stay the plain model's.
    training_pass = torch.compile(model) if compiled else model

    def should_continue() -> bool:
        in_time = time.monotonic() - started < minutes * 60
        return in_time and not stop.is_set() and (until_step is None or step < until_step)

    while should_continue():
        batch = sample_batch(
            images,
            config.crop,
            config.batch,
            rng,
            config.hard_fraction,
            edges,
            config.half_fraction,
        ).to(device)
        stop_rule = training_stop_rule(batch, config.block_stop_fraction)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            reconstructions = training_pass(batch, config.iterations, stop_rule)
        loss = training_loss(batch, reconstructions, config.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 50 == 0:
            psnrs = [round(psnr_db(batch, r.detach()), 2) for r in reconstructions]
            record = {
                "step": step,
                "seconds": round(time.monotonic() - started, 1),
                "loss": round(float(loss.detach()), 5),
                "bpp_raw": [round(bits_per_iteration * (k + 1), 4) for k in (0, 1, 3, 7)],
                "psnr": psnrs,
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(record, flush=True)
        if step % config.snapshot_every_steps == 0:
            save_checkpoint()
            (run_dir / f"checkpoint_step{step}.pt").write_bytes(checkpoint_path.read_bytes())
        if time.monotonic() - last_checkpoint > config.checkpoint_minutes * 60:
            save_checkpoint()
            last_checkpoint = time.monotonic()
    save_checkpoint()
    print(f"stopped at step {step}; checkpoint {checkpoint_path}")


def _load_checkpoint(
    path: Path,
    model: RNNConvCodec,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    config: TrainConfig,
    device: torch.device,
    verb: str,
) -> int:
    """Load weights, optimiser and RNG states from ``path`` into the run; its step.

    A checkpoint of another run (``--init-from``) may differ from the model in its priming
    only: priming adds recurrent passes, not parameters, so the weights carry over as they are.
    """
    checkpoint = torch.load(path, map_location=device, weights_only=False)
    saved = ModelConfig.from_dict(checkpoint["model_config"])
    if dataclasses.replace(saved, priming_steps=model.config.priming_steps) != model.config:
        raise SystemExit(f"{path} holds a different architecture than this run's: {saved}")
    if verb == "resumed" and saved != model.config:
        raise SystemExit(
            f"--resume with --priming-steps {model.config.priming_steps}, but {path} was "
            f"trained with {saved.priming_steps}: start a new RUN_DIR with --init-from"
        )
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    rng.bit_generator.state = checkpoint["numpy_rng"]
    torch.set_rng_state(checkpoint["torch_rng"])
    step = int(checkpoint["step"])
    print(f"{verb} {path} at step {step}")
    if saved.priming_steps != model.config.priming_steps:
        print(f"note: priming steps {saved.priming_steps} -> {model.config.priming_steps}")
    _say_if_recipe_changed(checkpoint.get("train_config", {}), config)
    return step


def _say_if_recipe_changed(saved: dict[str, object], config: TrainConfig) -> None:
    """Resuming with other loss flags than the checkpoint's is allowed (it is how a fine-tune
    starts) but should never happen unnoticed."""
    before = (
        saved.get("loss", "l1"),
        saved.get("hard_fraction", 0.0),
        saved.get("block_stop_fraction", 0.0),
        saved.get("half_fraction", 0.0),
    )
    now = (config.loss, config.hard_fraction, config.block_stop_fraction, config.half_fraction)
    if before != now:
        flags = ("--loss", "--hard-fraction", "--block-stop-fraction", "--half-fraction")
        print(
            "note: the checkpoint was trained with "
            + " ".join(f"{flag} {value}" for flag, value in zip(flags, before, strict=True))
            + "; continuing with "
            + " ".join(f"{flag} {value}" for flag, value in zip(flags, now, strict=True))
        )


def _stop_on_signals() -> threading.Event:
    """SIGTERM or Ctrl-C end training after the current step, with a checkpoint: a session
    that must stop loses nothing."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        print(f"signal {signum}: stopping after this step", flush=True)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
    return stop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path, help="folder of training PNGs (8- or 16-bit)")
    parser.add_argument("run_dir", type=Path, help="where checkpoints and log.jsonl go")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR")
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget")
    parser.add_argument("--no-pooling", action="store_true", help="Toderici-style encoder")
    parser.add_argument("--bits", type=int, default=32, help="bits per 16x16 block per iteration")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss", choices=LOSSES, default="l1", help="see the module docstring")
    parser.add_argument(
        "--hard-fraction",
        type=float,
        default=0.0,
        help="share of each batch cropped around sharp edges (0-1)",
    )
    parser.add_argument(
        "--block-stop-fraction",
        type=float,
        default=0.0,
        help="share of each batch trained with adaptive block stops (0-1)",
    )
    parser.add_argument(
        "--half-fraction",
        type=float,
        default=0.0,
        help="share of each batch cut at twice --crop and halved like half-resolution tiles (0-1)",
    )
    parser.add_argument(
        "--priming-steps",
        type=int,
        default=0,
        help="extra encoder and decoder passes on the first iteration (hidden-state priming)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        help="start a new RUN_DIR from another run's checkpoint (weights, optimiser, step); "
        "its architecture must match but for --priming-steps",
    )
    parser.add_argument(
        "--until-step",
        type=int,
        help="also stop once the step count reaches this (to match another run's steps)",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="run the training pass under bfloat16 autocast (fast on CPUs with AMX or "
        "AVX512-BF16 and on GPUs; weights and loss stay float32)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the training pass through torch.compile (needs a C++ compiler; faster after "
        "a few minutes' warm-up, same checkpoints)",
    )
    args = parser.parse_args(argv)
    if args.until_step is not None and args.until_step < 1:
        parser.error(f"--until-step must be a positive step count, got {args.until_step}")
    for flag in ("hard_fraction", "block_stop_fraction", "half_fraction"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            name = "--" + flag.replace("_", "-")
            parser.error(f"{name} must be in 0..1, got {getattr(args, flag)}")
    if not 0 <= args.priming_steps <= MAX_PRIMING_STEPS:
        parser.error(f"--priming-steps must be in 0..{MAX_PRIMING_STEPS}, got {args.priming_steps}")
    if args.init_from is not None and not args.init_from.is_file():
        parser.error(f"--init-from {args.init_from}: no such checkpoint file")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_config = ModelConfig(
        bits=args.bits,
        multi_level_pooling=not args.no_pooling,
        max_iterations=max(16, args.iterations),
        priming_steps=args.priming_steps,
    )
    train_config = TrainConfig(
        crop=args.crop,
        batch=args.batch,
        iterations=args.iterations,
        learning_rate=args.lr,
        seed=args.seed,
        loss=args.loss,
        hard_fraction=args.hard_fraction,
        block_stop_fraction=args.block_stop_fraction,
        half_fraction=args.half_fraction,
        bf16=args.bf16,
    )
    train(
        args.images,
        args.run_dir,
        model_config,
        train_config,
        args.minutes,
        args.resume,
        args.init_from,
        args.until_step,
        args.compile,
    )


if __name__ == "__main__":
    main()
