"""Model families. Importing this package registers every model name."""
from . import (bdia_vit, diff_vit, gdt_vit, momentum_vit, res_vit, rev_vit, small_dataset_vit, staged_vit,  # noqa: F401  (registers)
               sizes)
from .vit import VisionTransformer

__all__ = ["VisionTransformer"]
