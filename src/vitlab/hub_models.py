"""Pretrained models by Hub name, the way timm users name them.

  hf-hub:<owner>/<name>[@<revision>]     any model repository with a timm-style config.json and weights
  <architecture>.<tag>                   timm's pretrained names, e.g. vit_small_patch16_224.augreg_in21k_ft_in1k,
                                         which live in the Hub repository timm/<architecture>.<tag>

Files come through `huggingface_hub` into its standard cache (HF_HOME / HF_HUB_CACHE), so a second run, or
one with HF_HUB_OFFLINE=1, reads them from there. HF_TOKEN (environment or `.env`, as for `vitlab upload`)
opens gated and private repositories. The repository's config.json gives the architecture, its arguments, the
classes and label names, the input size and the normalisation; the weights (model.safetensors, else
pytorch_model.bin, read with weights_only) go through `vitlab.pretrained`'s adapters like a local file: the
position embedding resampled, a head of another class count dropped.

Every failure is one line: a malformed name, an unknown repository, a gated one, a missing revision or file, an
offline cache without the files, an architecture vitlab does not have.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import VitlabError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TIMM_NAME = re.compile(r"[a-z0-9_]+\.[a-z0-9_]+")  # <architecture>.<tag>
REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
HALF, IMAGENET = ((0.5,) * 3, (0.5,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
LOCAL_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


@dataclass(frozen=True)
class HubName:
    repo: str
    revision: str | None
    text: str  # as the user wrote it

    def __str__(self) -> str:
        return self.text


def hub_name(text: Any) -> HubName | None:
    """The Hub repository `text` names, or None when it is not a Hub name (a local path). A local file
    that exists is never a Hub name; `<architecture>.<tag>` is one only for an architecture vitlab has (else
    it is a missing local file, and no request is made); an `hf-hub:` name that is malformed is a
    VitlabError."""
    if not isinstance(text, str) or not text or Path(text).expanduser().exists():
        return None
    if text.startswith("hf-hub:"):
        repo, _, revision = text.removeprefix("hf-hub:").partition("@")
        if not valid_repo(repo) or (revision and not re.fullmatch(r"[\w./-]{1,100}", revision)) or ".." in revision:
            raise VitlabError(f"'{text[:120]}' is not a Hub name; write hf-hub:<owner>/<name> or "
                              f"hf-hub:<owner>/<name>@<revision>")
        return HubName(repo, revision or None, text)
    if TIMM_NAME.fullmatch(text) and not text.endswith(LOCAL_SUFFIXES):
        from .registry import list_models
        if text.split(".")[0] in list_models("*", aliases=True):
            return HubName(f"timm/{text}", None, text)
    return None


def unknown_architecture(text: str) -> str | None:
    """For `<architecture>.<tag>` whose architecture vitlab lacks (e.g. deit_tiny_patch16_224.fb_in1k): the
    sentence that says so, for the error the caller raises; else None."""
    if isinstance(text, str) and TIMM_NAME.fullmatch(text) and not text.endswith(LOCAL_SUFFIXES):
        return (f"'{text}' is neither a file here nor a timm name vitlab can load: vitlab has no architecture "
                f"'{text.split('.')[0]}' (`vitlab models` lists them)")
    return None


def valid_repo(repo: str) -> bool:
    """owner/name as the Hub allows it (huggingface_hub's own check: no '--', '..', or edge '.' and '-')."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not REPO.fullmatch(repo):
        return False
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return False
    return True


def _token() -> str | None:
    """HF_TOKEN from the environment or `.env` (checked and redacted as for uploads), else huggingface_hub's
    own login."""
    from .hub import check_token, read_settings, remember_secret

    token = read_settings().get("HF_TOKEN")
    if token:
        check_token(token)
        remember_secret(token)
    return token


def _download(name: HubName, filename: str) -> Path:
    """One file of the repository through huggingface_hub's cache; its errors as one line each (the client's
    retry warnings are counted, not printed)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    from .hub import quiet_retries, transport_errors

    where = f"'{name}' (Hub repository {name.repo}{'@' + name.revision if name.revision else ''})"
    retries: list[str] = []
    try:
        with quiet_retries(retries):
            return Path(hf_hub_download(name.repo, filename, revision=name.revision, token=_token()))
    except GatedRepoError:
        raise VitlabError(f"{where} is gated: accept its terms on the Hub, then set HF_TOKEN (environment or .env) "
                          f"to a token of that account") from None
    except RepositoryNotFoundError:
        hint = ("timm's names are <architecture>.<tag> as listed by timm.list_pretrained()"
                if not name.text.startswith("hf-hub:") else "check the owner and name (a private one needs HF_TOKEN)")
        raise VitlabError(f"{where} does not exist on the Hub; {hint}") from None
    except RevisionNotFoundError:
        raise VitlabError(f"{where}: no revision '{name.revision}'; name a branch, tag or commit of it") from None
    except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1 or no network) and not in the cache
        tries = f", {len(retries) + 1} tries" if retries else ""
        raise VitlabError(f"{where}: {filename} is not in the Hugging Face cache and the Hub cannot be reached "
                          f"(HF_HUB_OFFLINE=1 or no network{tries}); run once online to cache it, or pass a local "
                          f"file") from None
    except EntryNotFoundError:
        raise VitlabError(f"{where} has no {filename}") from None
    except (HfHubHTTPError, ConnectionError, TimeoutError, *transport_errors()) as exc:  # not local disk errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise VitlabError(f"{where}: the Hub download failed ({type(exc).__name__}: {first}); try again, or "
                          f"set HF_HUB_OFFLINE=1 to use the cache") from None


def hub_config(name: HubName) -> dict[str, Any]:
    """The repository's config.json (timm's layout: architecture, num_classes, model_args, pretrained_cfg,
    label_names), read as untrusted data."""
    from .untrusted import read_bytes

    path = _download(name, "config.json")
    try:
        config = json.loads(read_bytes(path, f"{name}'s config.json", limit=1 << 20).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise VitlabError(f"'{name}': config.json is not valid JSON; is it a model repository?") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise VitlabError(f"'{name}': config.json names no architecture; vitlab reads timm-style repositories "
                          f"(config.json with 'architecture')")
    return config


def hub_weights(name: HubName) -> Path:
    """The repository's weights file in the cache: model.safetensors, else pytorch_model.bin."""
    for filename in WEIGHT_FILES:
        try:
            return _download(name, filename)
        except VitlabError as exc:
            if f"has no {filename}" not in str(exc) or filename == WEIGHT_FILES[-1]:
                raise
    raise AssertionError("unreachable")


@dataclass
class HubSettings:
    """What a Hub model's config.json says about building and feeding it."""
    architecture: str
    model_args: dict[str, Any]
    num_classes: int | None
    input_size: tuple[int, int, int] | None  # (channels, height, width)
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    label_names: list[str] | None

    @property
    def normalization(self) -> str | None:
        """vitlab's data.normalization for the model's mean/std: half, imagenet, or None (neither)."""
        pair = (tuple(round(v, 3) for v in self.mean or ()), tuple(round(v, 3) for v in self.std or ()))
        return {HALF: "half", IMAGENET: "imagenet"}.get(pair)


def settings(config: dict[str, Any]) -> HubSettings:
    """timm's config.json, either layout (pretrained_cfg nested, or the legacy flat one). A repository that
    `vitlab push` wrote also names the vitlab model and all its arguments (any family): those win."""
    pretrained = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else config
    size = pretrained.get("input_size")
    labels = config.get("label_names", pretrained.get("label_names", pretrained.get("labels")))
    args = config.get("model_args") if isinstance(config.get("model_args"), dict) else {}
    ours = config.get("vitlab")
    if isinstance(ours, dict) and isinstance(ours.get("name"), str) and isinstance(ours.get("args"), dict):
        config, args = {**config, "architecture": ours["name"]}, ours["args"]
    classes = config.get("num_classes", pretrained.get("num_classes"))
    return HubSettings(
        architecture=config["architecture"], model_args=dict(args),
        num_classes=classes if isinstance(classes, int) and not isinstance(classes, bool) else None,
        input_size=tuple(size) if isinstance(size, list) and len(size) == 3 else None,
        mean=tuple(pretrained["mean"]) if isinstance(pretrained.get("mean"), list) else None,
        std=tuple(pretrained["std"]) if isinstance(pretrained.get("std"), list) else None,
        label_names=[str(x) for x in labels] if isinstance(labels, list) else None)


def architecture_args(hub: HubSettings, name: HubName) -> tuple[str, dict[str, Any]]:
    """(vitlab's model name, the arguments from config.json that vitlab's builder takes). img_size, in_chans
    and num_classes are left to the caller (the data decides them when training)."""
    from .registry import builder_parameters, list_models, model_entry

    if hub.architecture not in list_models("*", aliases=True):
        raise VitlabError(f"'{name}' is a {hub.architecture}, which vitlab does not have; `vitlab models` lists "
                          f"the architectures it can load")
    params = builder_parameters(model_entry(hub.architecture).builder)
    args = {k: v for k, v in hub.model_args.items() if k not in ("img_size", "in_chans", "num_classes")}
    unknown = sorted(k for k in args if k not in params)
    if unknown:
        raise VitlabError(f"'{name}': its config.json sets {', '.join(unknown)} for {hub.architecture}, which "
                          f"vitlab's {hub.architecture} does not take")
    return hub.architecture, args


def create_pretrained(name: str, pretrained: bool | str = False, **kwargs: Any):
    """`vitlab.create_model`: a registered model; with `pretrained=True` and a Hub name (`hf-hub:...` or
    `<architecture>.<tag>`), that model built from its config.json with its weights; with `pretrained=` a file
    or Hub name, the registered model `name` loaded from it. The model carries `pretrained_cfg` (input size,
    mean, std, label names) when they came from the Hub."""
    from .pretrained import load_pretrained
    from .registry import create_model

    if pretrained is None or pretrained == "":  # as timm: no weights
        pretrained = False
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise VitlabError(f"pretrained={pretrained!r}: pass True (with a Hub name), a Hub name or a file path")
    source = None
    if hub_name(name) is not None:
        if pretrained is False and TIMM_NAME.fullmatch(name):  # as timm: the architecture, without weights
            return create_model(name.split(".")[0], **kwargs)
        if pretrained is not True:
            raise VitlabError(f"'{name}' is a Hub name; pass pretrained=True to download it")
        source = hub_name(name)
    elif isinstance(pretrained, (str, os.PathLike)):
        source = hub_name(os.fspath(pretrained)) or pretrained
    elif pretrained is True:
        raise VitlabError(unknown_architecture(name) or f"pretrained=True needs a Hub name: '{name}.<tag>' "
                          f"(timm's tags) or 'hf-hub:<owner>/<name>'; for a local file pass pretrained='FILE'")
    hub = settings(hub_config(source)) if isinstance(source, HubName) else None
    if hub is not None:
        architecture, args = architecture_args(hub, source)
        if hub_name(name) is None:
            architecture = name  # a registered model loaded from a Hub repository's weights (adapters apply)
            args = {}
        defaults = {**args, **({"num_classes": hub.num_classes} if hub.num_classes else {}),
                    **({"img_size": hub.input_size[-1], "in_chans": hub.input_size[0]} if hub.input_size else {})}
        model = create_model(architecture, **{**defaults, **kwargs})
    else:
        model = create_model(name, **kwargs)
    if source is not None:
        model.pretrained_notes = load_pretrained(model, source)
    if hub is not None:
        model.pretrained_cfg = {"source": str(source), "input_size": hub.input_size, "mean": hub.mean,
                                "std": hub.std, "label_names": hub.label_names}
    return model
