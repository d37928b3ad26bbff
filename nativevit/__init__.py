"""nativevit: a native-resolution ViT encoder over packed varlen batches.

proc = nv.ImageProcessor()
batch = proc(images)                                   # nv.PackedBatch
model = nv.NativeViT(nv.VisionConfig.qwen2_vl())       # or nv.NativeViT.from_pretrained(dir)
tokens = model(batch.pixel_values, batch.grid_thw)     # (N/4, out_hidden_size)
"""

from . import ops, strategies
from .config import VisionConfig
from .cuda_graphs import CUDAGraphEncoder
from .encode import load_features
from .image import smart_resize
from .integrations import from_transformers, swap_vision_tower
from .model import NativeViT
from .packing import PackedBatch, Segments, cu_seqlens_from_grid
from .preprocess import ImageProcessor
from .sampler import TokenBudgetSampler
from .timm_vit import from_timm

__version__ = "0.1.0"

__all__ = [
    "CUDAGraphEncoder",
    "ImageProcessor",
    "NativeViT",
    "PackedBatch",
    "Segments",
    "TokenBudgetSampler",
    "VisionConfig",
    "cu_seqlens_from_grid",
    "from_timm",
    "from_transformers",
    "load_features",
    "ops",
    "smart_resize",
    "strategies",
    "swap_vision_tower",
]
