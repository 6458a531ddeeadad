"""Model families. Importing this package registers every model name."""
from . import vit_registry  # noqa: F401  (registers the ViT family)
from .vit import VisionTransformer

__all__ = ["VisionTransformer"]
