"""Loading pretrained weights from local files into a vitlab model.

Formats: `.safetensors` (timm / Hugging Face / vitlab), `.pth`/`.pt`/`.bin` (a state dict, possibly under
'model' or 'state_dict'; the Res-ViT project's JAX-converted `.pth`, `transformer.encoder_layers.i.attn.query...`, is
recognised by its keys), and `.npz` from the original JAX ViT (google-research/vision_transformer) or
big_vision, all converted to our (= timm's) key layout. On the way in:
  * `module.` / `_orig_mod.` prefixes (DDP, torch.compile) are stripped;
  * the position embedding is resampled (bicubic, antialiased) to the model's grid;
  * 3-channel patch weights are summed for a 1-channel model (and tiled for more channels);
  * a classifier head whose shape does not match (other num_classes) is dropped and keeps its fresh init;
  * blocks beyond a shallower model's depth are dropped (a depth-cut student starts from its teacher's first
    blocks);
  * parameters a family adds to the reference ViT (Res-ViT's routers, LoRA adapters) may be missing: they
    keep their initialisation (`model.new_parameter_prefixes`).
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import VitlabError
from .layers import resample_pos_embed


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """A flat {key: tensor} from any supported file, or a Hub name (`vitlab.hub_models`: its weights file in the
    Hugging Face cache), in timm's key layout."""
    from .hub_models import HubName, hub_name, hub_weights, unknown_architecture

    name = path if isinstance(path, HubName) else hub_name(str(path))
    path = hub_weights(name) if name is not None else Path(path).expanduser()
    if not path.is_file() and unknown_architecture(str(path)):
        raise VitlabError(unknown_architecture(str(path)))
    if not path.is_file():
        raise VitlabError(f"pretrained file '{path}' not found; pass a local .safetensors, .pth or .npz file, or a "
                          f"Hub name (hf-hub:<owner>/<name>, or timm's <architecture>.<tag>)")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt", ".bin", ".npz"):
        raise VitlabError(f"unsupported checkpoint format '{suffix}' ({path}); use .safetensors, .pth or .npz")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        elif suffix == ".npz":
            sd = convert_jax_npz(dict(np.load(path)))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: a pickle runs no code
            for key in ("model", "state_dict", "model_state"):
                if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                    sd = sd[key]
    except VitlabError:
        raise
    except pickle.UnpicklingError:  # weights_only refused it: it holds Python objects, loading could run code
        raise VitlabError(f"pretrained file '{path}' holds Python objects besides tensors and was refused (loading "
                          f"it could run code); convert it to .safetensors where it came from") from None
    except Exception as exc:  # truncated or empty
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise VitlabError(f"pretrained file '{path}' cannot be read as {suffix} ({type(exc).__name__}: {first}); "
                          f"is it complete, and a weights file?") from None
    if not isinstance(sd, dict):
        raise VitlabError(f"pretrained file '{path}' holds a {type(sd).__name__}, not a dict of weights")
    sd = {_strip(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not any(k.startswith("transformer.encoder_layers.") for k in sd):
        return sd
    try:
        return convert_encoder_layers(sd)
    except KeyError as exc:
        raise VitlabError(f"'{path}' looks like the Res-ViT project's ViT layout but has no {exc}; is the file "
                          f"complete?") from None


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def convert_jax_npz(w: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Original ViT (`Transformer/encoderblock_i/...`) or big_vision (`params/...`) arrays -> timm keys."""
    prefix = next((p for p in ("", "opt/target/", "params/") if f"{p}embedding/kernel" in w), None)
    if prefix is None:
        raise VitlabError("the .npz file has no 'embedding/kernel': not a JAX ViT checkpoint")
    big_vision = f"{prefix}pos_embedding" in w
    mha, mlp, ln2 = ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1") if big_vision else \
        ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    sd = {"patch_embed.proj.weight": t(w[f"{prefix}embedding/kernel"].transpose(3, 2, 0, 1)),  # HWIO -> OIHW
          "patch_embed.proj.bias": t(w[f"{prefix}embedding/bias"]),
          "pos_embed": t(w[f"{prefix}pos_embedding" if big_vision else
                           f"{prefix}Transformer/posembed_input/pos_embedding"]),
          "norm.weight": t(w[f"{prefix}Transformer/encoder_norm/scale"]),
          "norm.bias": t(w[f"{prefix}Transformer/encoder_norm/bias"])}
    if f"{prefix}cls" in w:
        sd["cls_token"] = t(w[f"{prefix}cls"])
    if f"{prefix}head/kernel" in w:
        sd["head.weight"], sd["head.bias"] = t(w[f"{prefix}head/kernel"].T), t(w[f"{prefix}head/bias"])
    depth = sum(1 for k in w if k.startswith(f"{prefix}Transformer/encoderblock_") and k.endswith("LayerNorm_0/scale"))
    for i in range(depth):
        b, o = f"{prefix}Transformer/encoderblock_{i}/", f"blocks.{i}."
        a = f"{b}{mha}/"
        D = w[f"{a}query/kernel"].shape[0]
        # query/key/value kernels are (D, heads, head_dim); qkv is Linear(D, 3D) with weight (3D, D).
        sd[o + "attn.qkv.weight"] = t(np.concatenate([w[f"{a}{n}/kernel"].reshape(D, -1).T
                                                     for n in ("query", "key", "value")]))
        sd[o + "attn.qkv.bias"] = t(np.concatenate([w[f"{a}{n}/bias"].reshape(-1) for n in ("query", "key", "value")]))
        sd[o + "attn.proj.weight"] = t(w[f"{a}out/kernel"].reshape(-1, D).T)  # (heads, head_dim, D) -> (D, D)
        sd[o + "attn.proj.bias"] = t(w[f"{a}out/bias"])
        for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", ln2)):
            sd[o + f"{ours}.weight"], sd[o + f"{ours}.bias"] = t(w[f"{b}{theirs}/scale"]), t(w[f"{b}{theirs}/bias"])
        for r in range(2):
            sd[o + f"mlp.fc{r + 1}.weight"] = t(w[f"{b}{mlp}/Dense_{r}/kernel"].T)
            sd[o + f"mlp.fc{r + 1}.bias"] = t(w[f"{b}{mlp}/Dense_{r}/bias"])
    return sd


def convert_encoder_layers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Res-ViT project's layout (the JAX ViT converted to PyTorch by asyml/vision-transformer-pytorch) -> timm keys.

    Attention kernels keep JAX's head axes: query/key/value weights (D, H, d) with biases (H, d), and the output
    weight (H, d, D); x @ W.reshape(D, D) is a Linear with weight W.reshape(D, D).T."""
    out = {"patch_embed.proj.weight": sd["embedding.weight"], "patch_embed.proj.bias": sd["embedding.bias"],
           "pos_embed": sd["transformer.pos_embedding.pos_embedding"],
           "norm.weight": sd["transformer.norm.weight"], "norm.bias": sd["transformer.norm.bias"]}
    if "cls_token" in sd:
        out["cls_token"] = sd["cls_token"]
    if "classifier.weight" in sd:
        out["head.weight"], out["head.bias"] = sd["classifier.weight"], sd["classifier.bias"]
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.encoder_layers."))
    for i in range(depth):
        src, dst = f"transformer.encoder_layers.{i}.", f"blocks.{i}."
        D = sd[src + "attn.query.weight"].shape[0]
        out[dst + "attn.qkv.weight"] = torch.cat([sd[f"{src}attn.{n}.weight"].reshape(D, D).T
                                                  for n in ("query", "key", "value")])
        out[dst + "attn.qkv.bias"] = torch.cat([sd[f"{src}attn.{n}.bias"].reshape(D) for n in ("query", "key", "value")])
        out[dst + "attn.proj.weight"] = sd[src + "attn.out.weight"].reshape(D, D).T  # (H, d, D) -> (D, D)
        out[dst + "attn.proj.bias"] = sd[src + "attn.out.bias"]
        for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                out[f"{dst}{part}.{p}"] = sd[f"{src}{part}.{p}"]
    return {k: v.contiguous() for k, v in out.items()}


def adapt_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Make a checkpoint fit `model` where that is well defined; returns the adapted dict and what changed."""
    own = model.state_dict()
    notes = []
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        prefix = getattr(model, "num_prefix_tokens", 1)
        new_grid = math.isqrt(own["pos_embed"].shape[1] - prefix)
        old = sd["pos_embed"].shape[1] - prefix
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], new_grid, prefix)
        notes.append(f"pos_embed resampled from a {math.isqrt(old)}x{math.isqrt(old)} to a {new_grid}x{new_grid} grid")
    key = "patch_embed.proj.weight"
    if key in sd and key in own and sd[key].shape[1] != own[key].shape[1]:
        w, c = sd[key], own[key].shape[1]
        if w.shape[2:] != own[key].shape[2:]:
            raise VitlabError(f"checkpoint patch size {tuple(w.shape[2:])} differs from the model's "
                              f"{tuple(own[key].shape[2:])}; build the model with the checkpoint's patch_size")
        sd[key] = w.sum(1, keepdim=True) if c == 1 else w.repeat(1, math.ceil(c / w.shape[1]), 1, 1)[:, :c] * (w.shape[1] / c)
        notes.append(f"patch embedding adapted from {w.shape[1]} to {c} input channels")
    block_index = lambda k: int(k.split(".")[1]) if k.startswith("blocks.") else -1  # noqa: E731
    depth = 1 + max(map(block_index, own), default=-1)
    if depth and any(block_index(k) >= depth for k in sd):
        extra = sorted({block_index(k) for k in sd if block_index(k) >= depth})
        sd = {k: v for k, v in sd.items() if block_index(k) < depth}
        notes.append(f"blocks {extra[0]}-{extra[-1]} dropped (the model has {depth})")
    for k in ("head.weight", "head.bias"):
        if k in sd and (k not in own or sd[k].shape != own[k].shape):
            del sd[k]
            notes.append(f"{k} dropped (checkpoint shape differs from the model's)")
    return sd, notes


def load_pretrained(model: nn.Module, path: str | Path, strict: bool = True) -> list[str]:
    """Load a checkpoint (a local file or a Hub name) into `model`; returns notes on what was adapted, including
    the parameters a family adds that keep their initialisation.

    With `strict`, every model parameter except a dropped head must come from the file, and the file may
    hold no keys the model lacks; mismatches are a VitlabError listing the first few keys."""
    sd, notes = adapt_state_dict(read_state_dict(path), model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    added = tuple(getattr(model, "new_parameter_prefixes", ()))
    fresh = sorted({p for p in added for k in missing if k.startswith(p)})
    if fresh:
        notes.append(f"{', '.join(p + '*' for p in fresh)} not in the checkpoint: kept their initialisation")
    new = ("head.", *added)
    missing = [k for k in missing if not k.startswith(new) and ".lora_" not in k]
    if strict and (missing or unexpected):
        raise VitlabError(f"'{path}' does not fit model {getattr(model, 'vitlab_name', type(model).__name__)}: "
                          f"missing {missing[:4]}, unexpected {unexpected[:4]}; check the model size and patch size")
    return notes
