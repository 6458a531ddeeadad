"""Model families. Importing this package registers every model name."""
from . import bdia_vit, diff_vit, momentum_vit, rev_vit, staged_vit, vit_registry  # noqa: F401  (importing registers the names)
from .vit import VisionTransformer

__all__ = ["VisionTransformer"]
