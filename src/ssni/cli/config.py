"""One flat, typed run configuration: defaults, TOML presets, ``key=value`` overrides, checks.

A configuration is a :class:`RunConfig` (a dataclass of plain values: str, int, float, bool and
lists of int/float). Presets are flat TOML files holding a subset of its keys; ``--set key=value``
overrides are coerced to the key's type. Every problem raises :class:`ConfigError` whose message is
one line that starts with the offending key.

Presets are looked up, in this order, in ``$SSNI_CONFIG_DIR``, in ``./configs`` and in the
presets shipped inside the package (``ssni/configs/*.toml``, read with ``importlib.resources``), so
``ssni presets`` works from a clone, from an installed wheel and with a user's own folder.

Defaults are the paper's CIFAR-10 setting (t* = 100 of 1000 steps, DDPM steps of 1/1000, K = 20
EPS levels, PGD-EOT Linf 8/255, 200 iterations, EOT 20, step 0.007, surrogate with 20 steps,
seeds 121-123, 512 test images).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from ..data.registry import DATASETS
from ..errors import UsageError, one_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    try:
        import tomli as tomllib
    except ImportError:  # pragma: no cover
        tomllib = None

__all__ = [
    "ConfigError",
    "RunConfig",
    "CHOICES",
    "config_keys",
    "from_dict",
    "apply_overrides",
    "parse_override",
    "load_toml",
    "load_config",
    "find_preset",
    "list_presets",
    "validate",
    "to_toml",
    "PRESET_ENV",
]

PRESET_ENV = "SSNI_CONFIG_DIR"


class ConfigError(UsageError):
    """A configuration problem; the message is one line naming the key (exit code 2)."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


@dataclass
class RunConfig:
    """Every setting of ``ssni evaluate`` / ``calibrate`` / ``analyze-t`` (see ``ssni presets``).

    Noise levels ``t_star``, ``bias`` and ``t_grid`` are in units of ``t`` in [0, 1]
    (0.1 is step 100 of 1000). Empty strings mean "the default for this dataset".
    """

    # -- identity
    name: str = "custom"
    description: str = ""
    # -- data
    dataset: str = "cifar10"
    data_dir: str = ""
    # ImageNet: folder of the training images (one dir per class) for stats_split = "train"
    train_dir: str = ""
    # ImageNet: height = width of the attacked images (0: 256); the paper's rows use 224
    image_size: int = 0
    split: str = "test"
    n: int = 512
    subset_seed: int = 0
    # -- models
    score_model: str = ""
    score_model_path: str = ""
    classifier: str = ""
    classifier_path: str = ""
    # -- purifier
    purifier: str = "diffpure"
    rule: str = "ddpm"
    t_star: float = 0.1
    purify_steps: int = 0  # 0: one reverse step per 1/1000 of t (t* = 0.1 -> 100 steps)
    # run the purifier at this size, bilinear resize there and back (0: the image size);
    # ImageNet rows: 224x224 images purified by the 256x256 model
    purify_size: int = 0
    gdmp_distance: str = "mse"  # GDMP: guidance distance, scale (CIFAR-10 value) and rounds
    gdmp_scale: float = 60000.0 * 3.0 / (2.0 * 8.0 / 255.0) / (100 * 3 * 32 * 32)
    gdmp_rounds: int = 4
    # GNS: stage levels; stage k runs at t(x) * stage_k / t_star
    gns_stages: List[float] = field(
        default_factory=lambda: [0.03, 0.03, 0.03, 0.03, 0.05, 0.05, 0.125, 0.125]
    )
    # -- noise-level policy
    policy: str = "constant"
    tau: float = 0.0  # 0: the std of the clean score norms
    bias: float = 0.0  # b, in units of t
    levels: int = 20
    batch_joined: bool = False
    policy_file: str = ""
    stats_split: str = "val"
    stats_n: int = 5000  # clean images for the score-norm statistics
    # -- threat model and attack
    attack: str = "pgd"
    norm: str = "linf"
    eps: float = 8.0 / 255.0
    # PGD's L2 step: "normalized" (step_size * g / ||g||) or "sign" (step_size * sign(g), then
    # projected on the L2 ball: the SSNI reference code's L2 attack)
    l2_step: str = "normalized"
    step_size: float = 0.007
    iterations: int = 200
    gradient: str = "surrogate"
    surrogate_steps: int = 20
    eot: int = 20
    adaptive_t: bool = False  # attack also differentiates through the SSNI level t(x)
    # policy-aware attacks on SSNI (attack = "constrained" / "clean-levels")
    norm_quantile: float = 0.9  # constrained: keep e(x) below this clean quantile
    norm_steps: int = 2  # constrained: phase-1 steps lowering e(x) before the attack
    level_n: int = 64  # clean-levels: held-out images whose levels t(x) are sampled
    eot_batched: bool = True  # the EOT passes of one gradient estimate as one batch ...
    eot_max_batch: int = 64  # ... of at most this many images per call (0: no limit)
    eot_share_t: bool = True  # t(x) once per gradient estimate, shared by its EOT passes
    # "bf16": the attack's gradient passes run under bf16 autocast (faster where the CPU or GPU
    # has bf16 instructions: benchmarks/bench_autocast.py); judging and evaluation stay fp32
    attack_autocast: str = "none"
    # -- evaluation
    votes: int = 1
    seeds: List[int] = field(default_factory=lambda: [121, 122, 123])
    batch_size: int = 64
    device: str = "cpu"
    resume: str = "auto"  # repair: drop a damaged log line and what follows it, then resume
    accelerate: bool = False  # CUDA only: bf16 autocast, channels_last, compiled score network
    # -- calibration (ssni calibrate)
    calib_n: int = 256
    calib_taus: List[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])
    calib_biases: List[float] = field(default_factory=lambda: [0.0, 0.025, 0.05, 0.1])
    calib_objective: str = "constrained"
    calib_min_robust: float = -1.0
    calib_weight: float = 0.5
    calib_iterations: int = 10
    calib_eot: int = 1
    # -- learned policy (ssni train-policy; also uses calib_iterations/eot/objective/...)
    learn_n: int = 256  # validation images (clean + adversarial versions)
    learn_resolution: float = 0.02  # spacing of the level grid of the correctness table
    learn_votes: int = 1  # purification draws per table entry (majority)
    learn_weights: List[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0])
    learn_select_fraction: float = 0.5  # share of the images that choose the weight
    learn_hidden: int = 16
    learn_steps: int = 1000
    # floor of the learned levels: -1 chooses it on validation among the table's levels, each
    # measured under an attack aimed at the constant defense at that level; >= 0 fixes it
    learn_t_min: float = -1.0
    # -- per-sample optimal-t analysis (ssni analyze-t)
    t_grid: List[float] = field(
        default_factory=lambda: [0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3]
    )

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dictionary of every key."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with ``changes`` applied (values coerced like ``--set``)."""
        return validate(from_dict({**self.to_dict(), **changes}))


# Allowed values of the string keys that are enumerations.
CHOICES: Dict[str, Tuple[str, ...]] = {
    "dataset": tuple(DATASETS),
    "split": ("test", "val"),
    "purifier": ("diffpure", "gdmp", "gns"),
    "rule": ("ddpm", "ddim", "sde"),
    "gdmp_distance": ("mse", "ssim"),
    "policy": ("constant", "ssni-n", "ssni-l", "ssni-learned"),
    "stats_split": ("train", "val"),
    "attack": ("pgd", "apgd", "constrained", "clean-levels"),
    "norm": ("linf", "l2"),
    "l2_step": ("normalized", "sign"),
    "gradient": ("full", "surrogate", "bpda"),
    "calib_objective": ("constrained", "weighted"),
    "resume": ("auto", "repair"),
    "attack_autocast": ("none", "bf16"),
}

_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_TYPES: Dict[str, str] = {}
for _f in dataclasses.fields(RunConfig):
    _t = str(_f.type)
    _TYPES[_f.name] = {
        "str": "str",
        "int": "int",
        "float": "float",
        "bool": "bool",
        "List[int]": "list[int]",
        "List[float]": "list[float]",
    }[_t]


def config_keys() -> List[str]:
    """Names of every configuration key, in declaration order."""
    return list(_FIELDS)


def key_type(key: str) -> str:
    """Type name of ``key``: str, int, float, bool, list[int] or list[float]."""
    return _TYPES[_check_key(key)]


def _check_key(key: str) -> str:
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, list(_FIELDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(key, f"unknown key{hint}")
    return key


# ----------------------------------------------------------------------------- coercion

_FRACTION = re.compile(r"^\s*([-+]?[0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*$")


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        text = value.strip()
        m = _FRACTION.match(text)
        try:
            out = float(m.group(1)) / float(m.group(2)) if m else float(text)
        except (ValueError, ZeroDivisionError):
            msg = f"expected a number (e.g. 0.5 or 8/255), got {value!r}"
            raise ConfigError(key, msg) from None
    else:
        raise ConfigError(key, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(out):
        raise ConfigError(key, f"must be finite, got {value!r}")
    return out


def _to_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ConfigError(key, f"expected an integer, got {value!r}") from None
    raise ConfigError(key, f"expected an integer, got {type(value).__name__}")


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
    raise ConfigError(key, f"expected true or false, got {value!r}")


def _to_list(key: str, value: Any, item) -> list:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise ConfigError(key, f"expected a list like [1, 2], got {value!r}") from None
        else:
            value = [v for v in (p.strip() for p in text.split(",")) if v]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"expected a list, got {type(value).__name__}")
    return [item(key, v) for v in value]


def coerce(key: str, value: Any) -> Any:
    """Convert ``value`` (from TOML or a ``--set`` string) to the type of ``key``."""
    kind = key_type(key)
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {type(value).__name__}")
        if key in CHOICES and value.strip().lower() in CHOICES[key]:
            return value.strip().lower()  # e.g. norm=Linf (the Python spelling) -> linf
        return value
    if kind == "int":
        return _to_int(key, value)
    if kind == "float":
        return _to_float(key, value)
    if kind == "bool":
        return _to_bool(key, value)
    if kind == "list[int]":
        return _to_list(key, value, _to_int)
    return _to_list(key, value, _to_float)


def from_dict(values: Mapping[str, Any], base: Optional[RunConfig] = None) -> RunConfig:
    """A :class:`RunConfig` from ``base`` (default: the defaults) updated with ``values``.

    Unknown keys and wrong types raise :class:`ConfigError`; call :func:`validate` for ranges.
    """
    data = (base or RunConfig()).to_dict()
    for key, value in values.items():
        data[key] = coerce(_check_key(key), value)
    return RunConfig(**data)


def parse_override(text: str) -> Tuple[str, str]:
    """Split one ``key=value`` override; the value stays a string until coerced."""
    if "=" not in text:
        raise ConfigError(text.strip() or "--set", "expected key=value")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise ConfigError("--set", f"missing key in {text!r}")
    return key, value.strip()


def apply_overrides(config: RunConfig, overrides: Iterable[str]) -> RunConfig:
    """Apply ``key=value`` strings in order (later wins) and return a new configuration."""
    values: Dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        values[_check_key(key)] = value
    return from_dict(values, base=config)


# ----------------------------------------------------------------------------- validation


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


def _ask(key: str, build: Callable[[], Any]) -> None:
    """Construct a component with the configured values; its ``ValueError`` becomes a
    :class:`ConfigError` naming ``key`` (the constructors own the range checks)."""
    try:
        build()
    except ValueError as err:
        raise ConfigError(key, str(err).splitlines()[0]) from None


def _ask_constructors(cfg: RunConfig) -> None:
    from ..attacks import EOT, PGD, ThreatModel
    from ..core.gdmp import GDMP
    from ..core.gns import GNS
    from ..core.policies import REWEIGHT, SSNI, Constant
    from ..core.purifiers import DiffPure
    from ..core.score import GaussianScore

    model = GaussianScore()
    reweight = REWEIGHT.get(cfg.policy, "sigmoid")
    _ask("t_star", lambda: Constant(cfg.t_star))
    _ask("purify_steps", lambda: DiffPure(model, reverse_steps=cfg.purify_steps or None))
    _ask("surrogate_steps", lambda: DiffPure(model, reverse_steps=cfg.surrogate_steps))
    _ask("gdmp_scale", lambda: GDMP(model, scale=cfg.gdmp_scale))
    _ask("gdmp_rounds", lambda: GDMP(model, rounds=cfg.gdmp_rounds))
    _ask("gns_stages", lambda: GNS(model, stages=cfg.gns_stages))
    _ask("tau", lambda: SSNI(model, tau=cfg.tau or None))
    _ask("bias", lambda: SSNI(model, t_star=cfg.t_star, bias=cfg.bias, reweight=reweight))
    _ask("batch_joined", lambda: SSNI(model, reweight=reweight, batch_joined=cfg.batch_joined))
    _ask("levels", lambda: SSNI(model, probe_levels=cfg.levels))
    for v in cfg.calib_biases:
        _ask("calib_biases", lambda v=v: SSNI(model, t_star=cfg.t_star, bias=v))
    threat = ThreatModel("Linf" if cfg.norm == "linf" else "L2", 0.0)
    _ask("eps", lambda: ThreatModel(threat.norm, cfg.eps))
    _ask("step_size", lambda: PGD(threat, step_size=cfg.step_size))
    _ask("iterations", lambda: PGD(threat, iterations=cfg.iterations))
    _ask("calib_iterations", lambda: PGD(threat, iterations=cfg.calib_iterations))
    _ask("eot", lambda: EOT(cfg.eot))
    _ask("calib_eot", lambda: EOT(cfg.calib_eot))


def validate(cfg: RunConfig) -> RunConfig:
    """Check ranges and combinations; return ``cfg`` or raise :class:`ConfigError`.

    Values that a component takes are checked by constructing it (one source of truth for each
    range); the remaining keys (data sizes, seeds, device, calibration grid) are checked here.
    """
    for key, allowed in CHOICES.items():
        value = getattr(cfg, key)
        _require(value in allowed, key, f"must be one of {', '.join(allowed)}, got {value!r}")
    _require(cfg.n >= 1, "n", f"must be >= 1, got {cfg.n}")
    _require(cfg.purify_size >= 0, "purify_size", f"must be >= 0, got {cfg.purify_size}")
    _require(cfg.image_size >= 0, "image_size", f"must be >= 0, got {cfg.image_size}")
    if cfg.image_size:
        _require(cfg.dataset == "imagenet", "image_size", "applies to dataset imagenet only")
    _require(cfg.stats_n >= 2, "stats_n", f"must be >= 2, got {cfg.stats_n}")
    q = cfg.norm_quantile
    _require(0.0 < q < 1.0, "norm_quantile", f"must be in (0, 1), got {q}")
    _require(cfg.norm_steps >= 0, "norm_steps", f"must be >= 0, got {cfg.norm_steps}")
    _require(cfg.level_n >= 1, "level_n", f"must be >= 1, got {cfg.level_n}")
    if cfg.attack in ("constrained", "clean-levels"):
        _require(cfg.policy != "constant" or bool(cfg.policy_file), "attack",
                 f"{cfg.attack} attacks an SSNI policy; the policy is constant")
    _require(cfg.eot_max_batch >= 0, "eot_max_batch", f"must be >= 0, got {cfg.eot_max_batch}")
    _require(cfg.votes >= 1, "votes", f"must be >= 1, got {cfg.votes}")
    _require(len(cfg.seeds) >= 1, "seeds", "needs at least one seed")
    _require(len(set(cfg.seeds)) == len(cfg.seeds), "seeds", f"repeated seed in {cfg.seeds}")
    _require(cfg.batch_size >= 1, "batch_size", f"must be >= 1, got {cfg.batch_size}")
    _require(
        re.fullmatch(r"cpu|mps|cuda(:\d+)?", cfg.device) is not None,
        "device",
        f"must be cpu, cuda, cuda:N or mps, got {cfg.device!r}",
    )
    _require(cfg.calib_n >= 2, "calib_n", f"must be >= 2, got {cfg.calib_n}")
    _require(len(cfg.calib_taus) >= 1, "calib_taus", "needs at least one value")
    for v in cfg.calib_taus:
        _require(v > 0, "calib_taus", f"every value must be > 0, got {v}")
    _require(len(cfg.calib_biases) >= 1, "calib_biases", "needs at least one value")
    _require(
        cfg.calib_min_robust <= 1.0,
        "calib_min_robust",
        f"must be <= 1 (negative: match the constant-t* defense), got {cfg.calib_min_robust}",
    )
    _require(
        0.0 <= cfg.calib_weight <= 1.0,
        "calib_weight",
        f"must be in [0, 1], got {cfg.calib_weight}",
    )
    _require(cfg.learn_n >= 4, "learn_n", f"must be >= 4, got {cfg.learn_n}")
    _require(
        0.0 < cfg.learn_resolution <= 1.0,
        "learn_resolution",
        f"must be in (0, 1], got {cfg.learn_resolution}",
    )
    _require(cfg.learn_votes >= 1, "learn_votes", f"must be >= 1, got {cfg.learn_votes}")
    _require(len(cfg.learn_weights) >= 1, "learn_weights", "needs at least one value")
    for v in cfg.learn_weights:
        _require(v > 0, "learn_weights", f"every value must be > 0, got {v}")
    _require(
        0.0 < cfg.learn_select_fraction < 1.0,
        "learn_select_fraction",
        f"must be in (0, 1), got {cfg.learn_select_fraction}",
    )
    _require(cfg.learn_hidden >= 0, "learn_hidden", f"must be >= 0, got {cfg.learn_hidden}")
    _require(cfg.learn_steps >= 1, "learn_steps", f"must be >= 1, got {cfg.learn_steps}")
    _require(
        cfg.learn_t_min == -1.0 or 0.0 <= cfg.learn_t_min <= min(1.0, cfg.t_star + cfg.bias),
        "learn_t_min",
        f"must be -1 (chosen on validation) or in [0, t_star + bias], got {cfg.learn_t_min}",
    )
    _require(len(cfg.t_grid) >= 1, "t_grid", "needs at least one level")
    for t in cfg.t_grid:
        _require(0.0 < t <= 1.0, "t_grid", f"every level must be in (0, 1], got {t}")
    _ask_constructors(cfg)
    return cfg


# ----------------------------------------------------------------------------- TOML and presets


def load_toml(path: os.PathLike) -> Dict[str, Any]:
    """Read a flat TOML preset into a dictionary (no validation)."""
    if tomllib is None:  # pragma: no cover - Python < 3.11 without tomli
        raise ConfigError("preset", "reading TOML needs Python >= 3.11 or `pip install tomli`")
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as err:
        raise ConfigError("preset", f"cannot read {path}: {err.strerror or err}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError("preset", f"{path} is not valid TOML: {one_line(err)}") from None
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(key, f"presets are flat: tables ([{key}]) are not allowed")
    return data


def _preset_dirs() -> List[Tuple[str, Any]]:
    """(origin, directory-like) pairs searched for presets, first match wins."""
    dirs: List[Tuple[str, Any]] = []
    env = os.environ.get(PRESET_ENV)
    if env:
        dirs.append(("env", Path(env)))
    dirs.append(("cwd", Path.cwd() / "configs"))
    try:
        from importlib.resources import files

        dirs.append(("package", files("ssni") / "configs"))
    except (ImportError, ModuleNotFoundError, TypeError):  # pragma: no cover
        pass
    return dirs


def list_presets() -> Dict[str, Any]:
    """Every preset name mapped to its file (a path or importlib resource), first match wins."""
    found: Dict[str, Any] = {}
    for _, directory in _preset_dirs():
        try:
            entries = sorted(directory.iterdir(), key=lambda p: p.name)
        except (FileNotFoundError, NotADirectoryError, OSError):
            continue
        for entry in entries:
            if entry.name.endswith(".toml") and entry.is_file():
                found.setdefault(entry.name[: -len(".toml")], entry)
    return dict(sorted(found.items()))


def find_preset(name_or_path: str):
    """A preset file by name (see :func:`list_presets`) or by path to a ``.toml`` file."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        if path.is_file():
            return path
        if path.is_dir():
            raise ConfigError("preset", f"{name_or_path!r} is a folder, not a .toml file")
        raise ConfigError("preset", f"no such file {name_or_path!r}")
    presets = list_presets()
    if name_or_path in presets:
        return presets[name_or_path]
    close = difflib.get_close_matches(name_or_path, list(presets), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else "; see `ssni presets`"
    raise ConfigError("preset", f"unknown preset {name_or_path!r}{hint}")


def _read_preset(entry) -> Dict[str, Any]:
    if isinstance(entry, Path):
        return load_toml(entry)
    if tomllib is None:  # pragma: no cover
        raise ConfigError("preset", "reading TOML needs Python >= 3.11 or `pip install tomli`")
    try:
        return tomllib.loads(entry.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError("preset", f"{entry.name} is not valid TOML: {one_line(err)}") from None



def load_config(preset: Optional[str] = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Defaults, then the preset (name or path), then ``key=value`` overrides; validated."""
    cfg = RunConfig()
    if preset:
        entry = find_preset(preset)
        values = _read_preset(entry)
        values.setdefault("name", Path(str(entry.name)).stem)
        cfg = from_dict(values, base=cfg)
    cfg = apply_overrides(cfg, overrides)
    return validate(cfg)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def to_toml(cfg: RunConfig) -> str:
    """The configuration as a flat TOML document (loadable as a preset)."""
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in cfg.to_dict().items())
