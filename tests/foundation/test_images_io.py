"""PNG <-> tensor helpers: lossless round trip and clear errors for bad client images."""
from __future__ import annotations

import io
import struct

import pytest
import torch
from PIL import Image

from repair.images import ImageError, ImageTooLarge, decode_image, encode_png, quantize


def test_round_trip_is_exact_on_the_8bit_grid_and_within_half_a_level_otherwise():
    g = torch.Generator().manual_seed(0)
    grid = torch.randint(0, 256, (3, 9, 7), generator=g).float() / 255
    assert torch.equal(decode_image(encode_png(grid), 3, 9, 7), grid)
    grey = torch.rand(1, 16, 16, generator=g)
    back = decode_image(encode_png(grey), channels=1)
    assert back.shape == (1, 16, 16)
    assert (back - grey).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.equal(back, quantize(grey))


def _png(w, h, mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"not an image at all", r"^not a readable image \(PNG or JPEG expected\)$"),  # no repr of our buffer
    (encode_png(torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0)))[:150],
     "truncated|corrupt|not a readable"),
])
def test_bad_bytes_give_image_errors(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data, 1, 16, 16)


def test_wrong_size_and_formats_are_refused():
    with pytest.raises(ImageError, match="8x8.*16x16"):
        decode_image(_png(8, 8), 1, 16, 16)
    buf = io.BytesIO()
    Image.new("L", (16, 16)).save(buf, format="GIF")
    with pytest.raises(ImageError, match="GIF"):
        decode_image(buf.getvalue())
    assert issubclass(ImageError, ValueError)


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    big = _png(300, 200)
    # decoding must not even start: make load() explode if it is reached
    monkeypatch.setattr(Image.Image, "load", lambda self: (_ for _ in ()).throw(AssertionError("decoded")))
    with pytest.raises(ImageTooLarge, match="60000 pixels"):
        decode_image(big, max_pixels=50000)


def test_a_jpeg_header_claiming_a_bomb_is_too_large():
    """A 16x16 JPEG whose header claims 20000x20000: PIL's own guard refuses it on open."""
    buf = io.BytesIO()
    Image.new("L", (16, 16)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")  # baseline frame header: marker, length, precision, height, width
    struct.pack_into(">HH", data, sof + 5, 20000, 20000)
    with pytest.raises(ImageTooLarge, match="400000000 pixels"):
        decode_image(bytes(data))


def test_channels_convert():
    rgb = torch.zeros(3, 4, 4)
    rgb[0] = 1.0
    grey = decode_image(encode_png(rgb), channels=1)
    assert grey.shape == (1, 4, 4) and abs(grey[0, 0, 0].item() - 76 / 255) < 1e-6  # ITU-R 601 luma
