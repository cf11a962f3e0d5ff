"""samnorm.data.decode: every PIL mode's pixel values against an independent numpy (or colorsys /
ImageCms) computation, and the regressions of issue 18 (16-bit images white, extreme aspect ratios)."""

import colorsys
import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from samnorm.data.decode import decode

RNG = np.random.default_rng(18)
H, W = 5, 7


def u8(c):
    return RNG.integers(0, 256, size=(H, W, c), dtype=np.uint8) if c > 1 else RNG.integers(0, 256, (H, W), np.uint8)


def reopened(image, fmt="PNG", **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    buf.seek(0)
    return Image.open(buf)


def case_1():
    a = RNG.random((H, W)) > 0.5
    return Image.fromarray(a), a[..., None].astype(float)


def case_L():
    a = u8(1)
    return Image.fromarray(a), a[..., None] / 255


def case_LA():
    a = u8(2)
    return Image.fromarray(a, "LA"), a[..., :1] / 255  # alpha dropped


def case_P():
    idx = RNG.integers(0, 16, (H, W), dtype=np.uint8)
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    image = Image.fromarray(idx, "P")
    image.putpalette(palette.tobytes())
    return image, palette[idx] / 255


def case_PA():
    image, expected = case_P()
    return image.convert("PA"), expected


def case_RGB():
    a = u8(3)
    return Image.fromarray(a), a / 255


def case_RGBA():
    a = u8(4)
    return Image.fromarray(a, "RGBA"), a[..., :3] / 255  # alpha dropped


def case_I16(mode):
    a = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, (W, H), a.astype(dtype).tobytes()), a[..., None] / 65535


def case_I():
    a = RNG.integers(-(2**31), 2**31 - 1, (H, W), dtype=np.int64).astype(np.int32)
    return Image.fromarray(a), (a[..., None].astype(np.float64) + 2**31) / (2**32 - 1)


def case_I_16bit_tiff():  # a 16-bit TIFF re-read as mode I: its BitsPerSample gives the range
    a = RNG.integers(0, 65536, (H, W)).astype(np.int32)
    image = reopened(Image.fromarray(a), "TIFF", compression=None)
    image.tag_v2[258] = 16  # what a 16-bit TIFF whose samples Pillow widened to 32 bits records
    return image, a[..., None] / 65535


def case_F():
    a = RNG.random((H, W)).astype(np.float32) * 1.4 - 0.2  # some values outside [0, 1]
    return Image.fromarray(a), np.clip(a, 0, 1)[..., None]


def case_CMYK():
    a = u8(4)
    c = a / 255.0
    return Image.fromarray(a, "CMYK"), (1 - c[..., :3]) * (1 - c[..., 3:])


def case_YCbCr():
    a = u8(3).astype(np.float64)
    y, cb, cr = a[..., 0], a[..., 1] - 128, a[..., 2] - 128
    # ITU-T T.871 (JFIF) inverse, written out per channel
    r, g, b = y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb
    return Image.fromarray(a.astype(np.uint8), "YCbCr"), np.clip(np.stack([r, g, b], -1) / 255, 0, 1)


def case_HSV():
    a = u8(3)
    rgb = [[colorsys.hsv_to_rgb(*(a[i, j] / 255)) for j in range(W)] for i in range(H)]
    return Image.fromarray(a, "HSV"), np.array(rgb)


def case_LAB():
    # sRGB colours to Pillow's LAB with littleCMS: decoding must give the colours back, up to the
    # 8-bit L*a*b* quantization (steepest in dark channels, through the sRGB curve)
    rgb = u8(3)
    lab = ImageCms.applyTransform(
        Image.fromarray(rgb),
        ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"),
    )
    return lab, rgb / 255


CASES = {
    "1": (case_1, 0),
    "L": (case_L, 0),
    "LA": (case_LA, 0),
    "P": (case_P, 0),
    "PA": (case_PA, 0),
    "RGB": (case_RGB, 0),
    "RGBA": (case_RGBA, 0),
    "I": (case_I, 1e-9),
    "I (16-bit TIFF)": (case_I_16bit_tiff, 0),
    "F": (case_F, 0),
    "CMYK": (case_CMYK, 1e-6),
    "YCbCr": (case_YCbCr, 1e-6),
    "HSV": (case_HSV, 1e-6),
    "LAB": (case_LAB, 8 / 255),
    **{m: ((lambda m=m: case_I16(m)), 0) for m in ("I;16", "I;16L", "I;16B", "I;16N")},
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_mode_gives_its_true_values(name):
    make, tol = CASES[name]
    image, expected = make()
    got = decode(image, channels=expected.shape[-1])
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=tol + 1e-6, rtol=0)
    rgb = decode(image, channels=3)
    if expected.shape[-1] == 1:  # grey repeated
        np.testing.assert_allclose(rgb, np.repeat(expected, 3, -1), atol=tol + 1e-6)
    else:  # one channel from colour: ITU-R 601 luma
        luma = expected @ np.array([0.299, 0.587, 0.114])
        np.testing.assert_allclose(decode(image, channels=1)[..., 0], luma, atol=tol + 1e-6)
    assert rgb.min() >= 0 and rgb.max() <= 1
    assert np.abs(got - expected).mean() <= max(tol / 8, 1e-6)  # LAB: a few dark channels off, not all


def test_16_bit_png_mid_grey_reads_as_half_not_white():
    # issue 18: a 50% grey 16-bit PNG read as 1.0 (convert("L") clips I;16 at 255)
    image = reopened(Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)))
    assert abs(float(decode(image, channels=1).mean()) - 32768 / 65535) < 1e-6


def test_non_finite_float_pixels_make_the_image_unreadable():
    with pytest.raises(ValueError, match="NaN or infinite"):
        decode(Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32)))
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        decode(Image.new("L", (1, 1)), channels=2)
