"""Training of the small networks that ship with the package (epsilon UNet and CNN classifier).

Library code only: no printing and no device arguments (tensors go where the model is).
Progress is reported through an optional ``callback(info: dict)`` called after every step.

Score model: epsilon-prediction MSE on the continuous VP schedule (:class:`~ssni.VPSchedule`,
default ``beta`` 0.1 to 20), network label ``t * 1000``. Since purification only uses small noise
levels, ``t`` is drawn from ``U[t_min, small_t_max]`` with probability ``small_t_prob`` and from
``U[t_min, 1]`` otherwise. Images are mapped from [0, 1] to [-1, 1]; random horizontal flips are
used for the score model only (on by default).

Checkpoints (``*.ckpt.safetensors``) hold model, EMA and optimizer tensors plus the step and the
training configuration; an interrupted run resumes from the saved step and draws the same batches
as an uninterrupted one (batches and noise come from a generator seeded by ``(seed, step)``).
Final weights are safetensors files whose metadata key ``"ssni"`` is a JSON string with the
architecture and its kwargs, the schedule, data provenance, steps and the command line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .core.diffusion import VPSchedule
from .core.score import EpsilonNetwork
from .eval.streams import seeded_generator
from .io.weights import TIME_SCALE

__all__ = [
    "score_matching_loss",
    "train_score_model",
    "train_classifier",
    "evaluate_classifier",
    "denoising_error",
    "denoised_accuracy",
    "checkpoint_path_for",
    "TrainResult",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
Callback = Optional[Callable[[Dict[str, Any]], None]]



def checkpoint_path_for(out: PathLike) -> Path:
    """Checkpoint kept beside an output: ``name.safetensors`` -> ``name.ckpt.safetensors``."""
    out = Path(out)
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
    return out.with_name(stem + ".ckpt.safetensors")


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The stream of training step ``step`` (negative: the shuffle of epoch ``-1 - step``)."""
    return seeded_generator((int(seed) * 1_000_003 + int(step)) % (2**63), device)


def _lr_at(step: int, steps: int, lr: float, warmup: int, final_frac: float) -> float:
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return lr * (final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- checkpoints


def _flatten_optimizer(opt: torch.optim.Optimizer) -> Dict[str, Tensor]:
    out = {}
    for idx, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                out[f"optim.{idx}.{name}"] = value.detach().clone().contiguous()
            else:
                out[f"optim.{idx}.{name}"] = torch.tensor(float(value))
    return out


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: Dict[str, Tensor]) -> None:
    state: Dict[int, Dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


def _save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    ema: Optional[nn.Module],
    opt: torch.optim.Optimizer,
    step: int,
    elapsed: float,
    config: Dict[str, Any],
    extra: Optional[Dict[str, Tensor]] = None,
) -> None:
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().contiguous() for k, v in ema.state_dict().items()})
    tensors.update(_flatten_optimizer(opt))
    if extra:
        tensors.update(extra)
    meta = {"step": str(step), "elapsed": repr(float(elapsed)), "config": json.dumps(config)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


# May differ on resume: the cosine learning-rate schedule then follows the new total from the
# saved step on (e.g. to shorten a run that is slower than planned).
_RETARGETABLE = ("steps", "epochs")


def _load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    ema: Optional[nn.Module],
    opt: torch.optim.Optimizer,
    config: Dict[str, Any],
) -> Tuple[int, float, Dict[str, Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    saved = json.loads(meta.get("config", "{}"))
    current = json.loads(json.dumps(config))
    for key in _RETARGETABLE:
        saved.pop(key, None)
        current.pop(key, None)
    if saved != current:
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise ValueError(
            f"checkpoint {path} was made with a different configuration (differs in: "
            f"{', '.join(diff)}); delete it or start over without resuming"
        )
    tensors = load_file(str(path))  # CPU; load_state_dict moves values to the parameters
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    _unflatten_optimizer(opt, tensors)
    return int(meta["step"]), float(meta.get("elapsed", "0")), tensors


# --------------------------------------------------------------------------- score model


def score_matching_loss(
    model: EpsilonNetwork,
    x0: Tensor,
    t: Tensor,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Epsilon MSE for ``x0`` ``(B, C, H, W)`` in [-1, 1] at levels ``t`` ``(B,)``."""
    x_t, z = model.schedule.perturb(x0, t, generator=generator)
    return F.mse_loss(model.eps(x_t, t), z)


def _sample_t(
    n: int, gen: torch.Generator, device: torch.device, t_min: float, small_max: float, p: float
) -> Tensor:
    u = torch.rand(n, generator=gen, device=device)
    small = torch.rand(n, generator=gen, device=device) < p
    upper = torch.where(small, torch.full_like(u, small_max), torch.ones_like(u))
    return t_min + u * (upper - t_min)


@dataclass
class TrainResult:
    """What a training function returns.

    ``model`` is the network to ship (the EMA copy for score models), ``steps`` the total number
    of optimizer steps, ``seconds`` the wall time spent over all resumed parts, ``losses`` the
    per-step training losses of this call, ``config`` the training configuration.
    """

    model: nn.Module
    steps: int
    seconds: float
    losses: List[float] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def train_score_model(
    net: nn.Module,
    images: Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 100,
    final_lr_frac: float = 0.1,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    ema_decay: float = 0.999,
    seed: int = 0,
    schedule: Optional[VPSchedule] = None,
    t_min: float = 1e-3,
    small_t_max: float = 0.3,
    small_t_prob: float = 0.5,
    hflip: bool = True,
    checkpoint_path: Optional[PathLike] = None,
    checkpoint_every: int = 0,
    resume: bool = True,
    callback: Callback = None,
    config_extra: Optional[Dict[str, Any]] = None,
) -> TrainResult:
    """Train an epsilon network ``net(x, t * 1000)`` with denoising score matching.

    Args:
        net: the network, already on its device; trained in place.
        images: ``(N, C, H, W)`` training images in [0, 1] (moved to ``net``'s device per batch).
        steps: total optimizer steps (a resumed run continues up to this number).
        batch_size, lr, warmup, final_lr_frac, weight_decay, grad_clip: AdamW with linear
            warm-up then cosine decay to ``final_lr_frac * lr``; gradient-norm clipping.
        ema_decay: decay of the exponential moving average of the weights (with the usual
            ``(1 + step) / (10 + step)`` warm-up).
        seed: seeds weights-independent randomness (batches, t, noise, flips) per step.
        schedule: VP schedule (default ``VPSchedule()``).
        t_min, small_t_max, small_t_prob: ``t ~ U[t_min, small_t_max]`` with probability
            ``small_t_prob``, else ``U[t_min, 1]``.
        hflip: random horizontal flips.
        checkpoint_path: where to keep the resumable checkpoint (``None``: no checkpoints).
        checkpoint_every: save every this many steps (and at the end); 0 saves only at the end.
        resume: continue from ``checkpoint_path`` if it exists (its configuration must match
            except ``steps``, which may be changed to shorten or extend a run; the cosine
            schedule then follows the new total from the saved step on).
        callback: called after each step with ``{"step", "steps", "loss", "lr", "elapsed"}``.
        config_extra: JSON-able entries added to the configuration checked on resume.

    Returns:
        :class:`TrainResult` whose ``model`` is the EMA network (eval mode).
    """
    import copy

    schedule = schedule if schedule is not None else VPSchedule()
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    device = next(net.parameters()).device
    config = {
        "kind": "score_model",
        "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
        "final_lr_frac": final_lr_frac, "weight_decay": weight_decay, "grad_clip": grad_clip,
        "ema_decay": ema_decay, "seed": seed, "schedule": schedule.config(), "t_min": t_min,
        "small_t_max": small_t_max, "small_t_prob": small_t_prob, "hflip": hflip,
        "time_scale": TIME_SCALE, "n_images": int(images.shape[0]),
        **(config_extra or {}),
    }
    model = EpsilonNetwork(net, schedule, time_scale=TIME_SCALE)
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)

    start, elapsed = 0, 0.0
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if ckpt is not None and resume and ckpt.exists():
        start, elapsed, _ = _load_checkpoint(ckpt, model=net, ema=ema, opt=opt, config=config)
        log.info("resuming score-model training from step %d (%s)", start, ckpt)
        if start > steps:
            raise ValueError(f"checkpoint {ckpt} is at step {start}, beyond steps={steps}")

    losses: List[float] = []
    n = images.shape[0]
    net.train()
    t0 = time.perf_counter() - elapsed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 7919 + start)
        for step in range(start, steps):
            gen = _step_generator(seed, step, torch.device("cpu"))
            idx = torch.randint(0, n, (batch_size,), generator=gen)
            x0 = images[idx].to(device=device, dtype=torch.float32) * 2.0 - 1.0
            if hflip:
                flip = torch.rand(batch_size, generator=gen) < 0.5
                x0 = torch.where(flip.to(device)[:, None, None, None], x0.flip(-1), x0)
            t = _sample_t(batch_size, gen, torch.device("cpu"), t_min, small_t_max,
                          small_t_prob).to(device)
            z = torch.randn(x0.shape, generator=gen).to(device)
            cur_lr = _lr_at(step, steps, lr, warmup, final_lr_frac)
            for group in opt.param_groups:
                group["lr"] = cur_lr
            x_t, _ = schedule.perturb(x0, t, noise=z)
            loss = F.mse_loss(model.eps(x_t, t), z)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            opt.step()
            _ema_update(ema, net, min(ema_decay, (1.0 + step) / (10.0 + step)))
            value = float(loss.detach())
            losses.append(value)
            done = step + 1
            if ckpt is not None and (
                (checkpoint_every > 0 and done % checkpoint_every == 0) or done == steps
            ):
                _save_checkpoint(ckpt, model=net, ema=ema, opt=opt, step=done,
                                 elapsed=time.perf_counter() - t0, config=config)
            if callback is not None:
                callback({"step": done, "steps": steps, "loss": value, "lr": cur_lr,
                          "elapsed": time.perf_counter() - t0})
    net.eval()
    return TrainResult(ema, steps, time.perf_counter() - t0, losses, config)


# --------------------------------------------------------------------------- classifier


def train_classifier(
    net: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 2e-3,
    warmup: int = 100,
    final_lr_frac: float = 0.02,
    weight_decay: float = 5e-4,
    seed: int = 0,
    checkpoint_path: Optional[PathLike] = None,
    checkpoint_every: int = 0,
    resume: bool = True,
    callback: Callback = None,
    config_extra: Optional[Dict[str, Any]] = None,
) -> TrainResult:
    """Train a classifier ``net(x in [0, 1]) -> logits`` with cross-entropy.

    Args:
        net: the classifier, already on its device; trained in place.
        images: ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)`` int64.
        epochs, batch_size: each epoch visits a seeded permutation of the data in full batches.
        lr, warmup, final_lr_frac, weight_decay: AdamW, warm-up then cosine decay.
        seed: seeds the per-epoch permutation.
        checkpoint_path, checkpoint_every, resume, callback, config_extra: as in
            :func:`train_score_model` (the callback also gets ``"epoch"``).

    Returns:
        :class:`TrainResult` with the trained ``net`` in eval mode.
    """
    n = images.shape[0]
    per_epoch = n // batch_size
    if per_epoch < 1 or epochs < 1:
        raise ValueError("need epochs >= 1 and at least one full batch of images")
    steps = per_epoch * epochs
    device = next(net.parameters()).device
    config = {
        "kind": "classifier", "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "warmup": warmup, "final_lr_frac": final_lr_frac, "weight_decay": weight_decay,
        "seed": seed, "n_images": int(n), **(config_extra or {}),
    }
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    start, elapsed = 0, 0.0
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if ckpt is not None and resume and ckpt.exists():
        start, elapsed, _ = _load_checkpoint(ckpt, model=net, ema=None, opt=opt, config=config)
        log.info("resuming classifier training from step %d (%s)", start, ckpt)
        if start > steps:
            raise ValueError(f"checkpoint {ckpt} is at step {start}, beyond {steps} steps")

    losses: List[float] = []
    net.train()
    t0 = time.perf_counter() - elapsed
    perm, perm_epoch = None, -1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 7919 + start)
        for step in range(start, steps):
            epoch, pos = divmod(step, per_epoch)
            if epoch != perm_epoch:
                perm = torch.randperm(n, generator=_step_generator(seed, -1 - epoch,
                                                                    torch.device("cpu")))
                perm_epoch = epoch
            idx = perm[pos * batch_size:(pos + 1) * batch_size]
            x = images[idx].to(device=device, dtype=torch.float32)
            y = labels[idx].to(device)
            cur_lr = _lr_at(step, steps, lr, warmup, final_lr_frac)
            for group in opt.param_groups:
                group["lr"] = cur_lr
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            losses.append(value)
            done = step + 1
            if ckpt is not None and (
                (checkpoint_every > 0 and done % checkpoint_every == 0) or done == steps
            ):
                _save_checkpoint(ckpt, model=net, ema=None, opt=opt, step=done,
                                 elapsed=time.perf_counter() - t0, config=config)
            if callback is not None:
                callback({"step": done, "steps": steps, "epoch": epoch + 1, "loss": value,
                          "lr": cur_lr, "elapsed": time.perf_counter() - t0})
    net.eval()
    return TrainResult(net, steps, time.perf_counter() - t0, losses, config)


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int = 500
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (set to eval) on images ``(N, C, H, W)`` in [0, 1]."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device=device, dtype=torch.float32)
        pred = model(x).argmax(dim=1).cpu()
        correct += int((pred == labels[i:i + batch_size]).sum())
    return correct / max(1, images.shape[0])


@torch.no_grad()
def denoising_error(
    model: EpsilonNetwork,
    images: Tensor,
    ts: Tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5),
    *,
    seed: int = 0,
    batch_size: int = 500,
) -> Dict[float, float]:
    """Held-out epsilon MSE per noise level (1.0 means no better than predicting zero).

    ``images`` ``(N, C, H, W)`` in [0, 1]; noise comes from a generator seeded with ``seed``.
    """
    device = next(model.parameters()).device
    gen = seeded_generator(seed)
    out = {}
    for t_val in ts:
        total, count = 0.0, 0
        for i in range(0, images.shape[0], batch_size):
            x0 = images[i:i + batch_size].to(device=device, dtype=torch.float32) * 2.0 - 1.0
            z = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.full((x0.shape[0],), float(t_val), device=device)
            x_t, _ = model.schedule.perturb(x0, t, noise=z)
            total += float(((model.eps(x_t, t) - z) ** 2).sum())
            count += z.numel()
        out[float(t_val)] = total / count
    return out


@torch.no_grad()
def denoised_accuracy(
    model: EpsilonNetwork,
    classifier: nn.Module,
    images: Tensor,
    labels: Tensor,
    t: float = 0.1,
    *,
    seed: int = 0,
    batch_size: int = 500,
) -> Dict[str, float]:
    """Classifier accuracy on clean, noised and one-step (Tweedie) denoised images.

    Each image ``(N, C, H, W)`` in [0, 1] is diffused to level ``t`` (noise from a generator
    seeded with ``seed``); ``x0_hat = (x_t - sigma(t) eps(x_t, t)) / sqrt(alpha_bar(t))`` is
    the one-step estimate. A useful score model gives ``denoised`` well above ``noisy``.

    Returns:
        ``{"clean", "noisy", "denoised"}`` accuracies in [0, 1].
    """
    classifier.eval()
    device = next(model.parameters()).device
    gen = seeded_generator(seed)
    hits = {"clean": 0, "noisy": 0, "denoised": 0}
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device=device, dtype=torch.float32)
        y = labels[i:i + batch_size].to(device)
        z = torch.randn(x.shape, generator=gen).to(device)
        tt = torch.full((x.shape[0],), float(t), device=device)
        x_t, _ = model.schedule.perturb(2.0 * x - 1.0, tt, noise=z)
        a = model.schedule.alpha_bar(tt)[:, None, None, None]
        x0_hat = (x_t - (1.0 - a).sqrt() * model.eps(x_t, tt)) / a.sqrt()
        for key, img in (("clean", x), ("noisy", (x_t + 1.0) / 2.0),
                         ("denoised", (x0_hat + 1.0) / 2.0)):
            pred = classifier(img.clamp(0.0, 1.0)).argmax(dim=1)
            hits[key] += int((pred == y).sum())
    return {k: v / max(1, images.shape[0]) for k, v in hits.items()}
