"""Issue 18's validation findings, each a regression test: one table of rules (samnorm.validate) for the
Python configs and every option, the image decoder through ImageFolder, dataset sanity, --random-init."""

import functools
import math
import os

import helpers
import numpy as np
import pytest
from helpers import TINY_MODEL, cli, one_line, train_args
from PIL import Image

from samnorm.cli import main
from samnorm.data.folders import ImageFolder, ImageTransform
from samnorm.demo.config import DemoConfig
from samnorm.train.recipe import CHECKPOINT_NAME, FinetuneConfig
from samnorm.validate import SPECS, check

# two classes of three 12 px images
png_folder = functools.partial(helpers.png_folder, classes=("a", "b"), per_class=3, size=(12, 12))


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return [line for line in err if "error:" in line]


# ---------------------------------------------------------------- the Python configs
@pytest.mark.parametrize(
    "field, value, error",
    [
        ("batch_size", 2.5, TypeError),
        ("steps", 2.5, TypeError),
        ("seed", 1.5, TypeError),
        ("checkpoint_every", 0.5, TypeError),
        ("num_workers", -1, ValueError),
        ("transforms", "blur", TypeError),
        ("seed", 2**64, ValueError),
        ("lr", float("nan"), ValueError),
        ("batch_size", True, TypeError),
        ("warmup_steps", -1, ValueError),
        ("precision", "fp8", ValueError),
    ],
)
def test_finetune_config_refuses_what_it_used_to_accept(field, value, error):
    with pytest.raises(error, match=rf"^{field} must be .*got {value!r}"):
        FinetuneConfig(**{field: value})


def test_configs_normalise_what_they_accept():
    cfg = FinetuneConfig(transforms=("blur", "noise"), batch_size=np.int64(8), lr=1)
    assert cfg.transforms == ["blur", "noise"] and type(cfg.batch_size) is int and cfg.lr == 1.0
    assert DemoConfig(seeds=[3, 4]).seeds == (3, 4)
    for field, value in (("epochs", 1.5), ("seeds", "01"), ("data_seed", -1), ("lr", float("inf"))):
        with pytest.raises((TypeError, ValueError), match=f"^{field} must be"):
            DemoConfig(**{field: value})


def test_every_spec_describes_its_rule_and_accepts_its_bounds():
    for name, spec in SPECS.items():
        for bound in (spec.low, spec.high):
            if bound is not None and not (spec.low_open and bound == spec.low):
                value = [spec.kind(bound)] if spec.each else spec.kind(bound)
                assert check(name, value) is not None
        assert spec.rule()


# ---------------------------------------------------------------- the command line, before any work
def test_model_arg_num_classes_is_one_line_not_a_traceback(tmp_path, capsys):
    data = png_folder(tmp_path / "d")
    code = main(
        [
            "finetune",
            "--train",
            str(data),
            "--output",
            str(tmp_path / "o"),
            *TINY_MODEL,
            "--random-init",
            "--model-arg",
            "num_classes=7",
        ]
    )
    lines = error_line(capsys)
    assert code == 2 and len(lines) == 1 and "--model-arg num_classes=7" in lines[0]


def test_a_huge_seed_names_the_seed(tmp_path, capsys):
    data = png_folder(tmp_path / "d")
    code = main(
        [
            "finetune",
            "--train",
            str(data),
            "--output",
            str(tmp_path / "o"),
            *TINY_MODEL,
            "--random-init",
            "--seed",
            str(2**64),
        ]
    )
    lines = error_line(capsys)
    assert code == 2 and len(lines) == 1 and "--seed must be an integer in [0, 4294967295]" in lines[0]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--dpi", "0", "--dpi must be an integer in [20, 1000], got 0"),
        ("--dpi", "1", "--dpi must be an integer in [20, 1000], got 1"),  # found by test_cli_fuzz: a traceback
        ("--grad-norm-p", "nan", "--grad-norm-p must be a finite number >= 1, got nan"),
        ("--img-size", "0", "--img-size must be an integer in [1, 8192], got 0"),
    ],
)
def test_diagnose_refuses_bad_options_before_any_work(tmp_path, capsys, monkeypatch, option, value, message):
    import samnorm.diagnostics.cli as diag

    def no_work(*_, **__):
        raise AssertionError("a model was built before the options were checked")

    monkeypatch.setattr(diag, "_model", no_work)
    data = png_folder(tmp_path / "d")
    code = main(
        [
            "diagnose",
            "--checkpoint",
            "c.pth",
            "--id",
            str(data),
            "--ood",
            f"o={data / 'a'}",
            "--output",
            str(tmp_path / "o"),
            option,
            value,
        ]
    )
    lines = error_line(capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize("extra", [["--img-size", "100000"], ["--model-arg", "img_size=100000"]])
def test_memory_unsafe_image_sizes_are_refused_with_the_figure(tmp_path, capsys, extra):
    data = png_folder(tmp_path / "d")
    code = main(
        [
            "finetune",
            "--train",
            str(data),
            "--output",
            str(tmp_path / "o"),
            "--model",
            "test_resnet",
            "--random-init",
            "--workers",
            "0",
            *extra,
        ]
    )
    lines = error_line(capsys)
    assert code == 2 and len(lines) == 1 and "image needs 112 GiB" in lines[0], lines
    assert not (tmp_path / "o").exists()  # refused before any work


def test_options_that_size_one_tensor_together_are_bounded(tmp_path, capsys):
    # pseudo-ood --size 8192 --n 8: a 45 GiB grid, a MemoryError traceback (found by a probe)
    code = main(
        [
            "pseudo-ood",
            "--images",
            str(png_folder(tmp_path / "d")),
            "--output",
            str(tmp_path / "g.png"),
            "--size",
            "8192",
            "--n",
            "8",
        ]
    )
    lines = error_line(capsys)
    assert code == 2 and len(lines) == 1 and "--n 8 with --size 8192: 56 images" in lines[0] and "GiB" in lines[0]


def test_demo_seed_count_is_bounded_before_the_seeds_are_listed(capsys, monkeypatch):
    # samnorm demo --seeds 2147483648 built tuple(range(2**31)) and was killed for memory (found by the fuzz)
    import samnorm.demo.run

    monkeypatch.setattr(samnorm.demo.run, "run_demo", lambda config: pytest.fail("the demo started"))
    assert main(["demo", "--seeds", str(2**31)]) == 2
    assert error_line(capsys) == ["samnorm demo: error: --seeds must be an integer in [1, 1000], got 2147483648"]


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_an_image_size_the_model_cannot_take_is_one_line_before_any_work(tmp_path, capsys, command):
    # a fixed-size ViT (timm asserts the input size) given --img-size 32: an AssertionError traceback
    data = png_folder(tmp_path / "d")
    folders = {"finetune": ["--train", str(data)], "evaluate": ["--id", str(data), "--ood", f"o={data / 'a'}"]}
    code = main(
        [
            command,
            *folders[command],
            "--output",
            str(tmp_path / "o"),
            "--model",
            "vit_tiny_patch16_224",
            "--model-arg",
            "depth=1",
            "--random-init",
            "--img-size",
            "32",
            "--workers",
            "0",
            "--steps",
            "1",
        ][: None if command == "finetune" else -2]
    )
    lines = error_line(capsys)
    assert code == 2 and len(lines) == 1 and "the model does not take 3 x 32 x 32 images" in lines[0], lines
    assert "doesn't match model (224)" in lines[0]


# ---------------------------------------------------------------- images
def test_a_16_bit_grey_png_reads_at_its_grey_level(tmp_path):
    for c, level in (("a", 32768), ("b", 8192)):
        os.makedirs(tmp_path / c)
        Image.fromarray(np.full((6, 6), level, dtype=np.uint16)).save(tmp_path / c / "x.png")
    ds = ImageFolder(tmp_path, ImageTransform(size=4, mean=(0.0,), std=(1.0,)))
    assert abs(float(ds[0][0].mean()) - 32768 / 65535) < 1e-5  # was 1.0: every 16-bit image white
    assert abs(float(ds[1][0].mean()) - 8192 / 65535) < 1e-5


def test_an_extreme_aspect_ratio_is_read_without_a_huge_intermediate(tmp_path):
    # 1 x 5,000,000 px, about 10 KB as a PNG: resizing the short side to 32 px used to ask for a
    # 32 x 160M image (MemoryError); only the crop's region is resized now
    for c in ("a", "b"):
        os.makedirs(tmp_path / c)
        Image.new("L", (5_000_000, 1), 128 if c == "a" else 64).save(tmp_path / c / "x.png")
    assert os.path.getsize(tmp_path / "a" / "x.png") < 50_000
    ds = ImageFolder(tmp_path, ImageTransform(size=32, mean=(0.0,), std=(1.0,)))
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and y == 0 and abs(float(x.mean()) - 128 / 255) < 1e-5 and ds.skipped == 0


# ---------------------------------------------------------------- dataset sanity
def test_an_empty_class_folder_is_named(tmp_path, capsys):
    data = png_folder(tmp_path / "d")
    os.makedirs(data / "empty")
    with pytest.raises(ValueError, match=r"class folder .*empty' holds no images"):
        ImageFolder(data)
    code = main(["finetune", "--train", str(data), "--output", str(tmp_path / "o"), *TINY_MODEL, "--random-init"])
    lines = error_line(capsys)
    assert code == 2 and len(lines) == 1 and "empty' holds no images" in lines[0]


def test_a_single_class_folder_is_refused(tmp_path, capsys):
    data = png_folder(tmp_path / "d", classes=("only",))
    with pytest.raises(ValueError, match="has one class folder \\('only'\\)"):
        ImageFolder(data)
    code = main(["finetune", "--train", str(data), "--output", str(tmp_path / "o"), *TINY_MODEL, "--random-init"])
    lines = error_line(capsys)
    assert code == 2 and len(lines) == 1 and "at least two classes" in lines[0]
    assert ImageFolder(data, classes=["only", "other"]).classes == ["only", "other"]  # a subset of known classes


# ---------------------------------------------------------------- weights
@pytest.mark.parametrize("command", ["finetune", "evaluate", "diagnose"])
def test_no_weights_is_refused_unless_random_init_is_asked_for(tmp_path, capsys, command):
    data = png_folder(tmp_path / "d")
    folders = {
        "finetune": ["--train", str(data)],
        "evaluate": ["--id", str(data), "--ood", f"o={data / 'a'}"],
        "diagnose": ["--id", str(data), "--ood", f"o={data / 'a'}"],
    }[command]
    argv = [command, *folders, "--output", str(tmp_path / "o"), *TINY_MODEL]
    code = main(argv)
    lines = error_line(capsys)
    assert code == 2 and len(lines) == 1 and "--random-init" in lines[0] and "--checkpoint" in lines[0], lines
    assert ("--pretrained" in lines[0]) == (command == "finetune")
    code = main([*argv, "--random-init", "--checkpoint", "c.pth"])
    assert code == 2 and "contradict" in capsys.readouterr().err


def test_random_init_says_so_in_one_line(tmp_path, capsys):
    data = png_folder(tmp_path / "d")
    code = main(
        [
            "finetune",
            "--train",
            str(data),
            "--output",
            str(tmp_path / "o"),
            *TINY_MODEL,
            "--random-init",
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0 and err.count("starts from random weights (--random-init)") == 1, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--ood-loss", "energy", "--m-in", "nan"], "--m-in must be a finite number, got nan"),
        (["--grad-clip", "-1"], "--grad-clip must be a finite number > 0, got -1.0"),
        (["--grad-clip", "0"], "--grad-clip must be a finite number > 0, got 0.0"),
    ],
)
def test_non_finite_or_sign_flipping_finetune_settings_are_refused(image_folder, tmp_path, capsys, extra, message):
    code, _, err = cli(train_args(image_folder, tmp_path, *extra), capsys)
    one_line(code, err, message)
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_finetune_config_checks_every_number():
    for bad in (
        dict(lr=math.inf),
        dict(lr=math.nan),
        dict(grad_clip=0.0),
        dict(rho=-1.0),
        dict(eta=math.nan),
        dict(momentum=math.inf),
        dict(m_out=math.nan),
        dict(ood_weight=math.inf),
    ):
        with pytest.raises(ValueError, match="must be a finite number"):
            FinetuneConfig(**bad)
    assert FinetuneConfig(grad_clip=1.0, rho=0.0).grad_clip == 1.0
