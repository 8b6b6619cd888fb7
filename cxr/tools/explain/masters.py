"""The shard's master (full-resolution) images of one split, read by key."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards.manifest import load_manifest


@dataclass
class Masters:
    """The shard's master (full-resolution) images of one split, read by key."""

    index: Any
    reader: Any
    position: dict[str, int]
    sizes: dict[str, int]

    @classmethod
    def open(cls, shards: Path, split: str) -> Masters:
        from cxr.data.shard_index import SampleReader, SplitIndex

        manifest = load_manifest(shards)
        index = SplitIndex.load(shards, manifest, split)
        return cls(
            index, SampleReader(index), {k: i for i, k in enumerate(index.keys)}, manifest.get("image_sizes") or {}
        )

    def image(self, key: str) -> Any:
        from PIL import Image

        from cxr.data.shard_index import CorruptSample

        try:
            data = self.reader.read(self.position[key])[0]
        except CorruptSample as bad:
            raise bad.as_error() from bad
        if self.index.codec == "ljpeg":  # lossless JPEG masters (pack --codec ljpeg): PIL cannot decode them
            from shards.image_codec import decode_ljpeg

            return Image.fromarray(decode_ljpeg(data), mode="L")
        return Image.open(io.BytesIO(data)).convert("L")

    def size(self, key: str) -> tuple[int, int]:
        """(width, height) of a master: the manifest's single size, else the image header."""
        if len(self.sizes) == 1:
            w, _, h = next(iter(self.sizes)).partition("x")
            return int(w), int(h)
        from PIL import Image

        return Image.open(io.BytesIO(self.reader.read(self.position[key])[0])).size
