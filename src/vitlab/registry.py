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
    check_sizes(args)
    img, patch = args.get("img_size"), args.get("patch_size")
    if img is not None and patch is not None and img % patch:
        raise VitlabError(f"image size {img} is not divisible by patch size {patch}; "
                          f"set model.img_size/data.img_size to a multiple of {patch} "
                          f"(e.g. {max(patch, img // patch * patch)}) or choose another patch_size")
    return args


#: bounds on a model's sizes, checked from its arguments before anything is built (`check_sizes`): training,
#: evaluating a checkpoint (whose metadata may be forged) and `vitlab models` share them
MAX_MODEL_NUMBER = 1 << 16  # no size argument (width, heads, classes...) of a real model is larger
MAX_IMG_SIZE = 8192  # px per side: 64 M pixels, about the most vitlab decodes of one image
MAX_DEPTH = 1024  # blocks in all (each is modules to build, even on the meta device: ~3 s per thousand)
MAX_LIST = 256  # entries of a per-stage list
MAX_TOKENS = 1 << 16  # a 256 x 256 grid; attention over more is > 4e9 scores per head and image
MAX_PARAMS = 10 ** 10  # 40 GB of float32 weights before gradients and optimizer state (ViT-22B is 2.2e10)
#: arguments that are sizes: positive integers
SIZE_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "num_heads", "head_dim", "stage_depth", "tokens",
             "router_hdim", "low_rank_dim")


def _positive_int(key: str, value: Any, what: str = "a positive integer") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise VitlabError(f"model.{key} must be {what}, got {value!r}")
    if value > MAX_MODEL_NUMBER:
        raise VitlabError(f"model.{key}={value} is beyond any model vitlab builds (at most {MAX_MODEL_NUMBER}); "
                          f"lower it")
    return value


def check_sizes(args: dict[str, Any]) -> None:
    """One line, before anything is built, for model sizes that cannot build or fit: a size that is not a
    positive integer (num_heads=0, patch_size=0, embed_dim=0), mlp_ratio <= 0, more blocks than MAX_DEPTH,
    an image larger than MAX_IMG_SIZE, more tokens than MAX_TOKENS, or more parameters than MAX_PARAMS by a
    cheap estimate (blocks x (4 + 2 mlp_ratio) x width^2 + position table + patch projection + head)."""
    img = args.get("img_size")
    if isinstance(img, int) and img > MAX_IMG_SIZE:
        raise VitlabError(f"model.img_size={img} is larger than the {MAX_IMG_SIZE} px vitlab trains on (each image "
                          f"would be {img * img / 1e9:.1f} G pixels); lower model.img_size (or data.img_size)")
    for key in SIZE_ARGS:
        if args.get(key) is not None:
            _positive_int(key, args[key])
    classes = args.get("num_classes")
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 0):
        raise VitlabError(f"model.num_classes must be an integer >= 0 (0: no head, the features), got {classes!r}")
    if classes:
        _positive_int("num_classes", classes)
    depth = args.get("depth", 0)
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 0):
        raise VitlabError(f"model.depth must be an integer >= 0 (blocks), got {depth!r}")
    lists = {k: args[k] for k in ("widths", "depths", "stages") if isinstance(args.get(k), (list, tuple))}
    for key, value in lists.items():
        if len(value) > MAX_LIST:
            raise VitlabError(f"model.{key} has {len(value)} entries, more than the {MAX_LIST} stages vitlab builds")
    for w in lists.get("widths", []):
        _positive_int("widths", w, "a list of positive integers")
    for d in lists.get("depths", []):
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_DEPTH:
            raise VitlabError(f"model.depths must be a list of integers >= 0 (blocks per stage), got {d!r}")
    stages = lists.get("stages", [])
    for stage in stages:
        if not isinstance(stage, (list, tuple)) or len(stage) != 3:
            raise VitlabError(f"model.stages must be a list of (patch_in, patch_out, ratio) triples, got {stage!r}")
        _positive_int("stages", stage[0], "a list of (patch_in, patch_out, ratio) with positive patch sizes")
        _positive_int("stages", stage[1], "a list of (patch_in, patch_out, ratio) with positive patch sizes")
    ratio = args.get("mlp_ratio", 4.0)
    if ratio is not None and not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio):
        raise VitlabError(f"model.mlp_ratio must be positive (the MLP is mlp_ratio x embed_dim wide; 4 is usual), "
                          f"got {ratio!r}")
    ratio = float(ratio or 4.0)
    blocks = (depth or 0) + sum(lists.get("depths", [])) + (args.get("stage_depth") or 0) * len(stages)
    if blocks > MAX_DEPTH:
        raise VitlabError(f"the model asks for {blocks} blocks, more than the {MAX_DEPTH} vitlab builds; lower "
                          f"model.depth" + ("s" if "depths" in lists else ""))
    patch = args.get("patch_size")
    tokens = _tokens(args)
    if tokens > MAX_TOKENS:
        raise VitlabError(f"img_size {img} in patches of {patch} makes {tokens:,} tokens per image, more than the "
                          f"{MAX_TOKENS:,} vitlab attends over; raise model.patch_size or lower the image size")
    widths = lists.get("widths") or [args.get("embed_dim") or 0]
    if widths[0] and int(min(widths) * ratio) < 1:
        raise VitlabError(f"model.mlp_ratio={ratio:g} makes an MLP of {int(min(widths) * ratio)} units at width "
                          f"{min(widths)}; raise it (4 is usual)")
    depths = lists.get("depths") or [blocks]
    params = sum(d * (4 + 2 * ratio) * w * w for w, d in zip(widths, depths))
    width, last = widths[0], widths[-1]
    params += blocks * 2 * width * ((args.get("router_hdim") or 0) + (args.get("low_rank_dim") or 0))
    params += tokens * width + (patch or 0) ** 2 * (args.get("in_chans") or 3) * width
    params += last * (args.get("num_classes") or 0)
    if params > MAX_PARAMS:
        raise VitlabError(f"these model sizes make ~{params:.2g} parameters, more than the {MAX_PARAMS:.0e} vitlab "
                          f"builds ({4 * params / 1e9:.0f} GB of weights alone); lower model.embed_dim"
                          f"{'/widths' if 'widths' in lists else ''} or depth")


def _tokens(args: dict[str, Any]) -> int:
    """Tokens per image, from the sizes alone: the patch grid; a content quadtree's budget; GDT's plan
    (unsplit patches of each stage plus the last stage's children)."""
    img, patch = args.get("img_size"), args.get("patch_size")
    stages = args.get("stages")
    if img and stages:
        n, total = (img // stages[0][0]) ** 2, 0
        for p_in, p_out, ratio in stages:
            ratio = ratio if isinstance(ratio, (int, float)) and 0 <= ratio <= 1 else 1.0
            k = int(n * ratio)
            total += n - k
            n = k * (p_in // p_out) ** 2 if p_out <= p_in else k
        return total + n
    if args.get("tokenizer") == "quadtree" and args.get("tokens"):
        return args["tokens"]
    return (img // patch) ** 2 if img and patch else 0


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
