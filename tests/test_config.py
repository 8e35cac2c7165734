"""Training configs: strict types, impossible values and unknown keys rejected in one line, overrides."""

import pytest
from click.testing import CliRunner

from ambient_mri.config import (CONFIG_DIR, Config, apply_overrides, changed_keys, load_config, parse_override,
                                parse_yaml)
from ambient_mri.errors import ConfigError


def test_packaged_configs_load_and_are_consistent():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"tiny", "cpu64", "fastmri_brain", "block64"} <= set(names)
    for n in names:
        cfg = load_config(n)
        assert cfg.name.startswith(n)
        assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # resolved config round-trips
    assert load_config("block64").loss.kind == "ambient_image"
    brain = load_config("fastmri_brain")
    assert brain.train.precision == "bf16" and brain.train.grad_clip == 1.0 and brain.model.channels[0] == 128
    assert brain.train.lr == pytest.approx(2e-4) and brain.train.batch == 8 and brain.model.dropout == pytest.approx(0.1)


def test_overrides_with_dotted_keys_and_yaml_values():
    cfg = load_config("tiny", ["train.steps=200", "model.channels=[16,32]", "train.lr=1e-4", "loss.redraw=false",
                               "loss.further_accel=5", "loss.delta=null", "train.ema_decay=0.999"])
    assert cfg.train.steps == 200 and cfg.model.channels == [16, 32]
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)  # PyYAML alone would read "1e-4" as a string
    assert cfg.loss.redraw is False and cfg.loss.further_accel == 5.0 and cfg.loss.delta is None
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert apply_overrides({"train": {"steps": 1}}, ["train.steps=3"]) == {"train": {"steps": 3}}


@pytest.mark.parametrize("override, words", [
    ("train.stpes=10", "unknown key train.stpes"),
    ("modle.channels=[8]", "unknown key modle"),
    ("train.steps=ten", "train.steps must be an integer"),
    ("train.steps=1.5", "train.steps must be an integer"),
    ("train.lr=fast", "train.lr must be a number"),
    ("loss.redraw=yes please", "loss.redraw must be true/false"),
    ("model.channels=16", "model.channels must be a list"),
    ("model.channels=[16, x]", "model.channels must be a list of integers"),
    ("train.lr=-1e-4", "train.lr must be > 0"),
    ("train.batch=0", "train.batch must be >= 1"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("loss.further_accel=0.5", "must be >= 1"),
    ("loss.delta=1.5", "loss.delta must be in (0, 1)"),
    ("loss.kind=magic", "loss.kind must be one of"),
    ("train.precision=fp8", "train.precision must be"),
    ("train.device=tpu", "train.device must be"),
    ("model.groups=3", "does not divide"),
    ("model.attention=[5]", "model.attention"),
    ("model.dropout=1.0", "model.dropout must be in [0, 1)"),
    ("model.cond=[mask, colour]", "model.cond"),
    ("train.optimizer=sgd", "adam or adamw"),
    ("loss.further_accel=5", "exactly one of"),  # tiny sets delta already
    ("train.ema_decay=1.0", "ema_decay"),
    ("train.grad_clip=-1", "grad_clip"),
    ("train.steps", "not key=value"),
    ("train.lr=[", "not valid YAML"),
])
def test_bad_values_rejected_in_one_line(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert words in str(e.value) and "\n" not in str(e.value)
    if "=" in override and "YAML" not in words:
        assert str(e.value).startswith("command line: ")  # the override is blamed, not tiny.yaml


def test_ambient_image_needs_delta_and_baselines_are_labelled():
    with pytest.raises(ConfigError, match="ambient_image needs loss.delta"):
        Config.from_dict({"loss": {"kind": "ambient_image"}})
    cfg = load_config("tiny", ["loss.kind=oracle"])
    assert cfg.name == "tiny-oracle" and cfg.is_oracle
    assert load_config("tiny", ["loss.kind=naive_zf"]).name == "tiny-naive_zf"
    again = Config.from_dict(cfg.to_dict())
    assert again.name == "tiny-oracle"  # labelled once, not twice


def test_yaml_file_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  channels: [8, 16]\n  colour: red\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "unknown key model.colour" in str(e.value)
    p.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such config"):
        load_config(tmp_path / "missing.yaml")
    assert parse_yaml("x: 2.0e-4")["x"] == 2e-4


def test_changed_keys():
    a = load_config("tiny").to_dict()
    b = load_config("tiny", ["train.steps=9", "model.blocks=2"]).to_dict()
    assert changed_keys(a, b) == ["model.blocks", "train.steps"]


def test_cli_rejects_bad_config_before_touching_data(tmp_path):
    from ambient_mri.commands.train import command

    out = tmp_path / "run"
    res = CliRunner().invoke(command, ["--config", "tiny", "--data", str(tmp_path / "nowhere"), "--out", str(out),
                                       "train.lr=-1"])
    assert res.exit_code != 0 and isinstance(res.exception, ConfigError)
    assert "train.lr must be > 0" in str(res.exception) and not out.exists()
    res = CliRunner().invoke(command, ["--config", "tiny", "--out", str(out), "--print-config", "train.steps=7"])
    assert res.exit_code == 0 and "steps: 7" in res.output


def test_help_explains_every_option():
    from ambient_mri.commands.sample import command as sample_cmd
    from ambient_mri.commands.train import command as train_cmd

    for cmd in (train_cmd, sample_cmd):
        res = CliRunner().invoke(cmd, ["--help"])
        assert res.exit_code == 0
        for p in cmd.params:
            if p.param_type_name == "option":
                assert p.help, f"{cmd.name}: option {p.name} has no help"
                assert p.opts[0] in res.output
