"""Model registry: every model is built by name through `create_model`.

A registered entry is a builder (a class or function) plus default keyword arguments; `create_model`
merges user overrides over the defaults (None overrides are dropped so defaults win), checks them against
the builder's signature, builds the model and records the name and resolved arguments on it
(`model.vitlab_name`, `model.vitlab_args`) so checkpoints can rebuild it.
"""
from __future__ import annotations

import fnmatch
import inspect
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .errors import VitlabError, did_you_mean


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}
_ALIASES: dict[str, str] = {}
_ALIAS_NOTES: dict[str, str] = {}  # alias -> a line printed (once) when the alias is used


def register_model(name: str, builder: Callable[..., nn.Module], aliases: tuple[str, ...] = (),
                   **defaults: Any) -> None:
    if name in _REGISTRY or name in _ALIASES:
        raise RuntimeError(f"model name {name!r} registered twice")
    unknown = set(defaults) - set(builder_parameters(builder))
    if unknown:
        raise RuntimeError(f"model {name!r} registered with defaults its builder does not take: {sorted(unknown)}")
    _REGISTRY[name] = ModelEntry(name, builder, dict(defaults))
    for alias in aliases:
        _ALIASES[alias] = name


def unregister_model(name: str) -> None:
    """Remove a registered name (a model a test or a notebook registered for a while)."""
    del _REGISTRY[name]


def register_alias(alias: str, name: str, note: str | None = None) -> None:
    """Another name for a registered model; `note`, if given, is printed on stderr the first time it is used."""
    if alias in _REGISTRY or alias in _ALIASES:
        raise RuntimeError(f"model name {alias!r} registered twice")
    _ALIASES[alias] = name
    if note:
        _ALIAS_NOTES[alias] = note


def resolve_name(name: str) -> str:
    """The canonical name for a name or alias; a one-line error naming the closest model otherwise."""
    _ensure_loaded()
    if name in _REGISTRY:
        return name
    if name in _ALIASES:
        note = _ALIAS_NOTES.pop(name, None)
        if note:
            print(f"vitlab: note: {note}", file=sys.stderr)
        return _ALIASES[name]
    hint = did_you_mean(name, list(_REGISTRY) + list(_ALIASES))
    raise VitlabError(f"unknown model '{name}'{hint}; `vitlab models` lists the available names")


def list_models(pattern: str = "*", aliases: bool = False) -> list[str]:
    """Registered names matching a shell-style pattern (e.g. 'vit_small*'), sorted."""
    _ensure_loaded()
    names = list(_REGISTRY) + (list(_ALIASES) if aliases else [])
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def model_entry(name: str) -> ModelEntry:
    return _REGISTRY[resolve_name(name)]


#: old argument spellings still accepted -> the current name
ARG_ALIASES = {"target_leaf_size": "patch_size", "task": "head"}
#: old spellings of the tokenizer; `spt` there meant the SPT paper's half-patch diagonal shifts
OLD_TOKENIZER_KEYS, OLD_TOKENIZER_VALUES = ("stem", "patch_embed"), {"spt": "spt_paper"}
#: arguments that saved runs record with every value, dropped where a builder no longer takes them and the
#: value is the one the builder implies (a GDT-ViT run's `tokenizer: patch`)
IMPLIED = {"tokenizer": "patch", "tokens": None, "quadtree_sizes": None, "quadtree_score": "edge", "head": "classify"}


#: arguments added since runs recorded `task` and `patch_embed`, at the value such runs were built with
#: (presets of the original projects now default to their originals' values)
SAVED_BEFORE = {"norm_eps": 1e-6, "stage_encoder": "vit"}


def _current_spelling(overrides: dict[str, Any]) -> dict[str, Any]:
    """Old argument spellings -> today's: `task` -> `head`; `patch_embed` / `stem` -> `tokenizer` (a run
    saved both `patch_embed` and `tokenizer`: the one that is not the plain patch grid wins). A run saved
    before the rename (its full arguments name both `task` and `patch_embed`) gets the values of that time
    for arguments added since, so it rebuilds the model it trained."""
    if "task" in overrides and "patch_embed" in overrides:
        if overrides["patch_embed"] == "spt":
            raise VitlabError("this run was saved with the shifted-patch tokenizer's old layout (before vitlab's "
                              "tokenizer change), which its weights were trained for and which no longer "
                              "exists; retrain it, or evaluate it with vitlab at commit fd50023")
        overrides = {**SAVED_BEFORE, **overrides}
    out = {ARG_ALIASES.get(k, k): v for k, v in overrides.items() if k not in OLD_TOKENIZER_KEYS}
    for key in OLD_TOKENIZER_KEYS:
        old = overrides.get(key)
        if old is None:
            continue
        new = out.get("tokenizer")
        if new is None or new == "patch":  # the old spelling alone (or beside the default): it chooses
            out["tokenizer"] = OLD_TOKENIZER_VALUES.get(old, old) if old != "patch" or new is None else new
        elif old != "patch":
            raise VitlabError(f"model.{key}={old} and model.tokenizer={new} both choose the tokenizer ({key} is "
                              f"its old name); keep model.tokenizer alone")
    return out


def builder_parameters(builder: Callable[..., nn.Module]) -> dict[str, inspect.Parameter]:
    """Every keyword a builder takes: a class's `__init__` parameters, and where it passes `**kwargs` on to
    its parents, theirs too (walking the MRO), so a subclass declares only its own arguments. A class's
    `derived_arguments` are parents' arguments it computes itself (the staged ViT's depth from its stages)."""
    if not isinstance(builder, type):
        return {k: p for k, p in inspect.signature(builder).parameters.items()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    params: dict[str, inspect.Parameter] = {}
    derived = set(getattr(builder, "derived_arguments", ()))
    for cls in builder.__mro__:
        if "__init__" not in vars(cls) or cls is nn.Module:
            continue
        own = list(inspect.signature(vars(cls)["__init__"]).parameters.values())[1:]  # without self
        for p in own:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in params and p.name not in derived:
                params[p.name] = p
        if not any(p.kind is p.VAR_KEYWORD for p in own):
            break
    return params


def builder_annotations(builder: Callable[..., nn.Module]) -> dict[str, Any]:
    """name -> type annotation of every builder keyword (for typing config values)."""
    hints: dict[str, Any] = {}
    for fn in ([vars(c)["__init__"] for c in builder.__mro__ if "__init__" in vars(c)] if isinstance(builder, type)
               else [builder]):
        try:
            hints = {**typing.get_type_hints(fn), **hints}
        except Exception:  # an annotation that does not evaluate: leave those keys untyped
            continue
    return hints


def model_args(name: str, **overrides: Any) -> dict[str, Any]:
    """The full keyword arguments `create_model(name, **overrides)` would build with, validated."""
    entry = model_entry(name)
    params = builder_parameters(entry.builder)
    overrides = _current_spelling({k: v for k, v in overrides.items() if v is not None})
    for key in list(overrides):
        if key not in params and (key in IMPLIED and overrides[key] == IMPLIED[key] or
                                  key in SAVED_BEFORE and overrides[key] == SAVED_BEFORE[key]):
            del overrides[key]
        elif key not in params:
            raise VitlabError(f"model '{entry.name}' has no argument '{key}'{did_you_mean(key, params)}")
    args = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty
            and isinstance(p.default, (int, float, str, bool, tuple, type(None)))}
    args.update(entry.defaults)
    args.update(overrides)
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}  # JSON/YAML-friendly
    img, patch = args.get("img_size"), args.get("patch_size")
    if img is not None and patch is not None and img % patch:
        raise VitlabError(f"image size {img} is not divisible by patch size {patch}; "
                          f"set model.img_size/data.img_size to a multiple of {patch} "
                          f"(e.g. {max(patch, img // patch * patch)}) or choose another patch_size")
    return args


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model, e.g. `create_model("vit_small_patch16_224", num_classes=10)`."""
    entry = model_entry(name)
    args = model_args(entry.name, **overrides)
    model = entry.builder(**args)
    model.vitlab_name = entry.name
    model.vitlab_args = args
    return model


def split_size(name: str) -> tuple[str, str] | None:
    """('vit_classic', '10M') for a name ending in a parameter-count label (the classic-vs-differential
    scaling families), else None."""
    m = re.fullmatch(r"(.+)_(\d+[mb])", name)
    return (m.group(1), m.group(2).upper()) if m else None


def _ensure_loaded() -> None:
    from . import models  # noqa: F401  (importing registers the families)
