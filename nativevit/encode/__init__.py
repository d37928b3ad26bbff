"""Dataset-scale feature export: ``nativevit encode INPUT --out DIR`` and ``nv.load_features(DIR)``.

Native-resolution token grids of every image of a folder, a list file or webdataset tar shards, on one
process or many (``torchrun``), written as safetensors shards with a parquet manifest, resumable after a
crash without losing or doubling an item. ``store`` documents the output folder, ``sources`` the
inputs, ``command`` the run.

    sources.py   INPUT -> items (keys, tar member offsets) and each item's token count from its header
    loader.py    DataLoader datasets (header scan, decode + preprocess of token-budget batches),
                 the token-balanced split over ranks
    runner.py    one rank's loop: batches -> encoder -> shards written as it goes
    store.py     shard format, manifest, atomic writes, load_features
    command.py   arguments, the distributed run, the output folder's checks, summary
"""

from .command import add_encode_arguments, main, run_encode
from .loader import assign_by_tokens
from .store import FeatureStore, load_features

__all__ = ["FeatureStore", "add_encode_arguments", "assign_by_tokens", "load_features", "main", "run_encode"]
