"""One image decoder: any PIL image to a float array in ``[0, 1]``, every mode by its true range.

``PIL.Image.convert("RGB")`` clips wider modes to 8 bits: a 16-bit grayscale pixel of 50% grey (32768)
becomes 255, so every 16-bit image turns white. :func:`decode` scales each mode by the range its
values really have:

=====================================  ==============================================================
mode                                   values -> [0, 1]
=====================================  ==============================================================
``1``                                  0 / 1
``L``, ``P``, ``RGB``, ``RGBX``        v / 255 (``P``: its palette colours)
``I;16``, ``I;16L``, ``I;16B``,        v / 65535
``I;16N``
``I`` (32-bit signed)                  v / (2^bits - 1), bits the file's sample size (16 for a PNG,
                                       which Pillow < 10 opens as ``I``; a TIFF's BitsPerSample);
                                       full 32-bit: (v + 2^31) / (2^32 - 1)
``F`` (32-bit float)                   the float-image convention: intensities on [0, 1], values
                                       outside clipped; NaN or inf pixels make the image unreadable
``CMYK``                               (1 - C)(1 - K) per channel (no colour profile)
``YCbCr``                              JPEG's full-range BT.601 transform, clipped to the RGB gamut
``LAB``                                CIE L*a*b* (Pillow's: L * 255 / 100, a and b signed bytes, D50
                                       white, as ImageCms writes it) to sRGB, Bradford-adapted
``HSV``                                the hexcone model (H, S, V / 255)
=====================================  ==============================================================

Alpha (``LA``, ``PA``, ``RGBA``, ``RGBa``) is **dropped**: the colour values as stored, as
``convert("RGB")``, torchvision and timm do (compositing on a background would invent a colour the
file does not hold). One channel from a colour image is ITU-R 601 luma
(0.299 R + 0.587 G + 0.114 B, Pillow's ``L``); three channels from a grey image repeat it. A mode
outside this list goes through Pillow's ``convert("RGB")``; one Pillow cannot convert raises
``ValueError`` (:class:`~samnorm.data.folders.ImageFolder` counts the image as unreadable).

Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> grey16 = Image.fromarray(np.full((2, 2), 32768, dtype=np.uint16))
    >>> float(decode(grey16, channels=1)[0, 0, 0])  # 0.5, not 1.0
    0.500007...
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["decode"]

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# XYZ (D50) -> linear sRGB, Bradford-adapted (Lindbloom); D50 white
_XYZ50_TO_SRGB = np.array(
    [[3.1338561, -1.6168667, -0.4906146], [-0.9787684, 1.9161415, 0.0334540], [0.0719453, -0.2289914, 1.4052427]]
)
_D50 = np.array([0.9642, 1.0, 0.8249])


def _int_bits(image: Any) -> int:
    """Sample size of a mode ``I`` image: a TIFF's BitsPerSample, 16 for a PNG, else 32."""
    tags = getattr(image, "tag_v2", None)
    if tags is not None and 258 in tags:
        bits = tags[258]
        return int(bits[0] if isinstance(bits, tuple) else bits)
    return 16 if getattr(image, "format", None) == "PNG" else 32


def _srgb_gamma(linear: np.ndarray) -> np.ndarray:
    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1 / 2.4) - 0.055)


def _lab(a: np.ndarray) -> np.ndarray:
    L = a[..., 0].astype(np.float64) * 100 / 255
    ab = a[..., 1:].astype(np.int8).astype(np.float64)  # signed bytes
    fy = (L + 16) / 116
    f = np.stack([fy + ab[..., 0] / 500, fy, fy - ab[..., 1] / 200], axis=-1)
    delta = 6 / 29
    xyz = np.where(f > delta, f**3, 3 * delta**2 * (f - 4 / 29)) * _D50
    return _srgb_gamma(xyz @ _XYZ50_TO_SRGB.T)


def _hsv(a: np.ndarray) -> np.ndarray:
    h, s, v = (a[..., i].astype(np.float64) / 255 for i in range(3))
    i = np.floor(h * 6)
    f = h * 6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(np.int64) % 6
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _ycbcr(a: np.ndarray) -> np.ndarray:
    y, cb, cr = (a[..., i].astype(np.float64) for i in range(3))
    cb, cr = cb - 128, cr - 128
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return np.clip(rgb / 255, 0.0, 1.0)


def _values(image: Any) -> np.ndarray:
    """The image as ``(H, W, 1 or 3)`` values in [0, 1] (float32 or float64)."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=np.float32)[..., None]
    if mode.startswith("I;16"):
        return (np.asarray(image).astype(np.float32) / 65535)[..., None]
    if mode == "I":
        v = np.asarray(image).astype(np.float64)
        bits = _int_bits(image)
        return ((v + 2.0**31) / (2.0**32 - 1) if bits >= 32 else v / (2.0**bits - 1))[..., None]
    if mode == "F":
        v = np.asarray(image, dtype=np.float32)
        if not np.isfinite(v).all():
            raise ValueError("the image has NaN or infinite pixel values")
        return np.clip(v, 0.0, 1.0)[..., None]
    if mode in ("L", "LA"):
        return (np.asarray(image)[..., :1] if mode == "LA" else np.asarray(image)[..., None]) / np.float32(255)
    if mode in ("RGB", "RGBA", "RGBX"):
        return np.asarray(image)[..., :3] / np.float32(255)
    if mode == "CMYK":
        c = np.asarray(image) / np.float32(255)
        return (1 - c[..., :3]) * (1 - c[..., 3:])
    converters = {"YCbCr": _ycbcr, "LAB": _lab, "HSV": _hsv}
    if mode in converters:
        return converters[mode](np.asarray(image))
    try:  # P, PA (their palette), RGBa (premultiplied), and whatever else Pillow can make RGB
        rgb = image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"image mode {mode!r} cannot be converted to RGB ({err})") from err
    return np.asarray(rgb) / np.float32(255)


def decode(image: Any, channels: int = 3) -> np.ndarray:
    """A PIL image as a ``(H, W, channels)`` float32 array in ``[0, 1]`` (module docstring: each mode).

    Args:
        image: a PIL image of any mode.
        channels: 3 (RGB) or 1 (grey: luma of a colour image).

    Example:
        >>> from PIL import Image
        >>> decode(Image.new("CMYK", (1, 1), (0, 255, 255, 0)))[0, 0].tolist()  # cyan 0, magenta, yellow: red
        [1.0, 0.0, 0.0]
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    v = _values(image)
    if v.shape[-1] != channels:
        v = v @ _LUMA[:, None] if channels == 1 else np.repeat(v, 3, axis=-1)
    return np.ascontiguousarray(v, dtype=np.float32)
