"""Config schema: precedence, YAML round trip, and one clear error for each kind of bad input."""
import pytest

from vitlab.config import Config, build_config, parse_override
from vitlab.errors import VitlabError
from vitlab.resolve import load as load_config  # parse, then resolve names and type the model arguments


def test_defaults_then_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("task_name: t\ntrain:\n  epochs: 3\n  batch_size: 16\noptim:\n  lr: 1e-3\n")
    cfg = load_config(f, ["train.epochs=7", "optim.betas=[0.9, 0.95]", "model.drop_rate=0.1"])
    assert (cfg.task_name, cfg.train.epochs, cfg.train.batch_size) == ("t", 7, 16)
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML reads '1e-3' as a string
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.args == {"drop_rate": 0.1}  # unset arguments: the model's own defaults
    assert cfg.train.seed == Config().train.seed


def test_cli_flags_sit_between_yaml_and_key_value(tmp_path, capsys, monkeypatch):
    import vitlab.cli as cli
    seen = {}
    monkeypatch.setattr("vitlab.train.train", lambda cfg, reload=False, local=False, **_: seen.setdefault("cfg", cfg))
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
    assert yaml.safe_load(cfg.dump())["model"] == {"name": "vit_micro_patch2_8", "img_size": 32, "pretrained": None}


@pytest.mark.parametrize("name,override,value", [
    ("momentum_vit_micro_patch2_8", "model.beta=0.5", 0.5),
    ("momentum_vit_micro_patch2_8", "model.beta=1", 1.0),  # an int where the signature says float
    ("bdia_vit_micro_patch2_8", "model.bits=8", 8),
    ("staged_vit_patch4_32", "model.widths=[64,128,256]", [64, 128, 256]),
    ("rev_vit_micro_patch2_8", "model.memory_efficient=false", False),
    ("vit_micro_patch2_8", "model.init_values=1e-5", 1e-5),
    ("vit_micro_patch2_8", "model.stem=conv", "conv"),  # an old spelling of tokenizer
])
def test_any_model_argument_is_settable_and_typed_from_the_signature(name, override, value):
    cfg = load_config(None, [f"model.name={name}", override])
    key = override.split("=")[0].split(".")[1]
    got = cfg.model.args[key]
    assert got == value and type(got) is type(value)
    import yaml
    assert yaml.safe_load(cfg.dump())["model"][key] == value  # recorded in config.yaml


@pytest.mark.parametrize("name,override,message", [
    ("momentum_vit_micro_patch2_8", "model.bet=0.5",
     "unknown config key 'model.bet': model 'momentum_vit_micro_patch2_8' has no such argument (did you mean 'beta'?)"),
    ("vit_micro_patch2_8", "model.beta=0.5", "model 'vit_micro_patch2_8' has no such argument"),
    ("momentum_vit_micro_patch2_8", "model.beta=fast", "config key 'model.beta' must be float, got 'fast'"),
    ("staged_vit_patch4_32", "model.widths=[64,wide]", "config key 'model.widths' must be"),
    ("vit_micro_patch2_8", "model.global_pool=mean", "config key 'model.global_pool' must be one of 'token', 'avg'"),
    ("vit_micro_patch2_8", "model.patch_embed=spt2", "config key 'model.patch_embed' must be one of 'patch', 'conv', "
                                                     "'spt'"),  # patch_embed: tokenizer's old spelling
])
def test_bad_model_arguments_are_one_line_errors(name, override, message):
    with pytest.raises(VitlabError) as e:
        load_config(None, [f"model.name={name}", override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_module_knows_no_registry():
    """Name resolution is a step after parsing: `vitlab.config` imports neither models nor datasets."""
    import ast
    from pathlib import Path
    tree = ast.parse((Path(__file__).parents[1] / "src" / "vitlab" / "config.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"registry", "data", "models", "resolve"}
    assert build_config(None, [("model.name", "no_such_model"), ("model.whatever", 1)]).model.args == {"whatever": 1}


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
    ("output.layout=seed003", "config key 'output.layout' must be one of 'vitlab', 'by_architecture'"),
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
    # old spellings stay accepted
    assert load_config(None, ["output.layout=seed002"]).output.layout == "by_architecture"
