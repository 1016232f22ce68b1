"""Every CIFAR-10 and ImageNet paper row runs end to end through ``ssni evaluate --preset <row>``.

Stand-in checkpoints are written in the public files' exact formats (score_sde's
``checkpoint_8.pth`` with ``ema.shadow_params``, guided-diffusion's state_dict, RobustBench's WRN
state_dict, torchvision's ResNet-50 state_dict) at small widths: the registry entries are pointed
at small configurations of the same architectures, since the real widths make files of 100 MB to
2 GB. Data are fake CIFAR-10 pickle batches and ImageNet class-folder trees. The budget is tiny
(2 images, 1 iteration, EOT 1, 2 reverse steps, K = 2 probe levels, one seed); everything else is
the preset's own setting.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
import torch

from ssni.cli import config as config_mod
from ssni.cli.main import main
from ssni.io import zoo
from ssni.nets import build_network

Image = pytest.importorskip("PIL.Image", reason="Pillow is needed for the ImageNet rows")

PAPER_ROWS = [n for n in config_mod.list_presets() if n.startswith(("cifar10-", "imagenet-"))]

SMALL_SCORE = {
    "cifar10-ddpmpp": {"nf": 16, "num_res_blocks": 1},
    "imagenet-guided-256-uncond": {
        "model_channels": 32,
        "num_res_blocks": 1,
        "channel_mult": (1, 1, 1, 1, 1, 1),  # the real model's 5 downsamplings, narrow
        "num_head_channels": 16,
    },
}
SMALL_CLASSIFIER = {
    "cifar10-wrn-28-10": {"depth": 10, "widen_factor": 1},
    "imagenet-resnet50": {"width": 4},  # ResNet-50's blocks, 1/16 of its widths
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread (and a busy machine suffers least)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small_registries():
    scores = dict(zoo.SCORE_MODELS)
    for name, cfg in SMALL_SCORE.items():
        scores[name] = dataclasses.replace(scores[name], config={**scores[name].config, **cfg})
    classifiers = dict(zoo.CLASSIFIERS)
    for name, cfg in SMALL_CLASSIFIER.items():
        entry = classifiers[name]
        classifiers[name] = dataclasses.replace(entry, config={**entry.config, **cfg})
    return MappingProxyType(scores), MappingProxyType(classifiers)


def _write_cifar_batch(path: Path, rng, n: int) -> None:
    batch = {
        b"batch_label": b"stand-in batch",
        b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
        b"data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def _image_tree(root: Path, rng, per_class: int) -> None:
    for c, wnid in enumerate(("n01440764", "n01443537")):
        folder = root / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            h, w = 256 + 24 * i, 300 - 16 * c
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"img_{c}_{i}.JPEG", format="JPEG")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Fake data sets and stand-in checkpoints in the public formats; returns their paths."""
    root = tmp_path_factory.mktemp("paper")
    rng = np.random.default_rng(0)
    cifar = root / "cifar10" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    _write_cifar_batch(cifar / "test_batch", rng, 64)
    for b in range(1, 6):  # > 5000 training images: the validation hold-out takes 5000
        _write_cifar_batch(cifar / f"data_batch_{b}", rng, 1002)
    _image_tree(root / "imagenet" / "val", rng, 2)
    _image_tree(root / "imagenet" / "train", rng, 2)

    scores, classifiers = _small_registries()
    torch.manual_seed(0)
    paths = {}
    # score_sde: {'optimizer', 'model' (DataParallel keys), 'ema': {'shadow_params'}, 'step'}
    entry = scores["cifar10-ddpmpp"]
    net = build_network(entry.architecture, entry.config)
    params = [p.detach().clone() for p in net.parameters()]
    ckpt = {
        "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0]}]},
        "model": {f"module.{k}": v + 1.0 for k, v in net.state_dict().items()},
        "ema": {"decay": 0.9999, "num_updates": 8, "shadow_params": params},
        "step": 8,
    }
    paths["cifar10-ddpmpp"] = root / "checkpoint_8.pth"
    torch.save(ckpt, paths["cifar10-ddpmpp"])
    # guided-diffusion and torchvision: plain state_dicts
    for name, registry, file in (
        ("imagenet-guided-256-uncond", scores, "256x256_diffusion_uncond.pt"),
        ("imagenet-resnet50", classifiers, "resnet50-0676ba61.pth"),
    ):
        e = registry[name]
        paths[name] = root / file
        torch.save(build_network(e.architecture, e.config).state_dict(), paths[name])
    # RobustBench: {'state_dict': DataParallel keys}
    e = classifiers["cifar10-wrn-28-10"]
    state = build_network(e.architecture, e.config).state_dict()
    paths["cifar10-wrn-28-10"] = root / "Standard.pt"
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(wrapped, paths["cifar10-wrn-28-10"])
    return root, paths, scores, classifiers


def _sets(values):
    out = []
    for k, v in values.items():
        out += ["--set", f"{k}={v}"]
    return out


def _records(out: Path):
    recs = []
    with open(out / "log.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if doc.get("kind") == "sample":
                recs.append(doc["record"])
    return recs


def test_there_are_thirty_paper_rows():
    assert len(PAPER_ROWS) == 30
    assert sum(n.startswith("imagenet-") for n in PAPER_ROWS) == 3


@pytest.mark.parametrize("row", PAPER_ROWS)
def test_paper_row_runs_end_to_end(row, stand_ins, monkeypatch, tmp_path):
    root, paths, scores, classifiers = stand_ins
    monkeypatch.setattr(zoo, "SCORE_MODELS", scores)
    monkeypatch.setattr(zoo, "CLASSIFIERS", classifiers)
    cfg = config_mod.load_config(row)
    values = {
        "n": 2, "iterations": 1, "eot": 1, "seeds": "121", "stats_n": 2, "levels": 2,
        "purify_steps": 2, "batch_size": 2, "device": "cpu",
        "score_model_path": paths[cfg.score_model], "classifier_path": paths[cfg.classifier],
    }
    if cfg.purifier != "gns":  # GNS keeps its published 7-step surrogate
        values["surrogate_steps"] = 2
    if cfg.dataset == "cifar10":
        values["data_dir"] = root / "cifar10"
    else:
        values["data_dir"] = root / "imagenet" / "val"
        values["train_dir"] = root / "imagenet" / "train"
    out = tmp_path / row
    assert main(["--quiet", "evaluate", "--preset", row, *_sets(values), "--out", str(out)]) == 0

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    extra = report["extra"]
    assert extra["resolved_config"]["name"] == row
    recs = _records(out)
    assert len(recs) == 2
    for r in recs:
        # one gradient estimate that reached the input, and a point inside the threat model
        assert r["grad_iterations"] == 1 and r["zero_grad"] == 0 and r["nonfinite_grad"] == 0
        assert not r["outside_threat"] and r["perturbation"] > 0
        if cfg.policy == "constant":
            assert r["t_clean"] == pytest.approx(cfg.t_star)
        else:
            assert r["score_norm_clean"] is not None and 0 <= r["t_clean"] <= cfg.t_star + 1e-9
    metrics = report["rows"][0]["metrics"]
    assert {"clean_acc", "robust_acc", "robust_acc_ref"} <= set(metrics)
    if cfg.policy != "constant":
        assert extra["policy"]["statistics"]["count"] == 2  # clean norms of stats_n images
    if cfg.norm == "l2":
        assert extra["evaluation"]["attack"]["l2_step"] == "sign"
    if cfg.dataset == "imagenet":
        assert extra["evaluation"]["data"]["shape"] == [3, 224, 224]


def test_imagenet_rows_attack_224_purify_256_and_use_training_statistics(
    stand_ins, monkeypatch
):
    from ssni.cli import build
    from ssni.io.adapters import ResizedPurifier

    root, paths, scores, classifiers = stand_ins
    monkeypatch.setattr(zoo, "SCORE_MODELS", scores)
    monkeypatch.setattr(zoo, "CLASSIFIERS", classifiers)
    cfg = config_mod.load_config(
        "imagenet-diffpure-ssni-n-pgd-linf",
        _sets({"n": 2, "stats_n": 3, "levels": 2, "purify_steps": 2, "device": "cpu",
               "data_dir": root / "imagenet" / "val", "train_dir": root / "imagenet" / "train",
               "score_model_path": paths["imagenet-guided-256-uncond"],
               "classifier_path": paths["imagenet-resnet50"]})[1::2],
    )
    assert (cfg.image_size, cfg.purify_size, cfg.stats_split) == (224, 256, "train")
    parts = build.build_components(cfg, generator=build.seeded_generator(0))
    x, _ = build.eval_images(cfg)
    assert x.shape == (2, 3, 224, 224)
    assert isinstance(parts.defense.purifier, ResizedPurifier)
    assert parts.defense.purifier.size == 256
    # the statistics come from 3 of the 4 training images (224 crops), not from validation ones
    assert parts.policy.statistics()["count"] == 3
    x_train, _ = build.heldout_images(cfg, 3)
    assert x_train.shape == (3, 3, 224, 224)
    x_val, _ = build.load_images(cfg, "test", 4, 0)
    assert not any(torch.equal(a, b) for a in x_train for b in x_val)
    sizes = []
    hook = parts.score_model.net.register_forward_hook(
        lambda m, inp, out: sizes.append(tuple(inp[0].shape[-2:]))
    )
    try:
        with torch.no_grad():
            out = parts.defense.run(x, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert out.purified.shape == x.shape
    # the EPS probe and the purification both give the diffusion model 256x256 images
    assert set(sizes) == {(256, 256)} and len(sizes) == 1 + 2
    assert parts.policy.probe_size == 256
