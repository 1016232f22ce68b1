"""Run configuration: defaults, presets, overrides with type coercion, one-line errors."""

import pytest

from ssni.cli import config
from ssni.cli.config import ConfigError, RunConfig, load_config
from ssni.cli.main import UsageError


def test_defaults_are_the_papers_cifar10_setting():
    cfg = config.validate(RunConfig())
    assert cfg.t_star == 0.1 and cfg.levels == 20 and cfg.n == 512
    assert cfg.eps == pytest.approx(8 / 255) and cfg.iterations == 200 and cfg.eot == 20
    assert cfg.seeds == [121, 122, 123] and cfg.device == "cpu"
    assert issubclass(ConfigError, UsageError)


def test_presets_cover_every_paper_row_and_all_load():
    names = list(config.list_presets())
    cifar = [n for n in names if n.startswith("cifar10-")]
    assert len(cifar) >= 18 and len([n for n in names if n.startswith("imagenet-")]) >= 3
    for purifier in ("diffpure", "gdmp", "gns"):
        for policy in ("constant", "ssni-n", "ssni-l"):
            for attack in ("pgd-linf", "pgd-l2", "bpda-linf"):
                assert f"cifar10-{purifier}-{policy}-{attack}" in names
            assert f"fmnist-{purifier}-{policy}-pgd-linf" in names
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name and cfg.description
    assert load_config("cifar10-gns-ssni-l-pgd-l2").norm == "l2"


def test_overrides_are_coerced_to_the_key_type():
    cfg = load_config(None, ["n=16", "eps=8/255", "seeds=1, 2", "adaptive_t=yes",
                             "t_grid=[0.05, 0.1]", "tau=2", "data-dir=/x"])
    assert cfg.n == 16 and isinstance(cfg.n, int)
    assert cfg.eps == pytest.approx(8 / 255)
    assert cfg.seeds == [1, 2] and cfg.adaptive_t is True
    assert cfg.t_grid == [0.05, 0.1] and cfg.tau == 2.0 and cfg.data_dir == "/x"
    assert load_config(None, ["n=4", "n=5"]).n == 5  # later wins


@pytest.mark.parametrize(
    "override, key",
    [
        ("foo=1", "foo"),
        ("ept=3", "ept"),
        ("n=1.5", "n"),
        ("n=abc", "n"),
        ("eps=-0.1", "eps"),
        ("eps=nan", "eps"),
        ("t_star=0", "t_star"),
        ("t_star=1.5", "t_star"),
        ("votes=0", "votes"),
        ("eot=0", "eot"),
        ("adaptive_t=maybe", "adaptive_t"),
        ("policy=ssni", "policy"),
        ("stats_split=test", "stats_split"),
        ("bias=0.95", "bias"),
        ("seeds=", "seeds"),
        ("device=gpu", "device"),
        ("t_grid=0.1,2", "t_grid"),
        ("noequals", "noequals"),
    ],
)
def test_bad_values_name_the_key_in_one_line(override, key):
    with pytest.raises(ConfigError) as info:
        load_config("fmnist-diffpure-ssni-n-pgd-linf", [override])
    message = str(info.value)
    assert message.startswith(f"{key}:") and "\n" not in message
    assert info.value.key == key


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'eps'"):
        load_config(None, ["epss=0.1"])


def test_toml_round_trip_and_lookup_order(tmp_path, monkeypatch):
    cfg = load_config("fmnist-gdmp-ssni-l-pgd-linf", ["n=7", "seeds=5"])
    path = tmp_path / "mine.toml"
    path.write_text(config.to_toml(cfg))
    assert load_config(str(path)) == cfg
    # a user folder in $SSNI_CONFIG_DIR shadows and extends the shipped presets
    user = tmp_path / "presets"
    user.mkdir()
    (user / "fmnist-diffpure-constant-pgd-linf.toml").write_text('dataset = "digits"\n')
    (user / "my-row.toml").write_text('description = "mine"\nn = 3\n')
    monkeypatch.setenv(config.PRESET_ENV, str(user))
    assert load_config("fmnist-diffpure-constant-pgd-linf").dataset == "digits"
    assert load_config("my-row").n == 3


@pytest.mark.parametrize(
    "text, key",
    [
        ("n = 1.5\n", "n"),
        ("eps = -1\n", "eps"),
        ("unknown_key = 1\n", "unknown_key"),
        ("[section]\nn = 1\n", "section"),
        ("n = \n", "preset"),
        ('votes = "two"\n', "votes"),
    ],
)
def test_bad_preset_files(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.key == key and "\n" not in str(info.value)


def test_presets_are_found_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./configs here: the packaged presets are used
    monkeypatch.delenv(config.PRESET_ENV, raising=False)
    names = list(config.list_presets())
    assert sum(n.startswith("cifar10-") for n in names) >= 18
    assert load_config("imagenet-diffpure-ssni-n-pgd-linf").t_star == 0.2
