"""Resuming a run and starting from a checkpoint: what a checkpoint may carry into the new run and
when resuming is refused (one error line, nothing overwritten). Tiny data: 16 px grayscale PNGs, a
one-block T2T-ViT, a few steps."""

from __future__ import annotations

import pytest
import torch
from helpers import FAST, cli, one_line, png_folder, tiny_t2t, toy, train_args

pytest.importorskip("timm")
from samnorm.train.recipe import CHECKPOINT_NAME, finetune

pytestmark = pytest.mark.filterwarnings("ignore:skipping unreadable image:RuntimeWarning")


def test_a_nan_starting_checkpoint_is_refused(image_folder, finished_run, tmp_path, capsys):
    ckpt = torch.load(finished_run / CHECKPOINT_NAME, weights_only=True)
    ckpt["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "nan.pt")
    args = [
        a for a in train_args(image_folder, tmp_path / "o", "--checkpoint", tmp_path / "nan.pt") if a != "--random-init"
    ]
    code, _, err = cli(args, capsys)
    one_line(code, err, "NaN/inf")
    assert not (tmp_path / "o" / CHECKPOINT_NAME).exists()


@pytest.mark.parametrize("content", [b"", b"\x00garbage"])
def test_resume_from_an_empty_or_garbage_checkpoint_is_one_line(image_folder, tmp_path, capsys, content):
    (tmp_path / CHECKPOINT_NAME).write_bytes(content)
    code, _, err = cli(train_args(image_folder, tmp_path, "--resume"), capsys)
    one_line(code, err, "cannot resume from")


def test_resume_refuses_a_changed_training_folder(tmp_path, capsys):
    root = png_folder(tmp_path / "d")
    out = tmp_path / "o"
    code, _, err = cli(train_args(root, out, "--steps", "3", "--checkpoint-every", "1"), capsys)
    assert code == 0, err
    png_folder(tmp_path / "d", per_class=5)  # one more image per class
    code, _, err = cli(train_args(root, out, "--steps", "3", "--checkpoint-every", "1", "--resume"), capsys)
    one_line(code, err, "the training data changed since it was written (12 -> 15 images)")


def test_the_recorded_image_size_is_honoured_or_the_conflict_named(image_folder, tmp_path, capsys):
    base = [
        "--model",
        "test_resnet",
        "--model-arg",
        "in_chans=1",
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--no-progress",
        "--steps",
        "1",
    ]
    code, _, err = cli(
        ["finetune", "--train", image_folder, "--output", tmp_path / "a", *base, "--img-size", "24", "--random-init"],
        capsys,
    )
    assert code == 0, err
    ckpt = tmp_path / "a" / CHECKPOINT_NAME
    code, _, err = cli(
        [
            "finetune",
            "--train",
            image_folder,
            "--output",
            tmp_path / "b",
            "--checkpoint",
            ckpt,
            "--workers",
            "0",
            "--batch-size",
            "4",
            "--no-progress",
            "--steps",
            "1",
        ],
        capsys,
    )
    assert code == 0, err
    assert torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)["metadata"]["transform"]["size"] == 24
    code, _, err = cli(
        [
            "finetune",
            "--train",
            image_folder,
            "--output",
            tmp_path / "c",
            "--checkpoint",
            ckpt,
            "--img-size",
            "32",
            "--workers",
            "0",
            "--no-progress",
        ],
        capsys,
    )
    one_line(code, err, "image size 32 conflicts with the 24 px recorded")


def test_recorded_model_arguments_pass_an_allow_list(finished_run, image_folder, tmp_path, capsys):
    from samnorm.models import create_model

    ckpt = torch.load(finished_run / CHECKPOINT_NAME, weights_only=True)
    ckpt["model_kwargs"]["checkpoint_path"] = str(tmp_path / "elsewhere.pth")  # timm would open it
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.warns(UserWarning, match=r"ignoring model argument\(s\) \['checkpoint_path'\]"):
        model = create_model(None, checkpoint=tmp_path / "c.pt")
    assert torch.equal(model.state_dict()["head.weight"], ckpt["model"]["head.weight"])
    with pytest.warns(UserWarning, match="ignoring model argument"):
        code, _, err = cli(
            [
                "evaluate",
                "--checkpoint",
                tmp_path / "c.pt",
                "--id",
                image_folder,
                "--ood",
                f"o={image_folder}",
                "--output",
                tmp_path / "e",
                "--workers",
                "0",
            ],
            capsys,
        )
    assert code == 0, err


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("img_size=16", "img_size=32", "model argument img_size: 16 -> 32"),
        ("embed_dim=16", "embed_dim=32", "model argument embed_dim: 16 -> 32"),
    ],
)
def test_resume_refuses_another_model_or_image_size(image_folder, finished_run, tmp_path, capsys, old, new, message):
    out = tmp_path / "o"
    out.mkdir()
    for n in (CHECKPOINT_NAME, "log.jsonl"):
        (out / n).write_bytes((finished_run / n).read_bytes())
    before = (out / CHECKPOINT_NAME).read_bytes()
    args = [new if a == old else a for a in train_args(image_folder, out, "--resume")]
    code, _, err = cli(args, capsys)
    one_line(code, err, message)
    assert "--model-arg" in err and (out / CHECKPOINT_NAME).read_bytes() == before


def test_resume_with_another_architecture_is_one_line(tmp_path):
    # no recorded model name to compare (library use): the weights themselves do not fit
    finetune(tiny_t2t(), toy(), output_dir=tmp_path, steps=1, **FAST)
    with pytest.raises(ValueError, match="its weights do not fit this model"):
        finetune(tiny_t2t(classes=4), toy(), output_dir=tmp_path, steps=1, resume=True, **FAST)


def test_resume_from_a_nan_checkpoint_is_refused(tmp_path):
    finetune(tiny_t2t(), toy(), output_dir=tmp_path, steps=1, **FAST)
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    ckpt["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match=r"the weights resumed from .* hold NaN/inf values"):
        finetune(tiny_t2t(), toy(), output_dir=tmp_path, steps=1, resume=True, **FAST)


def test_resume_without_model_options_takes_the_checkpoints(image_folder, finished_run, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    for n in (CHECKPOINT_NAME, "log.jsonl"):
        (out / n).write_bytes((finished_run / n).read_bytes())
    bare = [
        "finetune",
        "--train",
        image_folder,
        "--output",
        out,
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--no-progress",
        "--log-every",
        "1",
        "--resume",
    ]
    code, _, err = cli(bare, capsys)
    assert code == 0 and "fine-tuning t2t_vit_7" in err and "resuming from" in err, err
    code, _, err = cli([*bare, "--img-size", "32"], capsys)
    one_line(code, err, "image size 32 conflicts with the 16 px recorded in")
