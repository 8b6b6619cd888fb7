"""Shards → batches: one loader contract over a DALI and a torch back end.

    from cxr.data import DataConfig, build_loader
    loader = build_loader(DataConfig(shards="build/demo/shards", backend="dali"), "train",
                          rank=0, world_size=1, epoch=0)
    for batch in loader: ...   # image [B,1,R,R], labels [B,14], meta [B,5], key

See loader.py for the batch contract, plan.py for sharding/shuffling/resume,
augmentation.py for the pixel path.
"""

from cxr.data.config import DataConfig
from cxr.data.loader import Loader, build_loader
from cxr.data.shard_index import image_source, load_shards_manifest

__all__ = ["DataConfig", "Loader", "build_loader", "image_source", "load_shards_manifest"]
