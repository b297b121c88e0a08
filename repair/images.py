"""PNG/JPEG bytes <-> model input tensors, shared by the zoo's exports and the server's requests.

The model input for an 8-bit image is ``value / 255`` in ``(C, H, W)``; :func:`encode_png` writes
``round(x * 255)``, so ``decode_image(encode_png(x))`` equals ``x`` to within half a grey level
(exactly, for tensors already on the 1/255 grid). Images come from clients, so decoding is
guarded: the pixel count is checked from the header *before* any pixel is decoded
(decompression bombs), and every failure is an :class:`ImageError` with a client-readable message.
"""
from __future__ import annotations

import io

import numpy as np
import torch

MAX_PIXELS = 4096 * 4096     # refuse anything larger before decoding it
MAX_BYTES = 32 * 1024 * 1024  # refuse larger encoded payloads outright


class ImageError(ValueError):
    """An image that cannot be used: not an image, truncated, too large, wrong size or channels."""


class ImageTooLarge(ImageError):
    """An image over a size limit (bytes, or pixels declared in its header): a server's 413."""


def _pil():
    from PIL import Image

    return Image


def decode_image(data: bytes, channels: int | None = None, height: int | None = None,
                 width: int | None = None, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Decode PNG/JPEG bytes into a float tensor ``(C, H, W)`` in ``[0, 1]`` (``value / 255``).

    ``channels`` (1 grey, 3 RGB) converts the colour mode; ``height``/``width``, when given, must
    match exactly (no silent resizing: the model must see what the client sent).
    """
    Image = _pil()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"image must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("image is empty")
    if len(data) > MAX_BYTES:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {MAX_BYTES}")
    try:
        # header only; PIL's own bomb guard (far above MAX_PIXELS) also raises in here
        img = Image.open(io.BytesIO(bytes(data)))
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"image is too large: {err}") from None
    except Image.UnidentifiedImageError:  # its message is the repr of our buffer
        raise ImageError("not a readable image (PNG or JPEG expected)") from None
    except Exception as err:  # PIL raises many types for garbage input
        raise ImageError(f"not a readable image (PNG or JPEG expected): {err}") from None
    if img.format not in ("PNG", "JPEG"):
        raise ImageError(f"image format {img.format} is not supported; send PNG or JPEG")
    w, h = img.size
    if w * h > max_pixels:  # checked before decoding a single pixel
        raise ImageTooLarge(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    if (height is not None and h != height) or (width is not None and w != width):
        raise ImageError(f"image is {w}x{h} (WxH); this model takes {width}x{height}")
    try:
        img.load()
    except Exception as err:
        raise ImageError(f"image data is truncated or corrupt: {err}") from None
    if channels is None:
        channels = 1 if img.mode in ("1", "L", "LA", "I;16", "I", "F") else 3
    if channels not in (1, 3):
        raise ImageError(f"unsupported channel count {channels}; 1 (grey) or 3 (RGB)")
    if img.mode in ("I;16", "I", "F"):
        raise ImageError(f"image mode {img.mode} is not 8-bit; send an 8-bit grey or RGB image")
    img = img.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy()).float() / 255.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` in ``[0, 1]`` -> ``(H, W)`` or ``(H, W, 3)`` uint8, rounding to the 1/255 grid."""
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ImageError(f"expected a (1|3, H, W) tensor, got shape {tuple(x.shape)}")
    arr = (x.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def encode_png(x: torch.Tensor) -> bytes:
    """Lossless 8-bit PNG of ``(C, H, W)`` in ``[0, 1]`` (grey for C=1, RGB for C=3)."""
    Image = _pil()
    buf = io.BytesIO()
    Image.fromarray(to_uint8(x)).save(buf, format="PNG")
    return buf.getvalue()


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Snap to the 8-bit grid, i.e. what a PNG round trip gives back."""
    return (x.clamp(0, 1) * 255).round() / 255
