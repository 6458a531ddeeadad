"""vitlab: train, compare and fine-tune Vision Transformer variants.

torch is imported on first use (`create_model`, `vitlab.train`, ...), not with the package: the CLI installs
its signal handlers before anything slow runs, so a job stopped while starting still exits cleanly.
"""
from .errors import VitlabError

__version__ = "0.1.0"


def load_pretrained(model, path, **kwargs):
    """Load a local .safetensors / .pth / JAX .npz checkpoint into `model` (see `vitlab.pretrained`)."""
    from .pretrained import load_pretrained as _load
    return _load(model, path, **kwargs)


def create_model(name, pretrained=False, **kwargs):
    """A registered model: `create_model("vit_small_patch16_224", num_classes=10)`. Like timm, with weights from
    the Hugging Face Hub: `create_model("vit_small_patch16_224.augreg_in21k_ft_in1k", pretrained=True)` or
    `create_model("hf-hub:<owner>/<name>", pretrained=True)` build the architecture its config.json names;
    `pretrained=` a Hub name or a local file loads into the registered model `name` (see `vitlab.hub_models`)."""
    from .hub_models import create_pretrained
    return create_pretrained(name, pretrained, **kwargs)


def load_config(path=None, overrides=()):
    """Load a YAML config, apply `section.key=value` overrides, check names and type the model arguments
    (see `vitlab.config` and `vitlab.resolve`)."""
    from .resolve import load
    return load(path, overrides)


def compare(configs, epochs=None, output="output/compare", **overrides):
    """Train several configs on the same data and budget; a Comparison (see `vitlab.api.compare`)."""
    from .api import compare as _compare
    return _compare(configs, epochs, output, **overrides)


def __getattr__(name):
    if name in ("list_models", "register_model"):
        from . import registry
        return getattr(registry, name)
    if name == "train":  # `vitlab.train(config, **overrides)`: the training package, callable (vitlab.api.train)
        import importlib
        return importlib.import_module(".train", __name__)  # importing sets the attribute: asked once
    raise AttributeError(f"module 'vitlab' has no attribute {name!r}")


__all__ = ["VitlabError", "__version__", "compare", "create_model", "list_models", "load_config", "load_pretrained",
           "register_model", "train"]
