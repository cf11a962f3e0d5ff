"""samnorm.data.folders.ImageFolder: what is listed and read, what is skipped and counted, and which
links are followed (no cycle, no image under two labels)."""

from __future__ import annotations

import os
import threading

import pytest
from helpers import png_folder
from torch.utils.data import DataLoader

from samnorm.data.folders import ImageFolder, ImageTransform

pytestmark = pytest.mark.filterwarnings("ignore:skipping unreadable image:RuntimeWarning")


def test_a_named_pipe_called_x_png_is_not_read(tmp_path):
    root = png_folder(tmp_path, classes=("a", "b"), per_class=2)
    os.mkfifo(root / "a" / "x.png")
    result = {}
    reader = threading.Thread(target=lambda: result.update(ds=ImageFolder(root, ImageTransform(size=8))), daemon=True)
    reader.start()
    reader.join(20)
    assert "ds" in result, "listing the folder hung"
    ds = result["ds"]
    assert [os.path.relpath(p, root) for p, _ in ds.samples] == ["a/0.png", "a/1.png", "b/0.png", "b/1.png"]
    assert [tuple(x.shape) for x, _ in DataLoader(ds, batch_size=4)] == [(4, 3, 8, 8)]


def test_a_decompression_bomb_is_skipped_and_counted(tmp_path, monkeypatch):
    from PIL import Image

    root = png_folder(tmp_path, classes=("a", "b"), per_class=3)
    Image.new("L", (64, 64)).save(root / "a" / "1.png")  # 4096 pixels: a bomb under a 1,000-pixel limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    ds = ImageFolder(root, ImageTransform(size=8))
    with pytest.warns(RuntimeWarning, match="unreadable image .*1.png"):
        assert sum(len(x) for x, _ in DataLoader(ds, batch_size=3)) == 6
    assert ds.skipped == 1


def test_directory_links_below_a_class_are_not_followed(tmp_path):
    root = png_folder(tmp_path / "d", per_class=2)
    os.symlink(".", root / "a" / "self")  # a cycle: 6 images became hundreds
    os.symlink(root, root / "b" / "up")  # the other classes' images under b's label
    ds = ImageFolder(root)
    assert len(ds) == 6 and sorted(ds.targets) == [0, 0, 1, 1, 2, 2]
    flat = ImageFolder(root / "a", flat=True)
    assert len(flat) == 2


def test_class_folder_links_may_not_overlap(tmp_path):
    root = png_folder(tmp_path / "d", per_class=2)
    ok = tmp_path / "subset"
    ok.mkdir()
    os.symlink(root / "a", ok / "a")  # a subset of another folder's classes: still supported
    os.symlink(root / "b", ok / "b")
    assert len(ImageFolder(ok)) == 4
    os.symlink(root / "a", ok / "again")
    with pytest.raises(ValueError, match="lead to the same images"):
        ImageFolder(ok)
    os.remove(ok / "again")
    os.symlink(ok, ok / "self")
    with pytest.raises(ValueError, match="holds the image folder itself"):
        ImageFolder(ok)


def test_a_file_link_may_not_put_an_image_under_another_label(tmp_path):
    root = png_folder(tmp_path / "train", per_class=2)
    store = png_folder(tmp_path / "store", classes=("s",), per_class=1)
    os.symlink(store / "s" / "0.png", root / "a" / "from_store.png")  # a shared store: fine
    os.symlink(root / "a" / "0.png", root / "a" / "again.png")  # its own class: fine
    assert len(ImageFolder(root)) == 8
    (root / "loose.png").write_bytes((root / "c" / "0.png").read_bytes())
    for target, message in ((root / "b" / "0.png", "an image of class 'b'"), (root / "loose.png", "outside class 'a'")):
        os.symlink(target, root / "a" / "zz.png")
        with pytest.raises(ValueError, match=f"zz.png' links to .*{message}: one label per image"):
            ImageFolder(root)
        os.remove(root / "a" / "zz.png")
