"""Name resolution: the step after parsing that checks a config against the registries.

`config` knows the schema only; this module checks the model and dataset names and types every model
argument from the registered builder's signature (`model.beta=0.5` becomes a float because `MomentumViT`
says `beta: float`), with did-you-mean errors. Old argument names are renamed here (`task` is `head`); the
tokenizer's old names (`stem`, `patch_embed`) are typed as `tokenizer` and kept as written: the registry
reads them (an old `patch_embed=spt` means the SPT paper's shifts).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

from .config import Config, build_config, coerce, load_config
from .data import canonical_dataset, dataset_names
from .errors import VitlabError, did_you_mean
from .registry import ARG_ALIASES, OLD_TOKENIZER_KEYS, builder_annotations, builder_parameters, model_entry

#: model arguments the trainer fills from the dataset when the config leaves them out
FROM_DATA = ("img_size", "in_chans", "num_classes")


def resolve_model_args(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """`args` renamed, checked against `name`'s builder and typed from its annotations; None values dropped
    (None: the model's default)."""
    entry = model_entry(name)
    params, hints = builder_parameters(entry.builder), builder_annotations(entry.builder)
    typed = {}
    for key, value in args.items():
        key = ARG_ALIASES.get(key, key)
        if value is None:  # unset: the model's default (a sweep may unset an argument of its base's model)
            continue
        meaning = "tokenizer" if key in OLD_TOKENIZER_KEYS else key
        if meaning not in params:
            raise VitlabError(f"unknown config key 'model.{key}': model '{entry.name}' has no such argument"
                              f"{did_you_mean(key, params)}; `vitlab models` lists models, their docstrings the "
                              f"arguments")
        typed[key] = coerce(value, hints.get(meaning, Any), f"model.{key}")
        if key.endswith(("drop_rate", "drop_path_rate")) and isinstance(typed[key], float) and not 0 <= typed[key] < 1:
            raise VitlabError(f"config key 'model.{key}' is a probability and must be in [0, 1), got {typed[key]}")
    return typed


def is_resolved(cfg: Config) -> bool:
    """Whether `cfg` came out of `resolve_config` (a copy made with `dataclasses.replace` did not)."""
    return getattr(cfg, "_resolved", False)


def resolve_config(cfg: Config) -> Config:
    """A copy of `cfg` with its names checked and its model arguments typed; a config that is already
    resolved comes back as it is, so each config is resolved exactly once."""
    if is_resolved(cfg):
        return cfg
    dataset = canonical_dataset(cfg.data.dataset)
    if dataset is None:
        raise VitlabError(f"unknown dataset '{cfg.data.dataset}'{did_you_mean(cfg.data.dataset, dataset_names())}; "
                          f"choose one of: {', '.join(dataset_names())}, or hf:<owner>/<name> (a Hugging Face dataset)")
    cfg = with_hub_settings(cfg)
    model = dataclasses.replace(cfg.model, args=resolve_model_args(cfg.model.name, cfg.model.args))
    resolved = dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, dataset=dataset))
    resolved._resolved = True  # not a field: not dumped, not copied by dataclasses.replace
    return resolved


def with_hub_settings(cfg: Config) -> Config:
    """`model.pretrained=hf-hub:...` or `<architecture>.<tag>`: what the repository's config.json says, where
    the config leaves it open. model.name still at its default becomes the Hub model's architecture (with the
    arguments config.json gives it, under the config's own), and data.normalization still `dataset` becomes
    the model's (half or imagenet), as timm feeds it. The resolved config.yaml then names both, so a run
    re-resolved later (evaluate, resume) makes no request; one whose mean/std is neither keeps `dataset`, and
    reads config.json again from the cache."""
    from .config import ModelConfig
    from .hub_models import architecture_args, hub_config, hub_name, settings

    name = hub_name(cfg.model.pretrained)
    pick_model, pick_norm = cfg.model.name == ModelConfig.name, cfg.data.normalization == "dataset"
    if name is None or not (pick_model or pick_norm):
        return cfg
    hub = settings(hub_config(name))
    model, data = cfg.model, cfg.data
    if pick_model:
        architecture, args = architecture_args(hub, name)
        model = dataclasses.replace(model, name=architecture, args={**args, **model.args})
    if pick_norm and hub.normalization:
        data = dataclasses.replace(data, normalization=hub.normalization)
    return dataclasses.replace(cfg, model=model, data=data)


def build(tree: dict[str, Any] | None = None, overrides: Iterable[tuple[str, Any]] = ()) -> Config:
    """`config.build_config`, then `resolve_config`."""
    return resolve_config(build_config(tree, overrides))


def load(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """A YAML file plus `section.key=value` strings, parsed and resolved."""
    return resolve_config(load_config(path, overrides))


