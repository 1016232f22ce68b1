"""Bad input, as a new user or a hostile tester gives it: one table row per case.

CLI rows are ``(arguments, exit code, message fragment)``: the command must exit with that code
and print exactly one line containing the fragment (``{w}`` is the folder of the files made by
the ``files`` fixture, ``{out}`` a fresh results folder). API rows are ``(call, exception,
fragment)``. Adding a case is one line.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from ssni.cli.main import main

sys.path.insert(0, str(Path(__file__).parent))
from _cli_helpers import CNN_KW, UNET_KW, tiny_sets, tiny_weights  # noqa: E402

PRESET = "fmnist-diffpure-ssni-n-pgd-linf"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every bad file the tables refer to, in one folder."""
    from ssni.io.weights import save_weights
    from ssni.nets.cnn import CNN
    from ssni.nets.unet import UNet

    w = tmp_path_factory.mktemp("bad")
    unet, cnn = tiny_weights(w)
    good = unet.read_bytes()
    (w / "trunc.safetensors").write_bytes(good[: len(good) // 2])
    (w / "header.safetensors").write_bytes(good[:100])
    (w / "random.safetensors").write_bytes(os.urandom(4096))
    torch.save({"weight": torch.zeros(2)}, w / "pickle.safetensors")
    (w / "dir.safetensors").mkdir()
    # a 28x28 Fashion-MNIST model given 8x8 digits
    fm = {"data": {"name": "fashion-mnist"}, "time_scale": 1000.0}
    torch.manual_seed(0)
    save_weights(w / "fm_unet.safetensors", UNet(**UNET_KW), arch="UNet", arch_kwargs=UNET_KW,
                 kind="score_model", info=fm)
    save_weights(w / "fm_cnn.safetensors", CNN(**CNN_KW), arch="CNN", arch_kwargs=CNN_KW,
                 kind="classifier", info={"data": {"name": "fashion-mnist"}})
    (w / "binary.toml").write_bytes(bytes(range(256)))
    (w / "bad.toml").write_text("n = = 3\n")
    (w / "folder.toml").mkdir()
    policy = {"format": "ssni-policy", "version": 1, "policy": "ssni-n", "t_star": 0.1}
    (w / "nostats.json").write_text(json.dumps(policy))
    flat = {**policy, "tau": 1.0, "statistics": {"mean": 1, "std": 0, "min": 1, "max": 1,
                                                  "count": 10}}
    (w / "flat.json").write_text(json.dumps(flat))
    good_policy = {**flat, "tau": 0.5, "statistics": {**flat["statistics"], "std": 0.1}}
    (w / "policy.json").write_text(json.dumps(good_policy))
    (w / "policy.json.d").mkdir()
    (w / "binary.json").write_bytes(bytes(range(256)))
    for name, text in [("rep_notjson", "{"), ("rep_rows", '{"rows": 5}'),
                       ("rep_row", '{"rows": [1]}'), ("rep_list", "[]"),
                       ("rep_metrics", '{"rows": [{"metrics": 3}]}')]:
        (w / name).mkdir()
        (w / name / "report.json").write_text(text)
    (w / "rep_dir" / "report.json").mkdir(parents=True)
    return w


def _tiny(w, **extra):
    """``--set`` arguments of a cheap digits run with the tiny weights (overridable)."""
    extra = {"dataset": "digits", "score_model": "file", "classifier": "file",
             "stats_n": 8, "n": 8, "seeds": "121", "batch_size": 8, **extra}
    return tiny_sets(w / "unet.safetensors", w / "cnn.safetensors", **extra)


CLI_CASES = [
    # configuration files
    (["evaluate", "--preset", "{w}/binary.toml"], 2, "binary.toml is not valid TOML"),
    (["evaluate", "--preset", "{w}/bad.toml"], 2, "bad.toml is not valid TOML"),
    (["evaluate", "--preset", "{w}/folder.toml"], 2, "folder.toml' is a folder"),
    (["evaluate", "--set", "norm=Lmax"], 2, "norm: must be one of linf, l2"),
    # weight files: one line naming the key and the file
    (["evaluate", "TINY", "--set", "score_model_path={w}/trunc.safetensors"], 2,
     "score_model_path: {w}/trunc.safetensors"),
    (["evaluate", "TINY", "--set", "score_model_path={w}/header.safetensors"], 2,
     "header.safetensors is not a readable safetensors"),
    (["evaluate", "TINY", "--set", "classifier_path={w}/random.safetensors"], 2,
     "classifier_path: {w}/random.safetensors is not a readable safetensors"),
    (["evaluate", "TINY", "--set", "classifier_path={w}/pickle.safetensors"], 2,
     "pickle.safetensors is not a readable safetensors"),
    (["evaluate", "TINY", "--set", "score_model_path={w}/dir.safetensors"], 2,
     "dir.safetensors' is a folder, not a weights file"),
    (["evaluate", "TINY", "--set", "score_model_path={w}/cnn.safetensors"], 2,
     "holds a 'classifier', not a 'score_model'"),
    # data and sizes
    (["evaluate", "TINY", "--set", "stats_n=100000"], 2, "stats_n: digits val has only"),
    (["evaluate", "TINY", "--set", "n=100000"], 2, "n: digits test has only"),
    (["evaluate", "TINY", "--set", "score_model_path={w}/fm_unet.safetensors"], 1,
     "holds 1x8x8 images (C x H x W); the score model expects 1x28x28"),
    # policy files
    (["evaluate", "TINY", "--set", "policy_file={w}/nostats.json"], 2,
     "policy_file: {w}/nostats.json: an ssni-n policy file needs 'statistics'"),
    (["evaluate", "TINY", "--set", "policy_file={w}/flat.json"], 2, "degenerate"),
    (["evaluate", "TINY", "--set", "policy_file={w}/policy.json.d"], 2, "is a folder"),
    (["evaluate", "TINY", "--set", "policy_file={w}/binary.json"], 2, "is not valid JSON"),
    (["evaluate", "TINY", "--set", "policy_file={w}/policy.json", "--set", "tau=2"], 2,
     "tau: --set tau=2.0 conflicts with policy_file {w}/policy.json (tau = 0.5)"),
    (["evaluate", "TINY", "--set", "policy_file={w}/policy.json", "--set", "policy=ssni-l"], 2,
     "policy: --set policy='ssni-l' conflicts with policy_file"),
    (["evaluate", "TINY", "--set", "policy_file={w}/policy.json", "--set", "t_star=0.2"], 2,
     "t_star: --set t_star=0.2 conflicts with policy_file"),
    # reports
    (["report", "{w}/rep_notjson"], 2, "is not an ssni report (not JSON)"),
    (["report", "{w}/rep_rows"], 2, "no list of 'rows'"),
    (["report", "{w}/rep_list"], 2, "no list of 'rows'"),
    (["report", "{w}/rep_row"], 2, "row 0 is not a result row"),
    (["report", "{w}/rep_metrics"], 2, "row 0 is not a result row"),
    (["report", "{w}/rep_dir"], 2, "rep_dir"),
]


@pytest.mark.parametrize("args, code, fragment", CLI_CASES, ids=lambda v: str(v)[:60])
def test_bad_input_exits_with_one_line(files, tmp_path, capsys, args, code, fragment):
    out = tmp_path / "out"
    argv = []
    for a in args:
        if a == "TINY":
            argv += ["--preset", PRESET, *_tiny(files)]
        else:
            argv.append(a.format(w=files))
    if argv[0] in ("evaluate", "calibrate", "analyze-t"):
        argv += ["--out", str(out)]
    assert main(["--quiet", *argv]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert fragment.format(w=files) in err, err
    assert not out.exists(), "a refused run wrote into its results folder"


def test_a_policy_file_agreeing_with_explicit_keys_is_fine(files):
    from ssni.cli.common import load_run_config as _load

    class Args:
        preset = PRESET
        overrides = ["policy_file=" + str(files / "policy.json"), "tau=0.5", "policy=ssni-n"]

    cfg = _load(Args)
    assert (cfg.policy, cfg.tau, cfg.t_star) == ("ssni-n", 0.5, 0.1)


def test_norm_is_accepted_in_the_python_spelling():
    from ssni.cli.config import load_config

    assert load_config(None, ["norm=Linf"]).norm == "linf"
    assert load_config(None, ["norm=L2", "eps=0.5"]).norm == "l2"


# ----------------------------------------------------------------------------- API


def _eval(x, y, **kw):
    import ssni
    from _models import TinyClassifier
    from ssni.attacks import PGD, ThreatModel

    defense = ssni.Defense(TinyClassifier(), ssni.DiffPure(ssni.GaussianScore(), reverse_steps=2),
                           ssni.Constant(0.05))
    attack = PGD(ThreatModel("Linf", 0.03), iterations=1, step_size=0.01)
    return ssni.evaluate(defense, attack, (x, y), seeds=[1], sanity_checks=False, **kw)


def _x(n=4, c=1, s=8, dtype=torch.float32):
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(0)).to(dtype)


def _file_model(path):
    from ssni.io.weights import load_score_model_file

    return load_score_model_file(path)


def _purify(model, x):
    import ssni

    return ssni.DiffPure(model, reverse_steps=1)(x, 0.05)


def _fit_flat(x):
    """A score model predicting no noise at all: every clean norm is 0."""
    import ssni

    class Zero(ssni.ScoreModel):
        def eps(self, x, t):
            return torch.zeros_like(x)

    return ssni.SSNI(Zero(), t_star=0.1, probe_levels=2).fit([x], generator=torch.Generator())


def _policy(w, name):
    import ssni
    from ssni.eval.calibrate import load_policy

    return load_policy(w / name, ssni.GaussianScore())


API_CASES = [
    (lambda w: _eval(_x(), torch.tensor([0.0, 1.7, 2.0, 3.0])), ValueError,
     "labels must be integers"),
    (lambda w: _eval(_x(), torch.tensor([0, 1, 2, 10])), ValueError, "labels must lie in [0, 9]"),
    (lambda w: _eval(_x(), torch.tensor([0, -1, 2, 3])), ValueError, "got labels in [-1, 3]"),
    (lambda w: _eval(_x() * 2, torch.tensor([0, 1, 2, 3])), ValueError, "must be images in [0, 1]"),
    (lambda w: _purify(_file_model(w / "fm_unet.safetensors"), _x(s=32)), ValueError,
     "holds 1x32x32 images (C x H x W); the score model expects 1x28x28"),
    (lambda w: _purify(_file_model(w / "fm_unet.safetensors"), _x(c=3, s=28)), ValueError,
     "expects 1x28x28"),
    (lambda w: _purify(_file_model(w / "unet.safetensors"), _x(dtype=torch.float64)),
     ValueError, "x is torch.float64, the score model's weights are torch.float32"),
    (lambda w: _purify(_file_model(w / "unet.safetensors"), _x(dtype=torch.float16)),
     ValueError, "x is torch.float16"),
    (lambda w: _fit_flat(_x()), ValueError, "std 0"),
    (lambda w: _file_model(w / "trunc.safetensors"), ValueError, "trunc.safetensors"),
    (lambda w: _file_model(w / "random.safetensors"), ValueError, "random.safetensors is not"),
    (lambda w: _file_model(w / "pickle.safetensors"), ValueError, "pickle.safetensors is not"),
    (lambda w: _file_model(w / "dir.safetensors"), ValueError, "is a folder"),
    (lambda w: _file_model(w / "missing.safetensors"), FileNotFoundError, "no such file"),
    (lambda w: _policy(w, "nostats.json"), ValueError, "needs 'statistics'"),
]


@pytest.mark.parametrize("call, error, fragment", API_CASES, ids=[c[2][:40] for c in API_CASES])
def test_bad_input_to_the_library_raises_one_clear_error(files, call, error, fragment):
    with pytest.raises(error) as err:
        call(files)
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg, msg


def test_loaded_weights_need_no_gradient():
    import ssni
    from ssni.io.weights import load_classifier_file

    w = Path(ssni.__file__).parent / "weights"  # shipped as package data
    for model in (_file_model(w / "fmnist_unet.safetensors"),
                  load_classifier_file(w / "fmnist_cnn.safetensors")):
        assert not any(p.requires_grad for p in model.parameters())
    assert _file_model(w / "fmnist_unet.safetensors").image_shape == (1, 28, 28)
