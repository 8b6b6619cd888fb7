"""Shards → batches: one loader contract over a DALI and a torch back end.

    from cxr.data import DataConfig, build_loader, to_device
    loader = build_loader(DataConfig(shards="build/demo/shards", backend="dali"), "train",
                          rank=0, world_size=1, epoch=0)
    for batch in loader:   # image uint8 [B,1,R,R], labels [B,14], meta [B,5], key
        image = to_device(batch, device)   # float32 [B,1,R,R], normalised, on the device

See loader.py for the batch contract, batch.py for turning its pixels into the model's input,
plan.py for sharding/shuffling/resume, augmentation.py for the pixel path.
"""

from cxr.data.batch import to_device
from cxr.data.config import DataConfig
from cxr.data.loader import Loader, build_loader
from cxr.data.shard_index import image_source, load_shards_manifest

__all__ = ["DataConfig", "Loader", "build_loader", "image_source", "load_shards_manifest", "to_device"]
