"""One image in, one grey shard member out: PNG checks, the grey policy, encoders.

Runs inside pack's worker pool, so it imports only PIL, numpy and zlib (and
imagecodecs, lazily, for lossless JPEG: Pillow cannot write ITU T.81 process 14, and
whether it can read it depends on the libjpeg-turbo it was built with; pydicom, lazily,
for DICOM sources, which shards.dicom turns into 8-bit masters).

Policy (docs/shards-format.md): 8-bit grey PNGs pass through byte for byte after a
structural check (signature, IHDR, every chunk CRC, IDAT, IEND) and a full decode. 8-bit RGB/RGBA
whose three channels are equal and whose alpha is 255 everywhere are re-encoded
as 8-bit grey with identical pixels. Everything else (unequal channels,
transparency, 16-bit, 1/2/4-bit, palette, grey+alpha) is rejected with a reason — except
16-bit grey under ``grey16="minmax"`` (PadChest, see :func:`window_16bit`).
JPEG sources (CheXpert, MIMIC-CXR-JPG) are decoded to grey: kept byte for byte when packing with
``--codec jpeg`` (no second lossy generation), else re-encoded losslessly from their pixels.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cxrbase.errors import CxrError
from shards.dicom import DICOM_SUFFIXES, has_preamble, read_dicom

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# ljpeg gets its own extension, not .jpg: webdataset's .decode() hands .jpg to PIL and
# other readers assume baseline JPEG; DALI and our loaders pick the member by name
# and the decoder by the bytes (docs/shards-format.md)
CODEC_EXT = {"png": "png", "jpeg": "jpg", "j2k": "jp2", "ljpeg": "ljpeg"}
_COLOUR_TYPES = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}
RESAMPLE = Image.Resampling.LANCZOS  # antialiasing for large down-scales (1024 → 224)
# The one resize filter of cxr: `pack --resize` and both loaders' on-the-fly resize call
# resize_grey, so a model sees the same pixels from derived shards as from masters.
RESIZE_FILTER = "PIL Lanczos (antialiased, a=3)"


class BadImage(Exception):
    """The image cannot be packed; the message is the reason stored in the manifest."""


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    bit_depth: int
    colour_type: int


@dataclass(frozen=True)
class Prepared:
    """Result of :func:`prepare_image`: the member bytes, or the reason for a reject."""

    key: str
    ext: str | None
    data: bytes | None
    width: int = 0
    height: int = 0
    from_mode: str | None = None  # set when an RGB/RGBA file was converted to grey
    reason: str | None = None  # set when rejected
    bytes_in: int = 0


def check_png(data: bytes) -> PngHeader:
    """Validate a PNG's structure without decoding pixels; raise BadImage on any fault.

    Checks the signature, IHDR (first, 13 bytes, sane fields), every chunk's CRC,
    at least one IDAT, and IEND as the last bytes of the file.
    """
    if data[:8] != PNG_SIGNATURE:
        raise BadImage("not a PNG (bad signature)")
    view, pos, end_of_file = memoryview(data), 8, len(data)
    header, seen_idat = None, False
    while True:
        if pos + 12 > end_of_file:
            raise BadImage(f"truncated PNG (file ends at byte {end_of_file} before IEND)")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        chunk_end = pos + 12 + length
        if chunk_end > end_of_file:
            raise BadImage(f"truncated PNG ({ctype.decode('latin-1')} chunk runs past end of file)")
        (crc,) = struct.unpack_from(">I", data, chunk_end - 4)
        if zlib.crc32(view[pos + 4 : chunk_end - 4]) != crc:
            raise BadImage(f"corrupt PNG (CRC mismatch in {ctype.decode('latin-1')} chunk at byte {pos})")
        if header is None:
            header = _parse_ihdr(ctype, data[pos + 8 : pos + 8 + length])
        elif ctype == b"IDAT":
            seen_idat = True
        elif ctype == b"IEND":
            if not seen_idat:
                raise BadImage("corrupt PNG (no IDAT chunk)")
            if chunk_end != end_of_file:
                raise BadImage(f"corrupt PNG ({end_of_file - chunk_end} bytes after IEND)")
            return header
        pos = chunk_end


def png_problem(data: bytes) -> str | None:
    """:func:`check_png` as a reason string for the loaders' integrity pass: None when the
    PNG's structure and every chunk CRC are intact, else what is wrong."""
    try:
        check_png(data)
    except BadImage as err:
        return str(err)
    return None


def _parse_ihdr(ctype: bytes, body: bytes) -> PngHeader:
    if ctype != b"IHDR" or len(body) != 13:
        raise BadImage("corrupt PNG (first chunk is not a 13-byte IHDR)")
    width, height, depth, colour, compression, filt, interlace = struct.unpack(">IIBBBBB", body)
    if width == 0 or height == 0 or compression or filt or interlace > 1 or colour not in _COLOUR_TYPES:
        raise BadImage(f"corrupt PNG (invalid IHDR: {width}x{height}, colour type {colour})")
    return PngHeader(width, height, depth, colour)


GREY16 = ("reject", "minmax")  # what pack does with a 16-bit grey PNG (--grey16)


def window_16bit(pixels: np.ndarray) -> np.ndarray:
    """16-bit grey pixels → uint8 by a linear map of the image's own [min, max] onto [0, 255].

    PadChest ships its radiographs as 16-bit PNGs whose used range differs per image (12-bit
    detectors, differing DICOM rescales), so a fixed ÷257 would leave many images nearly black.
    The PNGs already hold presentation values (the DICOM VOI applied upstream), so the only step
    left is this per-image linear rescale to 8 bits (docs/datasets.md, PadChest, says why and
    what the alternatives are). A flat image maps to 0.
    """
    lo, hi = int(pixels.min()), int(pixels.max())
    if hi == lo:
        return np.zeros(pixels.shape, np.uint8)
    scaled = (pixels.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.rint(scaled).astype(np.uint8)


def grey_policy(data: bytes, header: PngHeader, grey16: str = "reject") -> tuple[Image.Image, str | None]:
    """Decode a checked PNG to an 8-bit grey PIL image; return (image, converted-from mode or None)."""
    kind = _COLOUR_TYPES[header.colour_type]
    if header.bit_depth == 16 and header.colour_type == 0 and grey16 == "minmax":
        pixels = np.asarray(_decode(data))
        return Image.fromarray(window_16bit(pixels), mode="L"), "16-bit grey, min-max"
    if header.bit_depth != 8:
        raise BadImage(f"unsupported PNG: {header.bit_depth}-bit {kind} (only 8-bit is accepted)")
    if header.colour_type not in (0, 2, 6):
        raise BadImage(f"unsupported PNG: {kind} (only grey, or RGB/RGBA with R=G=B, is accepted)")
    image = _decode(data)
    if image.mode == "L":
        return image, None
    from_mode = image.mode
    if "transparency" in image.info:
        image = image.convert("RGBA")
    pixels = np.asarray(image)
    if not ((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()):
        raise BadImage(f"{from_mode} PNG with unequal colour channels (not a grey image)")
    if pixels.shape[-1] == 4 and not (pixels[..., 3] == 255).all():
        raise BadImage(f"{from_mode} PNG with transparent pixels (alpha < 255)")
    return Image.fromarray(np.ascontiguousarray(pixels[..., 0]), mode="L"), from_mode


def _decode(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, zlib.error …
        raise BadImage(f"undecodable image ({type(err).__name__}: {err})") from None
    return image


def encode(image: Image.Image, codec: str, quality: int = 95, png_level: int = 6) -> bytes:
    """Encode an 8-bit grey image: png (lossless, zlib level), jpeg (quality), j2k (lossless JP2),
    ljpeg (lossless JPEG, ITU T.81 process 14, predictor 1)."""
    if codec == "ljpeg":
        import imagecodecs  # noqa: PLC0415 — only this codec needs it

        # libjpeg-turbo's lossless mode with predictor 1 (left neighbour), the one predictor
        # nvJPEG's lossless decoder is documented to accept (DALI PR #4572); imagecodecs'
        # ljpeg_encode (lj92) writes predictor 6: ~5 % smaller, but nvJPEG does not take it
        return bytes(imagecodecs.jpeg8_encode(np.asarray(image, np.uint8), lossless=True, predictor=1))
    buf = io.BytesIO()
    if codec == "png":
        image.save(buf, format="PNG", compress_level=png_level)
    elif codec == "jpeg":
        image.save(buf, format="JPEG", quality=quality)
    elif codec == "j2k":
        # reversible 5/3 wavelet, no rate target: lossless; the .jp2 container
        image.save(buf, format="JPEG2000", irreversible=False)
    else:
        raise ValueError(f"unknown codec {codec!r}")
    return buf.getvalue()


def decode_grey(data: bytes, codec: str | None = None) -> Image.Image:
    """Decode shard image bytes to PIL; raise BadImage if undecodable.

    ``codec="ljpeg"`` decodes with imagecodecs (see :func:`decode_ljpeg`); ``"png"`` with
    the libpng inside imagecodecs (``png_decode``, zlib-ng: ~1.2x PIL's decode per core on
    NIH 1024² PNGs, bench/RESULTS.md "loader from masters"; pixels are equal, PNG being
    lossless), PIL when that is not one 8-bit grey channel; any other value, or None, with PIL.
    Both release the GIL, so the loaders decode in threads.
    """
    if codec == "ljpeg":
        return Image.fromarray(decode_ljpeg(data), mode="L")
    if codec == "png":
        import imagecodecs

        try:
            pixels = imagecodecs.png_decode(data)
        except Exception as err:  # imagecodecs.PngError, ValueError …
            raise BadImage(f"undecodable image (PngError: {err})") from None
        if pixels.ndim == 2 and pixels.dtype == np.uint8:
            return Image.fromarray(pixels, mode="L")
    return _decode(data)


def decode_ljpeg(data: bytes) -> np.ndarray:
    """Lossless JPEG bytes → uint8 [H, W]; BadImage on truncation, damage or not one 8-bit channel.

    Decoded by the libjpeg-turbo 3 inside imagecodecs (``jpeg8_decode``): ~1.5x faster
    than its lj92 ``ljpeg_decode`` (bench/RESULTS.md, codec decode) and independent of
    the libjpeg Pillow was built with. libjpeg returns an image from data cut short
    (padding it with a warning), so the start and end markers are checked first; a
    flipped byte inside the entropy-coded data is not detectable by any JPEG decoder
    (that needs a checksum).
    """
    problem = ljpeg_problem(data)
    if problem:
        raise BadImage(problem)
    import imagecodecs  # noqa: PLC0415

    try:
        pixels = imagecodecs.jpeg8_decode(data)
    except Exception as err:  # imagecodecs.Jpeg8Error, ValueError …
        raise BadImage(f"undecodable lossless JPEG ({type(err).__name__}: {err})") from None
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise BadImage(f"lossless JPEG decodes to {pixels.dtype} {pixels.shape}, expected one 8-bit grey channel")
    return pixels


def ljpeg_problem(data: bytes) -> str | None:
    """Cheap integrity check of lossless JPEG bytes: SOI first, EOI last, a lossless frame (SOF3)."""
    if data[:2] != b"\xff\xd8":
        return "lossless JPEG start-of-image marker missing"
    if data[-2:] != b"\xff\xd9":
        return "lossless JPEG end-of-image marker missing (truncated)"
    if b"\xff\xc3" not in data[:4096]:
        return "not a lossless JPEG (no SOF3 frame header)"
    return None


def prepare_image(
    key: str, source: str | Path | bytes, codec: str, quality: int = 95, grey16: str = "reject"
) -> Prepared:
    """Read (when given a path), check and encode one image for a shard.

    png: original bytes when already 8-bit grey, else the grey re-encode; jpeg/j2k/ljpeg:
    decoded grey, re-encoded. A BadImage becomes a Prepared with ``reason`` set.
    """
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
    if has_preamble(data):
        return _prepare_dicom(key, data, codec, quality)
    if data[:3] == b"\xff\xd8\xff":
        return _prepare_jpeg(key, data, codec, quality)
    try:
        header = check_png(data)
        if codec == "png" and header.bit_depth == 8 and header.colour_type == 0:
            # chunk CRCs can be valid around undecodable deflate data: decode once (PIL's
            # decoder releases the GIL, so the pack threads still overlap) and keep the bytes
            _decode(data)
            return Prepared(key, "png", data, header.width, header.height, bytes_in=len(data))
        image, from_mode = grey_policy(data, header, grey16)
        # zlib level 1: ~5x faster than 6 on 1024² for ~15 % more bytes, on the few converted files
        out = encode(image, codec, quality, png_level=1)
    except BadImage as err:
        return Prepared(key, None, None, reason=str(err), bytes_in=len(data))
    return Prepared(key, CODEC_EXT[codec], out, image.width, image.height, from_mode, bytes_in=len(data))


def _prepare_jpeg(key: str, data: bytes, codec: str, quality: int) -> Prepared:
    """A JPEG source (CheXpert, MIMIC-CXR-JPG): 8-bit grey (or RGB with equal channels) only.

    ``--codec jpeg`` keeps a grey source's bytes (re-encoding would add a second lossy
    generation); other codecs encode its decoded pixels, recorded as converted from "JPEG".
    """
    try:
        image = _decode(data)
        if image.mode != "L":
            if image.mode != "RGB":
                raise BadImage(f"unsupported JPEG: mode {image.mode} (only grey or R=G=B colour is accepted)")
            pixels = np.asarray(image)
            if not ((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()):
                raise BadImage("RGB JPEG with unequal colour channels (not a grey image)")
            image = Image.fromarray(np.ascontiguousarray(pixels[..., 0]), mode="L")
        elif codec == "jpeg":
            return Prepared(key, "jpg", data, image.width, image.height, bytes_in=len(data))
        out = encode(image, codec, quality, png_level=1)
    except BadImage as err:
        return Prepared(key, None, None, reason=str(err), bytes_in=len(data))
    return Prepared(key, CODEC_EXT[codec], out, image.width, image.height, "JPEG", bytes_in=len(data))


RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")  # file suffixes source_grey reads besides DICOM (by content)


def source_grey(data: bytes, name: str) -> np.ndarray:
    """A source file's bytes → the 8-bit grey master pixels [H, W] that ``pack`` stores for it.

    The one place a source image becomes grey: ``prepare_image`` (pack) and ``cxr-predict`` both
    call it, so a file scored directly sees the pixels its packed copy gives the loaders. DICOM
    (by its preamble): shards.dicom. PNG: the grey policy (8-bit grey as is, RGB/RGBA with R=G=B
    and opaque alpha to grey; everything else refused). Any other raster (JPEG:
    pack's ``_prepare_jpeg`` takes grey or R=G=B ones): PIL's ``convert("L")`` (ITU-R 601-2 luma; R=G=B stays). Raises BadImage.
    """
    if has_preamble(data) or name.lower().endswith(DICOM_SUFFIXES):  # a .dcm without preamble: say so
        try:
            return read_dicom(data, name=name).pixels
        except CxrError as err:
            raise BadImage(str(err).removeprefix(f"{name}: ")) from None
    if data[:8] == PNG_SIGNATURE:
        header = check_png(data)
        if header.bit_depth == 8 and header.colour_type == 0:  # pack keeps these bytes; the loader decodes so
            return np.asarray(decode_grey(data, "png"))
        image, _ = grey_policy(data, header)
        return np.asarray(image)
    image = _decode(data)
    return np.asarray(image if image.mode == "L" else image.convert("L"))


def _prepare_dicom(key: str, data: bytes, codec: str, quality: int) -> Prepared:
    """A DICOM radiograph → its 8-bit master (shards.dicom: modality LUT, VOI, MONOCHROME1), encoded."""
    try:
        image = Image.fromarray(source_grey(data, key), mode="L")
    except BadImage as err:
        return Prepared(key, None, None, reason=str(err), bytes_in=len(data))
    out = encode(image, codec, quality, png_level=1)
    return Prepared(key, CODEC_EXT[codec], out, image.width, image.height, "DICOM", bytes_in=len(data))


def resize_encoded(data: bytes, size: int, codec: str, quality: int = 95) -> bytes:
    """Decode a grey master image, resize to size×size (Lanczos) and re-encode."""
    image = decode_grey(data, codec)
    if image.mode != "L":
        raise BadImage(f"master image is {image.mode}, expected L")
    return encode(resize_grey(image, size), codec, quality)


def resize_grey(image: Image.Image, size: int) -> Image.Image:
    """size×size with RESIZE_FILTER (the filter of derived shards and of on-the-fly resizing)."""
    return image.resize((size, size), RESAMPLE)
