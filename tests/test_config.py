"""Config schema: precedence, YAML round trip, and one clear error for each kind of bad input."""
import pytest

from vitlab.config import Config, build_config, load_config, parse_override
from vitlab.errors import VitlabError


def test_defaults_then_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("task_name: t\ntrain:\n  epochs: 3\n  batch_size: 16\noptim:\n  lr: 1e-3\n")
    cfg = load_config(f, ["train.epochs=7", "optim.betas=[0.9, 0.95]", "model.drop_rate=0.1"])
    assert (cfg.task_name, cfg.train.epochs, cfg.train.batch_size) == ("t", 7, 16)
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML reads '1e-3' as a string
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.drop_rate == 0.1 and cfg.model.depth is None  # None: the model's own default
    assert cfg.train.seed == Config().train.seed


def test_cli_flags_sit_between_yaml_and_key_value(tmp_path, capsys, monkeypatch):
    import vitlab.cli as cli
    seen = {}
    monkeypatch.setattr("vitlab.train.train", lambda cfg, reload=False, local=False: seen.setdefault("cfg", cfg))
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 3\n  batch_size: 16\ndata:\n  num_workers: 0\n")
    assert cli.main(["train", "--config", str(f), "--epochs", "5", "--batch-size", "8", "train.batch_size=4",
                     "--lr", "0.1", "--output", str(tmp_path), "--savefile", "s"]) == 0
    cfg = seen["cfg"]
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (5, 4, 0.1)
    assert cfg.data.num_workers == 0  # an unset flag does not override the file
    assert cfg.run_dir == tmp_path / "vitlab" / "s"


def test_dump_round_trips():
    cfg = load_config(None, ["optim.name=sgd", "data.dataset=mnist", "model.img_size=32"])
    import yaml
    assert build_config(yaml.safe_load(cfg.dump())) == cfg


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("trian.epochs=1", "unknown config key 'trian.epochs' (did you mean 'train.epochs'?)"),
    ("train=1", "unknown config key 'train'"),
    ("train.epochs=ten", "config key 'train.epochs' must be int, got 'ten'"),
    ("train.epochs=2.5", "config key 'train.epochs' must be int"),
    ("optim.name=adam", "config key 'optim.name' must be one of 'adamw', 'sgd', got 'adam' (did you mean 'adamw'?)"),
    ("model.name=vit_tiny_patch16_2244", "unknown model 'vit_tiny_patch16_2244' (did you mean 'vit_tiny_patch16_224'?)"),
    ("data.dataset=cifar", "unknown dataset 'cifar' (did you mean 'cifar10'?)"),
    ("train.batch_size=0", "'train.batch_size' must be positive"),
    ("data.val_fraction=1.5", "'data.val_fraction' must be in [0, 1)"),
])
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(VitlabError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(VitlabError, match="config file '.*missing.yaml' not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(VitlabError, match="not valid YAML at line"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(VitlabError, match="must be a mapping"):
        load_config(bad)
    with pytest.raises(VitlabError, match="not of the form section.key=value"):
        parse_override("train.epochs")


def test_shipped_configs_load():
    from pathlib import Path

    import yaml

    from vitlab.experiments.sweep import load_spec
    for f in sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml")):
        assert f.read_text().startswith("# "), f"{f.name} must start with the command that runs it"
        if "base" in yaml.safe_load(f.read_text()):  # a sweep spec: every point's config must load
            assert load_spec(f).points
        else:
            load_config(f)
