"""nativevit inside other libraries' models.

* ``hf_vit``: transformers CLIP / SigLIP / InternViT vision models as packed encoders
  (``from_transformers``).
* ``transformers``: ``swap_vision_tower``, the vision tower of a transformers VLM replaced in place.
* ``views``: a resolution strategy's views as the normalised images a CLIP / SigLIP / InternViT tower takes.

transformers is imported only when these functions run.
"""

from .hf_vit import TransformersPackedEncoder, from_transformers
from .transformers import QwenVisionTower, TransformersVisionTower, swap_vision_tower
from .views import TowerViews, tower_views

__all__ = [
    "QwenVisionTower",
    "TowerViews",
    "TransformersPackedEncoder",
    "TransformersVisionTower",
    "from_transformers",
    "swap_vision_tower",
    "tower_views",
]
