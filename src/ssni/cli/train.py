"""``ssni train-score`` and ``ssni train-classifier``: train the small shipped networks."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

from ..core.diffusion import VPSchedule
from ..data import dataset_sha256, load_dataset
from ..errors import UsageError
from ..io.weights import load_classifier_file, load_score_model_file, read_metadata, save_weights
from ..nets import build_network
from ..train import (
    checkpoint_path_for,
    denoised_accuracy,
    denoising_error,
    evaluate_classifier,
    train_classifier,
    train_score_model,
)
from .progress import Progress

log = logging.getLogger("ssni.train")

# Per-dataset defaults for the model sizes (28x28: three levels; 8x8: two levels).
UNET_DEFAULTS = {
    "fashion-mnist": dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
                          attn_levels=(2,)),
    "digits": dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_levels=(1,)),
}
CNN_DEFAULTS = {
    "fashion-mnist": dict(width=32, hidden=128, pool=4),
    "digits": dict(width=16, hidden=64, pool=2),
}


def _ints(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,2, got {text!r}") from err


def _floats(text: str) -> List[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip() != ""]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.05,0.1, got {text!r}") from err


def _common(p: argparse.ArgumentParser, default_bs: int, default_lr: float) -> None:
    p.add_argument("--data", choices=["fashion-mnist", "digits"], default="fashion-mnist",
                   help="training data (default: fashion-mnist)")
    p.add_argument("--data-dir", default=None,
                   help="directory with the Fashion-MNIST idx files "
                        "(default: $SSNI_FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--batch-size", type=int, default=default_bs)
    p.add_argument("--lr", type=float, default=default_lr, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output weights file (.safetensors)")
    p.add_argument("--checkpoint-every", type=int, default=200,
                   help="save a resumable checkpoint every N steps beside --out (0: only at end)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the checkpoint beside --out if it exists (default: yes)")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep the checkpoint file after a successful run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bar")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train-score", help="train the epsilon UNet on Fashion-MNIST or digits",
        description="Train a small DDPM-style epsilon UNet on the continuous VP schedule, "
                    "weighting small noise levels (t <= --small-t-max).")
    _common(p, 64, 1e-3)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--small-t-max", type=float, default=0.3)
    p.add_argument("--small-t-prob", type=float, default=0.5,
                   help="fraction of t drawn from U[0, small-t-max] (rest from U[0, 1])")
    p.add_argument("--no-hflip", dest="hflip", action="store_false",
                   help="no random horizontal flips")
    p.add_argument("--base-channels", type=int, default=None)
    p.add_argument("--channel-mults", type=_ints, default=None, help="e.g. 1,2,2")
    p.add_argument("--num-res-blocks", type=int, default=None)
    p.add_argument("--attn-levels", type=_ints, default=None, help="e.g. 2")
    p.add_argument("--dropout", type=float, default=0.0)
    p.set_defaults(func=run_train_score)

    p = subparsers.add_parser(
        "train-classifier", help="train the small CNN classifier and report test accuracy",
        description="Train a small CNN on the train split; prints its accuracy on the full "
                    "test split at the end.")
    _common(p, 128, 2e-3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--dropout", type=float, default=0.25)
    p.set_defaults(func=run_train_classifier)

    p = subparsers.add_parser(
        "eval-classifier", help="accuracy of a classifier weights file on a data split")
    p.add_argument("weights", help="classifier .safetensors file")
    p.add_argument("--data", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.set_defaults(func=run_eval_classifier)

    p = subparsers.add_parser(
        "eval-score", help="held-out quality of a score-model weights file",
        description="Epsilon MSE per noise level on a fixed subset of a data split and, with "
                    "--classifier, accuracy on clean, noised and one-step denoised images.")
    p.add_argument("weights", help="score-model .safetensors file")
    p.add_argument("--classifier", default=None, help="classifier .safetensors file")
    p.add_argument("--data", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--n", type=int, default=1000, help="images (fixed seeded subset)")
    p.add_argument("--t", type=_floats, default=[0.05, 0.1, 0.2],
                   help="noise levels for the denoising accuracy, e.g. 0.05,0.1")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_eval_score)


# --------------------------------------------------------------------------- helpers


def _command_line(args: argparse.Namespace, keys: List[str]) -> str:
    """A canonical command line that reproduces the run (all options spelled out)."""
    parts = ["ssni", args.command]
    for key in keys:
        value = getattr(args, key)
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            if key == "hflip":
                if not value:
                    parts.append("--no-hflip")
            elif value:
                parts.append(flag)
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        parts += [flag, str(value)]
    return shlex.join(parts)


def _prepare(args: argparse.Namespace) -> Path:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UsageError("--out must end in .safetensors")
    return out


def _load(args: argparse.Namespace, split: str):
    try:
        return load_dataset(args.data, split, args.data_dir)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from err


def _data_info(args: argparse.Namespace, split: str, n: int) -> Dict[str, Any]:
    return {"name": args.data, "split": split, "n_images": n,
            "sha256": dataset_sha256(args.data, args.data_dir)}


def _finish(ckpt: Path, keep: bool) -> None:
    if not keep and ckpt.exists():
        ckpt.unlink()


# --------------------------------------------------------------------------- commands


def run_train_score(args: argparse.Namespace) -> int:
    out = _prepare(args)
    quiet = getattr(args, "quiet", False)
    x, _ = _load(args, "train")
    arch_kwargs = dict(UNET_DEFAULTS[args.data])
    for key in ("base_channels", "channel_mults", "num_res_blocks", "attn_levels"):
        if getattr(args, key) is not None:
            arch_kwargs[key] = getattr(args, key)
    arch_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in arch_kwargs.items()}
    arch_kwargs.update(in_channels=int(x.shape[1]), dropout=args.dropout)
    torch.manual_seed(args.seed)
    net = build_network("UNet", arch_kwargs)
    n_params = sum(p.numel() for p in net.parameters())
    data = _data_info(args, "train", int(x.shape[0]))
    schedule = VPSchedule()
    ckpt = checkpoint_path_for(out)
    if not quiet:
        print(f"UNet {arch_kwargs}: {n_params} parameters; {x.shape[0]} {args.data} images; "
              f"checkpoint {ckpt}", file=sys.stderr)
    progress = Progress(args.steps, "train-score", quiet, unit="step")
    try:
        result = train_score_model(
            net, x, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            warmup=args.warmup, ema_decay=args.ema_decay, seed=args.seed, schedule=schedule,
            small_t_max=args.small_t_max, small_t_prob=args.small_t_prob, hflip=args.hflip,
            checkpoint_path=ckpt, checkpoint_every=args.checkpoint_every, resume=args.resume,
            callback=progress.step, config_extra={"arch_kwargs": arch_kwargs, "data": data},
        )
    finally:
        progress.close()
    command = _command_line(args, [
        "data", "data_dir", "steps", "batch_size", "lr", "seed", "ema_decay", "warmup",
        "small_t_max", "small_t_prob", "hflip", "base_channels", "channel_mults",
        "num_res_blocks", "attn_levels", "dropout", "checkpoint_every", "out"])
    from ..core.score import EpsilonNetwork

    model = EpsilonNetwork(result.model, schedule, time_scale=1000.0)
    x_val, _ = _load(args, "val")
    err = denoising_error(model, x_val[:1000])
    save_weights(out, result.model, arch="UNet", arch_kwargs=arch_kwargs, kind="score_model", info={
        "schedule": schedule.config(), "time_scale": 1000.0, "data": data,
        "training": result.config, "steps": result.steps,
        "train_seconds": round(result.seconds, 1), "torch_threads": torch.get_num_threads(),
        "command": command, "val_eps_mse": {str(k): round(v, 5) for k, v in err.items()},
    })
    _finish(ckpt, args.keep_checkpoint)
    print(f"wrote {out} ({result.steps} steps, {result.seconds / 60:.1f} min)")
    print("val eps MSE by t: " + ", ".join(f"t={k:g}: {v:.4f}" for k, v in err.items()))
    return 0


def run_train_classifier(args: argparse.Namespace) -> int:
    out = _prepare(args)
    quiet = getattr(args, "quiet", False)
    x, y = _load(args, "train")
    arch_kwargs = dict(CNN_DEFAULTS[args.data])
    for key in ("width", "hidden"):
        if getattr(args, key) is not None:
            arch_kwargs[key] = getattr(args, key)
    arch_kwargs.update(in_channels=int(x.shape[1]), num_classes=int(y.max()) + 1,
                       dropout=args.dropout)
    torch.manual_seed(args.seed)
    net = build_network("CNN", arch_kwargs)
    data = _data_info(args, "train", int(x.shape[0]))
    ckpt = checkpoint_path_for(out)
    per_epoch = x.shape[0] // args.batch_size
    if not quiet:
        print(f"CNN {arch_kwargs}: {sum(p.numel() for p in net.parameters())} parameters; "
              f"{x.shape[0]} {args.data} images; checkpoint {ckpt}", file=sys.stderr)
    progress = Progress(
        per_epoch * args.epochs, "train-classifier", quiet, unit="step"
    )
    try:
        result = train_classifier(
            net, x, y, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            seed=args.seed, checkpoint_path=ckpt, checkpoint_every=args.checkpoint_every,
            resume=args.resume, callback=progress.step,
            config_extra={"arch_kwargs": arch_kwargs, "data": data},
        )
    finally:
        progress.close()
    x_val, y_val = _load(args, "val")
    x_test, y_test = _load(args, "test")
    val_acc = evaluate_classifier(result.model, x_val, y_val)
    test_acc = evaluate_classifier(result.model, x_test, y_test)
    command = _command_line(args, [
        "data", "data_dir", "epochs", "batch_size", "lr", "seed", "width", "hidden", "dropout",
        "checkpoint_every", "out"])
    save_weights(out, result.model, arch="CNN", arch_kwargs=arch_kwargs, kind="classifier", info={
        "data": data, "training": result.config, "steps": result.steps,
        "train_seconds": round(result.seconds, 1), "torch_threads": torch.get_num_threads(),
        "command": command, "val_accuracy": val_acc,
        "test_accuracy": test_acc, "test_images": int(x_test.shape[0]),
    })
    _finish(ckpt, args.keep_checkpoint)
    print(f"wrote {out} ({result.steps} steps, {result.seconds / 60:.1f} min)")
    print(f"val accuracy {val_acc:.4f} ({x_val.shape[0]} images); "
          f"test accuracy {test_acc:.4f} ({x_test.shape[0]} images)")
    return 0


def run_eval_classifier(args: argparse.Namespace) -> int:
    model = load_classifier_file(args.weights)
    x, y = _load(args, args.split)
    acc = evaluate_classifier(model, x, y)
    print(f"{args.data} {args.split}: accuracy {acc:.4f} ({x.shape[0]} images)")
    return 0



def run_eval_score(args: argparse.Namespace) -> int:
    from ..data import subset

    model = load_score_model_file(args.weights)
    x, y = _load(args, args.split)
    n = min(args.n, x.shape[0])
    x, y = subset(x, y, n, seed=args.seed)
    meta = read_metadata(args.weights)
    print(f"{args.weights}: {meta.get('arch')} {meta.get('parameters')} parameters, "
          f"{meta.get('steps')} steps; {args.data} {args.split}, {n} images")
    err = denoising_error(model, x, seed=args.seed)
    print("eps MSE by t: " + ", ".join(f"t={k:g}: {v:.4f}" for k, v in err.items()))
    if args.classifier:
        clf = load_classifier_file(args.classifier)
        for t in args.t:
            acc = denoised_accuracy(model, clf, x, y, t, seed=args.seed)
            print(f"t={t:g}: accuracy clean {acc['clean']:.4f}, noisy {acc['noisy']:.4f}, "
                  f"one-step denoised {acc['denoised']:.4f}")
    return 0
