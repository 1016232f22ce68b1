"""From a :class:`~ssni.cli.config.RunConfig` to data, models, purifier, policy, defense and attack.

The only place (with the CLI) that reads configuration and moves models to ``config.device``.

Models: for Fashion-MNIST the shipped weights ``fmnist_unet.safetensors`` and
``fmnist_cnn.safetensors`` (names ``fmnist-unet`` / ``fmnist-cnn``) are found in ``./weights``
first, then inside the package (``ssni/weights``, :func:`ssni.io.weights.find_weights`); an
explicit ``score_model_path`` / ``classifier_path`` always wins. The name ``file`` loads any
weights file written by ``ssni train-*``. CIFAR-10 and ImageNet models are entries of
:mod:`ssni.io.zoo` and need their local checkpoint files.

Data: ``split`` picks the evaluation images, ``stats_split`` the clean images of the score-norm
statistics; calibration uses the validation split only (:func:`heldout_images`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..attacks.target import AttackTarget
from ..core.defense import Defense
from ..core.learned import LearnedPolicy
from ..core.policies import REWEIGHT, SSNI, Constant, NoiseLevelPolicy
from ..core.purifiers import DiffPure, Purifier
from ..core.score import ScoreModel
from ..eval.streams import seeded_generator
from ..io.weights import SHIPPED_WEIGHTS, find_weights
from .config import ConfigError, RunConfig

__all__ = [
    "LOCAL_MODELS",
    "DEFAULT_MODELS",
    "find_weights",
    "load_images",
    "eval_images",
    "heldout_images",
    "build_score_model",
    "build_classifier",
    "build_purifier",
    "build_policy",
    "resolve_policy_file",
    "build_defense",
    "build_attack",
    "AttackSetup",
    "Components",
    "build_components",
    "seeded_generator",
]

log = logging.getLogger(__name__)

#: Weights shipped inside the package: name -> (file name, kind).
LOCAL_MODELS = SHIPPED_WEIGHTS
#: Default (score model, classifier) per dataset.
DEFAULT_MODELS: Dict[str, Tuple[str, str]] = {
    "fashion-mnist": ("fmnist-unet", "fmnist-cnn"),
    "digits": ("file", "file"),
    "cifar10": ("cifar10-ddpmpp", "cifar10-wrn-28-10"),
    "imagenet": ("imagenet-guided-256-uncond", "imagenet-resnet50"),
}


# ----------------------------------------------------------------------------- data


def _imagenet(cfg: RunConfig, split: str, n: int, seed: int) -> Tuple[Tensor, Tensor]:
    """ImageNet at ``image_size`` (Resize 256, CenterCrop): ``test`` images are the paper's
    seeded subset of the validation folder; ``train`` images a seeded subset of ``train_dir``
    (the reference's clean statistics: 5000 training images, seed 0); ``val`` (held-out)
    images the second half of a seeded permutation of the validation folder."""
    import numpy as np

    from ..data.imagenet import list_image_folder, load_image, load_imagenet_val

    size = cfg.image_size or 256
    if split == "train":
        if not cfg.train_dir:
            raise ConfigError(
                "train_dir", "ImageNet statistics from 'train' need the training folder"
            )
        return load_imagenet_val(cfg.train_dir, n=n, seed=seed, size=size)
    if not cfg.data_dir:
        raise ConfigError("data_dir", "ImageNet needs the validation folder (one dir per class)")
    if split == "test":
        return load_imagenet_val(cfg.data_dir, n=n, seed=seed, size=size)
    samples, _ = list_image_folder(cfg.data_dir)
    perm = np.random.RandomState(seed).permutation(len(samples))
    pool = perm[len(samples) // 2 :]
    if n > pool.size:
        raise ConfigError("stats_n", f"only {pool.size} held-out ImageNet images available")
    chosen = pool[:n]
    x = torch.stack([load_image(samples[i][0], size) for i in chosen])
    y = torch.tensor([samples[i][1] for i in chosen], dtype=torch.int64)
    return x, y


def load_images(
    cfg: RunConfig, split: str, n: int, seed: int, key: str = "n"
) -> Tuple[Tensor, Tensor]:
    """A fixed seeded subset of ``n`` images of ``split`` (``train``/``val``/``test``) of the
    configured dataset (:func:`ssni.data.sample_split`); ``key`` is the configuration key that
    asked for ``n`` (named in the error when the split is too small)."""
    from ..data import dataset_entry, sample_split

    if cfg.dataset == "imagenet":  # image_size, train_dir: the paper's ImageNet protocol
        return _imagenet(cfg, split, n, seed)

    if dataset_entry(cfg.dataset).needs_root and not cfg.data_dir:
        raise ConfigError("data_dir", f"{cfg.dataset} needs the folder of its files")
    try:
        return sample_split(cfg.dataset, split, n, seed, cfg.data_dir or None)
    except ValueError as err:
        raise ConfigError(key, str(err).splitlines()[0]) from None


def eval_images(cfg: RunConfig) -> Tuple[Tensor, Tensor]:
    """The evaluation images: ``n`` images of ``split`` drawn with ``subset_seed``."""
    return load_images(cfg, cfg.split, cfg.n, cfg.subset_seed)


def heldout_images(
    cfg: RunConfig, n: int, split: Optional[str] = None, key: str = "stats_n"
) -> Tuple[Tensor, Tensor]:
    """``n`` held-out clean images (default ``stats_split``); never the test split."""
    split = split or cfg.stats_split
    if split == "test":
        raise ConfigError("stats_split", "clean statistics must not come from the test split")
    return load_images(cfg, split, n, cfg.subset_seed, key)


# ----------------------------------------------------------------------------- models


def _load_local(name: str, path: str, kind: str, key: str):
    from ..io import weights

    if not path:
        if name not in LOCAL_MODELS:
            raise ConfigError(key, f"'{name}' needs an explicit {key}")
        try:
            path = str(find_weights(LOCAL_MODELS[name][0]))
        except FileNotFoundError as err:
            raise ConfigError(key, str(err)) from None
    if Path(path).is_dir():
        raise ConfigError(key, f"{path!r} is a folder, not a weights file")
    if not Path(path).is_file():
        raise ConfigError(key, f"no such file {path!r}")
    load = weights.load_score_model_file if kind == "score_model" else weights.load_classifier_file
    try:
        return load(path)
    except weights.WeightFileError as err:
        raise ConfigError(key, str(err)) from None


def check_device(cfg: RunConfig) -> None:
    """ConfigError when ``device`` is not available on this machine."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{cfg.device} is not available here; use --set device=cpu")
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", "mps is not available here; use --set device=cpu")


def _require_path(path: str, key: str, source: str) -> None:
    if not Path(path).exists():
        raise ConfigError(key, f"no such file {path!r}; get it from {' '.join(source.split())}")


def build_score_model(cfg: RunConfig) -> ScoreModel:
    """The score model named by ``score_model`` (dataset default if empty), on ``device``."""
    check_device(cfg)
    name = cfg.score_model or DEFAULT_MODELS[cfg.dataset][0]
    if name in LOCAL_MODELS or name == "file":
        model = _load_local(name, cfg.score_model_path, "score_model", "score_model_path")
    else:
        from ..io import zoo

        if name not in zoo.SCORE_MODELS:
            known = ", ".join(sorted([*zoo.SCORE_MODELS, *LOCAL_MODELS, "file"]))
            raise ConfigError("score_model", f"unknown score model {name!r}; known: {known}")
        if not cfg.score_model_path:
            entry = zoo.SCORE_MODELS[name]
            raise ConfigError(
                "score_model_path", f"{name} needs its local checkpoint ({entry.file})"
            )
        _require_path(cfg.score_model_path, "score_model_path", zoo.SCORE_MODELS[name].source)
        model = zoo.load_score_model(name, cfg.score_model_path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if hasattr(model, "accelerate"):
        model.accelerate = cfg.accelerate  # ignored on CPU
    return model.to(cfg.device)


def build_classifier(cfg: RunConfig) -> nn.Module:
    """The classifier named by ``classifier`` (dataset default if empty), on ``device``."""
    name = cfg.classifier or DEFAULT_MODELS[cfg.dataset][1]
    if name in LOCAL_MODELS or name == "file":
        model = _load_local(name, cfg.classifier_path, "classifier", "classifier_path")
    else:
        from ..io import zoo

        if name not in zoo.CLASSIFIERS:
            known = ", ".join(sorted([*zoo.CLASSIFIERS, *LOCAL_MODELS, "file"]))
            raise ConfigError("classifier", f"unknown classifier {name!r}; known: {known}")
        if not cfg.classifier_path:
            entry = zoo.CLASSIFIERS[name]
            raise ConfigError("classifier_path", f"{name} needs its local weights ({entry.file})")
        _require_path(cfg.classifier_path, "classifier_path", zoo.CLASSIFIERS[name].source)
        model = zoo.load_classifier(name, cfg.classifier_path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(cfg.device)


def build_purifier(cfg: RunConfig, model: ScoreModel, *, surrogate: bool = False) -> Purifier:
    """The configured purifier; ``surrogate=True`` gives the cheap copy used for attack
    gradients (``surrogate_steps`` reverse steps per sample / per stage). With ``purify_size``
    it runs at that size (bilinear resize there and back, DiffPure's ImageNet path)."""
    purifier = _purifier(cfg, model, surrogate)
    if cfg.purify_size:
        from ..io.adapters import ResizedPurifier

        purifier = ResizedPurifier(purifier, cfg.purify_size)
    return purifier


def _purifier(cfg: RunConfig, model: ScoreModel, surrogate: bool) -> Purifier:
    steps = cfg.surrogate_steps if surrogate else (cfg.purify_steps or None)
    if cfg.purifier == "diffpure":
        return DiffPure(model, rule=cfg.rule, reverse_steps=steps)
    if cfg.purifier == "gdmp":
        from ..core.gdmp import GDMP

        return GDMP(
            model,
            scale=cfg.gdmp_scale,
            distance=cfg.gdmp_distance,
            rounds=cfg.gdmp_rounds,
            rule=cfg.rule,
            reverse_steps=steps,
        )
    from ..core.gns import GNS, GNS_CIFAR10_STAGES, GNS_CIFAR10_SURROGATE_STEPS

    if surrogate:
        if tuple(cfg.gns_stages) == GNS_CIFAR10_STAGES and cfg.t_star == max(GNS_CIFAR10_STAGES):
            published = sum(GNS_CIFAR10_SURROGATE_STEPS)
            if cfg.surrogate_steps != published:
                raise ConfigError(
                    "surrogate_steps",
                    f"the published GNS surrogate takes {published} steps (1, 1, 5 over stages "
                    f"30, 50, 125), got {cfg.surrogate_steps}; set surrogate_steps={published} "
                    "or change gns_stages",
                )
            return GNS.surrogate(model, rule=cfg.rule)
        per_stage = max(1, cfg.surrogate_steps // len(cfg.gns_stages))
        return GNS(
            model,
            stages=cfg.gns_stages,
            reference_t=cfg.t_star,
            reverse_steps=per_stage,
            rule=cfg.rule,
        )
    return GNS(
        model, stages=cfg.gns_stages, reference_t=cfg.t_star, reverse_steps=steps, rule=cfg.rule
    )


def _score_model(purifier: Purifier) -> ScoreModel:
    """The score model of a purifier, looking through wrappers (``ResizedPurifier``)."""
    while not hasattr(purifier, "model") and hasattr(purifier, "purifier"):
        purifier = purifier.purifier
    return purifier.model


def resolve_policy_file(path: str) -> Path:
    """``path`` as given if it exists; else, for ``weights/<name>`` (how presets name shipped
    policy files), the file found by :func:`~ssni.io.weights.find_weights` (the package's copy)."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and len(p.parts) == 2 and p.parts[0] == "weights":
        try:
            return find_weights(p.name)
        except FileNotFoundError:
            pass
    return p


def build_policy(
    cfg: RunConfig,
    model: ScoreModel,
    *,
    stats_images: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    progress: Optional[Callable[[int], None]] = None,
    fit: bool = True,
) -> NoiseLevelPolicy:
    """The noise-level policy: from ``policy_file`` if set, else ``Constant(t_star)`` or an SSNI
    policy fitted on ``stats_images`` (default: ``stats_n`` images of ``stats_split``);
    ``progress`` is called with the number of images done after each batch of the fit.
    ``fit=False`` leaves a new SSNI policy unfitted (its statistics come from elsewhere)."""
    if cfg.policy_file:
        from ..eval.calibrate import load_policy

        try:
            policy = load_policy(resolve_policy_file(cfg.policy_file), model)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError("policy_file", str(err).splitlines()[0]) from None
        return policy.to(cfg.device)
    if cfg.policy == "constant":
        return Constant(cfg.t_star)
    if cfg.policy == "ssni-learned":
        raise ConfigError(
            "policy_file", "policy ssni-learned needs a trained policy file (ssni train-policy)"
        )
    policy = SSNI(
        model,
        t_star=cfg.t_star,
        reweight=REWEIGHT[cfg.policy],
        tau=cfg.tau or None,
        bias=cfg.bias,
        probe_levels=cfg.levels,
        batch_joined=cfg.batch_joined,
        probe_size=cfg.purify_size or None,  # the probe sees what the score model takes
    ).to(cfg.device)
    if not fit:
        return policy
    if stats_images is None:
        stats_images, _ = heldout_images(cfg, cfg.stats_n)
    bs = cfg.batch_size

    def batches():
        for i in range(0, stats_images.shape[0], bs):
            xb = stats_images[i : i + bs].to(cfg.device)
            yield xb
            if progress is not None:
                progress(xb.shape[0])

    policy.fit(batches(), generator=generator)
    return policy


def policy_overrides(cfg: RunConfig) -> Dict[str, Any]:
    """Configuration values implied by ``policy_file`` (so the resolved config is truthful)."""
    if not cfg.policy_file:
        return {}
    from ..eval.calibrate import read_policy_file

    try:
        doc = read_policy_file(resolve_policy_file(cfg.policy_file))
    except (OSError, ValueError) as err:
        raise ConfigError("policy_file", str(err).splitlines()[0]) from None
    out: Dict[str, Any] = {"policy": doc["policy"], "t_star": float(doc["t_star"])}
    if doc["policy"] == "ssni-learned":
        out.update(bias=float(doc.get("bias", 0.0)), levels=int(doc["levels"]))
    elif doc["policy"] != "constant":
        out.update(
            tau=float(doc.get("tau") or 0.0),
            bias=float(doc.get("bias", 0.0)),
            levels=int(doc.get("levels", cfg.levels)),
            batch_joined=bool(doc.get("batch_joined", False)),
        )
    return out


def build_defense(
    cfg: RunConfig, model: ScoreModel, classifier: nn.Module, policy: NoiseLevelPolicy
) -> Defense:
    """``classifier(purifier(x, policy(x)))`` with the configured purifier."""
    return Defense(classifier, build_purifier(cfg, model), policy)


@dataclass
class AttackSetup:
    """An attack and its target: called as ``attack(target.gradient, x, y, generator)``,
    judged on ``target.judged`` (the defense)."""

    attack: Any
    target: AttackTarget
    description: str


def build_attack(
    cfg: RunConfig,
    defense: Defense,
    *,
    iterations: Optional[int] = None,
    eot: Optional[int] = None,
) -> AttackSetup:
    """The configured attack against ``defense``; ``iterations``/``eot`` override the
    configuration (cheap attacks)."""
    from .. import attacks

    steps = cfg.iterations if iterations is None else iterations
    n_eot = cfg.eot if eot is None else eot
    threat = attacks.ThreatModel("Linf" if cfg.norm == "linf" else "L2", cfg.eps)
    gradient_model: nn.Module = defense
    adaptive = cfg.adaptive_t and isinstance(defense.policy, (SSNI, LearnedPolicy))
    eot_opts = dict(
        batched=cfg.eot_batched,
        max_batch=cfg.eot_max_batch or None,
        share_levels=cfg.eot_share_t,
        autocast=torch.bfloat16 if cfg.attack_autocast == "bf16" else None,
    )
    if cfg.gradient == "full":
        from .allocator import map_large_buffers

        map_large_buffers()  # resident memory flat in the reverse steps (see allocator.py)
        gradient_model = defense.checkpointed()
        estimator = attacks.EOT(n_eot, **eot_opts)
    elif cfg.gradient == "bpda":
        gradient_model = defense.straight_through()
        estimator = attacks.EOT(n_eot, **eot_opts)
    else:
        model = _score_model(defense.purifier)
        surrogate = defense.variant(purifier=build_purifier(cfg, model, surrogate=True))
        if adaptive:
            surrogate = surrogate.relaxed()
        estimator = attacks.Surrogate(surrogate, n=n_eot, **eot_opts)
    if adaptive and cfg.gradient != "surrogate":
        gradient_model = gradient_model.relaxed()
    if cfg.attack in ("constrained", "clean-levels") and not isinstance(
        defense.policy, (SSNI, LearnedPolicy)
    ):
        raise ConfigError(
            "attack", f"{cfg.attack} needs a defense with an SSNI or learned policy"
        )
    if (
        cfg.attack == "constrained"
        and isinstance(defense.policy, LearnedPolicy)
        and not defense.policy.has_statistics
    ):
        raise ConfigError(
            "policy_file",
            "the constrained attack needs the learned policy's clean EPS-norm statistics, which "
            "this policy file predates; retrain it with `ssni train-policy`",
        )
    if cfg.attack == "clean-levels":
        # transfer: gradients of the defense run at levels drawn from the clean t(x) histogram
        x_levels, _ = heldout_images(cfg, cfg.level_n)
        gen = seeded_generator(cfg.subset_seed, cfg.device)
        levels = attacks.clean_levels(
            defense.policy, x_levels.to(cfg.device), gen, batch_size=cfg.batch_size
        )
        source = gradient_model if cfg.gradient != "surrogate" else estimator.model
        estimator = attacks.Surrogate(attacks.at_levels(source, levels.cpu()).to(cfg.device),
                                      n=n_eot)
        gradient_model = defense
    if cfg.attack in ("pgd", "clean-levels"):
        attack = attacks.PGD(
            threat, iterations=steps, step_size=cfg.step_size, gradient=estimator,
            l2_step=cfg.l2_step,
        )
    elif cfg.attack == "constrained":
        attack = attacks.TwoPhase(
            threat, defense.policy, quantile=cfg.norm_quantile, norm_steps=cfg.norm_steps,
            steps=steps, step_size=cfg.step_size, gradient=estimator,
        )
    else:
        attack = attacks.APGD(threat, iterations=steps, gradient=estimator)
    desc = (
        f"{cfg.attack.upper()}-EOT{n_eot} {threat.norm} eps={cfg.eps:.4g} x{steps} "
        f"({cfg.gradient}{', adaptive t(x)' if adaptive else ''})"
    )
    return AttackSetup(attack, AttackTarget(defense, gradient_model), desc)


@dataclass
class Components:
    """Everything a run needs, built from one configuration."""

    config: RunConfig
    score_model: ScoreModel
    classifier: nn.Module
    policy: NoiseLevelPolicy
    defense: Defense


def build_components(
    cfg: RunConfig,
    *,
    generator: Optional[torch.Generator] = None,
    progress: Optional[Callable[[int], None]] = None,
    fit: bool = True,
) -> Components:
    """Models, policy (fitted on held-out images unless ``fit=False``, ``progress`` per batch)
    and defense."""
    model = build_score_model(cfg)
    classifier = build_classifier(cfg)
    policy = build_policy(cfg, model, generator=generator, progress=progress, fit=fit)
    return Components(cfg, model, classifier, policy, build_defense(cfg, model, classifier, policy))
