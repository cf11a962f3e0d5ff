"""Issue 11: nothing lost, nothing silently wrong, under bad input, divergence and re-runs.

One regression test (or parametrized case) per finding, numbered as in the issue. Each used to fail
on the code before the fix. Tiny data: 16 px grayscale PNGs, a one-block T2T-ViT, a few steps.
"""

from __future__ import annotations

import json
import math
import os
import threading

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("timm")
from samnorm.cli import main
from samnorm.data.folders import ImageFolder, ImageTransform
from samnorm.recipe import CHECKPOINT_NAME, DivergedError, FinetuneConfig, finetune

pytestmark = pytest.mark.filterwarnings("ignore:skipping unreadable image:RuntimeWarning")

TINY = [
    "--model",
    "t2t_vit_7",
    "--model-arg",
    "img_size=16",
    "--model-arg",
    "in_chans=1",
    "--model-arg",
    "embed_dim=16",
    "--model-arg",
    "depth=1",
    "--model-arg",
    "num_heads=2",
    "--workers",
    "0",
    "--random-init",
]
FAST = dict(batch_size=4, progress=False, log=lambda _: None)


def png_folder(root, classes=("a", "b", "c"), per_class=4, size=(16, 16)):
    from PIL import Image

    rng = np.random.default_rng(len(str(root)))
    for ci, c in enumerate(classes):
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            Image.fromarray((rng.random(size[::-1]) * 60 + 60 * ci).astype(np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return png_folder(tmp_path_factory.mktemp("robust") / "train")


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 3-step CLI run (12 images, batch 4)."""
    out = tmp_path_factory.mktemp("finished")
    assert main(train_args(data, out)) == 0
    return out


def train_args(data, out, *extra):
    return [
        "finetune",
        "--train",
        str(data),
        "--output",
        str(out),
        *TINY,
        "--batch-size",
        "4",
        "--no-progress",
        "--log-every",
        "1",
        *extra,
    ]


def cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code, err, message, status=2):
    """Exit ``status`` and one error line (after finetune's "fine-tuning ... -> OUT" line, if any)."""
    lines = [
        line
        for line in err.strip().splitlines()
        if not line.startswith("fine-tuning ") and not line.endswith("starts from random weights (--random-init)")
    ]
    assert code == status and len(lines) == 1 and lines[0].startswith("samnorm ") and message in lines[0], err


def tiny_t2t(seed=0, classes=3):
    from samnorm.models.t2t_vit import T2TViT

    torch.manual_seed(seed)
    return T2TViT(img_size=16, in_chans=1, num_classes=classes, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)


def toy(n=32):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 16, 16, generator=g), torch.arange(n) % 3)


# ---------------------------------------------------------------- 1. no data loss
def test_1_a_run_in_the_output_folder_is_never_replaced_without_being_asked(data, finished, tmp_path, capsys):
    before = {n: (finished / n).read_bytes() for n in (CHECKPOINT_NAME, "log.jsonl")}
    code, _, err = cli(train_args(data, finished, "--steps", "1"), capsys)
    one_line(code, err, "already holds a run")
    assert {n: (finished / n).read_bytes() for n in before} == before
    # --overwrite replaces it; --resume with --overwrite is contradictory
    copy = tmp_path / "copy"
    copy.mkdir()
    for n, b in before.items():
        (copy / n).write_bytes(b)
    code, _, err = cli(train_args(data, copy, "--steps", "1", "--overwrite"), capsys)
    assert code == 0, err
    assert torch.load(copy / CHECKPOINT_NAME, weights_only=True)["step"] == 1
    code, _, err = cli(train_args(data, copy, "--resume", "--overwrite"), capsys)
    one_line(code, err, "pass one of them")


# ---------------------------------------------------------------- 2. divergence is never saved as success
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--ood-loss", "energy", "--m-in", "nan"], "--m-in must be a finite number, got nan"),
        (["--grad-clip", "-1"], "--grad-clip must be a finite number > 0, got -1.0"),
        (["--grad-clip", "0"], "--grad-clip must be a finite number > 0, got 0.0"),
    ],
)
def test_2_non_finite_or_sign_flipping_settings_are_refused(data, tmp_path, capsys, extra, message):
    code, _, err = cli(train_args(data, tmp_path, *extra), capsys)
    one_line(code, err, message)
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_2_a_nan_starting_checkpoint_is_refused(data, finished, tmp_path, capsys):
    ckpt = torch.load(finished / CHECKPOINT_NAME, weights_only=True)
    ckpt["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "nan.pt")
    args = [a for a in train_args(data, tmp_path / "o", "--checkpoint", tmp_path / "nan.pt") if a != "--random-init"]
    code, _, err = cli(args, capsys)
    one_line(code, err, "NaN/inf")
    assert not (tmp_path / "o" / CHECKPOINT_NAME).exists()


def test_2_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    # SGD at lr 1e30: the first step is finite, the weights then overflow. Checkpoints every step,
    # log lines never: the check before each save catches it.
    kw = dict(steps=6, checkpoint_every=1, log_every=100, optimizer="sgd", lr=1e30, momentum=0.0, **FAST)
    with pytest.raises(DivergedError, match=r"training diverged: .* the last good checkpoint \(step (\d)\)") as info:
        finetune(tiny_t2t(), toy(), output_dir=tmp_path, **kw)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert f"(step {saved['step']})" in str(info.value) and saved["step"] < 6
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    # Only ever a sync where the loop already had one: at log lines and checkpoints.
    with pytest.raises(DivergedError, match="no checkpoint was written"):
        finetune(tiny_t2t(), toy(), **{**kw, "checkpoint_every": 100, "log_every": 2})


def test_2_divergence_in_the_cli_exits_3_with_one_line(data, tmp_path, capsys):
    code, _, err = cli(
        train_args(
            data,
            tmp_path,
            "--optimizer",
            "sgd",
            "--lr",
            "1e30",
            "--momentum",
            "0",
            "--checkpoint-every",
            "1",
            "--log-every",
            "100",
        ),
        capsys,
    )
    one_line(code, err, "samnorm finetune: stopped: training diverged", status=3)


# ---------------------------------------------------------------- 3. one line, exit 2, never a hang
def test_3_a_named_pipe_called_x_png_is_not_read(tmp_path):
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


def test_3_a_decompression_bomb_is_skipped_and_counted(tmp_path, monkeypatch):
    from PIL import Image

    root = png_folder(tmp_path, classes=("a", "b"), per_class=3)
    Image.new("L", (64, 64)).save(root / "a" / "1.png")  # 4096 pixels: a bomb under a 1,000-pixel limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    ds = ImageFolder(root, ImageTransform(size=8))
    with pytest.warns(RuntimeWarning, match="unreadable image .*1.png"):
        assert sum(len(x) for x, _ in DataLoader(ds, batch_size=3)) == 6
    assert ds.skipped == 1


@pytest.mark.parametrize("content", [b"", b"\x00garbage"])
def test_3_resume_from_an_empty_or_garbage_checkpoint_is_one_line(data, tmp_path, capsys, content):
    (tmp_path / CHECKPOINT_NAME).write_bytes(content)
    code, _, err = cli(train_args(data, tmp_path, "--resume"), capsys)
    one_line(code, err, "cannot resume from")


def test_3_an_all_corrupt_folder_read_by_workers_names_the_real_problem(tmp_path, capsys):
    for c in ("a", "b"):
        os.makedirs(tmp_path / "d" / c)
        for i in range(4):
            (tmp_path / "d" / c / f"{i}.png").write_bytes(b"not a png")
    code, _, err = cli([*train_args(tmp_path / "d", tmp_path / "o")[:-2], "--workers", "2"], capsys)
    one_line(code, err, "samnorm finetune: error: no readable image left")


@pytest.mark.parametrize("command", ["evaluate", "finetune"])
def test_3_a_file_as_output_fails_before_the_work(data, tmp_path, capsys, command):
    (tmp_path / "file").write_text("x")
    # --model no_such_net would only fail once the model is built: the output is checked first
    args = {"evaluate": ["--id", data, "--ood", f"o={data}"], "finetune": ["--train", data]}[command]
    code, _, err = cli(
        [command, "--model", "no_such_net", *args, "--output", tmp_path / "file", "--workers", "0"], capsys
    )
    one_line(code, err, "is a file, not a folder")


# ---------------------------------------------------------------- 4. links: no cycle, no relabelling
def test_4_directory_links_below_a_class_are_not_followed(tmp_path):
    root = png_folder(tmp_path / "d", per_class=2)
    os.symlink(".", root / "a" / "self")  # a cycle: 6 images became hundreds
    os.symlink(root, root / "b" / "up")  # the other classes' images under b's label
    ds = ImageFolder(root)
    assert len(ds) == 6 and sorted(ds.targets) == [0, 0, 1, 1, 2, 2]
    flat = ImageFolder(root / "a", flat=True)
    assert len(flat) == 2


def test_4_class_folder_links_may_not_overlap(tmp_path):
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


# ---------------------------------------------------------------- 5. reproducibility
def test_5_the_seed_is_set_before_the_model_is_built(data, tmp_path, capsys):
    states = []
    for i in range(2):
        torch.manual_seed(100 + i)  # whatever ran before must not matter
        out = tmp_path / str(i)
        code, _, err = cli(train_args(data, out, "--steps", "1", "--seed", "3"), capsys)
        assert code == 0, err
        states.append(torch.load(out / CHECKPOINT_NAME, weights_only=True)["model"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_5_resume_refuses_a_changed_training_folder(tmp_path, capsys):
    root = png_folder(tmp_path / "d")
    out = tmp_path / "o"
    code, _, err = cli(train_args(root, out, "--steps", "3", "--checkpoint-every", "1"), capsys)
    assert code == 0, err
    png_folder(tmp_path / "d", per_class=5)  # one more image per class
    code, _, err = cli(train_args(root, out, "--steps", "3", "--checkpoint-every", "1", "--resume"), capsys)
    one_line(code, err, "the training data changed since it was written (12 -> 15 images)")


def test_5_the_recorded_image_size_is_honoured_or_the_conflict_named(data, tmp_path, capsys):
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
        ["finetune", "--train", data, "--output", tmp_path / "a", *base, "--img-size", "24", "--random-init"], capsys
    )
    assert code == 0, err
    ckpt = tmp_path / "a" / CHECKPOINT_NAME
    code, _, err = cli(
        [
            "finetune",
            "--train",
            data,
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
            data,
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


# 5: "the log after a resume equals the uninterrupted one" is test_recipe.py::test_the_log_after_a_resume_...


# ---------------------------------------------------------------- 6. checkpoint-borne arguments
def test_6_recorded_model_arguments_pass_an_allow_list(finished, data, tmp_path, capsys):
    from samnorm.models import create_model

    ckpt = torch.load(finished / CHECKPOINT_NAME, weights_only=True)
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
                data,
                "--ood",
                f"o={data}",
                "--output",
                tmp_path / "e",
                "--workers",
                "0",
            ],
            capsys,
        )
    assert code == 0, err


# ---------------------------------------------------------------- 7. smaller findings
def test_7_stale_temps_are_removed_and_every_result_file_is_replaced_atomically(
    data, finished, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / (CHECKPOINT_NAME + ".tmp-999999999")  # a writer killed mid-save
    stale.write_bytes(b"half")
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append(os.path.basename(b)), real_replace(a, b)))
    code, _, err = cli(train_args(data, run, "--steps", "1"), capsys)
    assert code == 0, err
    assert not stale.exists()
    assert {"config.json", "log.jsonl", CHECKPOINT_NAME} <= set(replaced)
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "scores.json.tmp-999999999").write_text("{")
    code, _, err = cli(
        [
            "evaluate",
            "--checkpoint",
            finished / CHECKPOINT_NAME,
            "--id",
            data,
            "--ood",
            f"o={data}",
            "--output",
            tmp_path / "ev",
            "--workers",
            "0",
        ],
        capsys,
    )
    assert code == 0, err
    assert {"results.md", "results.csv", "scores.json"} <= set(replaced)
    assert sorted(os.listdir(tmp_path / "ev")) == ["evaluate.manifest.json", "results.csv", "results.md", "scores.json"]


def test_7_diagnose_gives_every_ood_set_its_own_files(tmp_path):
    from samnorm.diagnostics.cli import write_report

    r = {
        "ID": {"grad_norm": np.array([1.0, 2.0]), "max_logit": np.array([3.0, 4.0])},
        "a/b": {"grad_norm": np.array([0.5, 0.6]), "max_logit": np.array([1.0, 1.5])},
        "a_b": {"grad_norm": np.array([0.7, 0.2]), "max_logit": np.array([2.0, 0.5])},
    }
    files = write_report(r, tmp_path, dpi=20)["files"]
    pair = [f for f in files if f.startswith("grad_norm_max_logit_")]
    assert len(pair) == 2 and len(set(pair)) == 2 and all((tmp_path / f).exists() for f in pair)


def test_7_metrics_reject_inf_unless_allowed():
    from sklearn.metrics import roc_auc_score

    from samnorm.ood import auroc, ood_metrics

    inf = float("inf")
    with pytest.raises(ValueError, match=r"infinite scores .* allow_inf=True"):
        auroc([inf, inf], [inf])  # used to give 0.5 silently
    with pytest.raises(ValueError, match="ood_scores contains 1 infinite"):
        ood_metrics([1.0, 2.0], [0.0, -inf])
    with pytest.raises(ValueError):  # scikit-learn agrees that these are not scores
        roc_auc_score([1, 1, 0], [inf, 1.0, 0.0])
    # allowed: +-inf rank above / below every finite score, like the largest / smallest finite floats
    big = np.finfo(np.float64).max
    assert auroc([inf, 1.0], [0.0, -inf], allow_inf=True) == auroc([big, 1.0], [0.0, -big]) == 1.0
    assert auroc([inf, 0.0], [inf, 1.0], allow_inf=True) == pytest.approx(
        roc_auc_score([1, 1, 0, 0], [big, 0.0, big, 1.0])
    )


def test_7_a_temperature_that_overflows_the_scores_warns():
    from samnorm.ood import energy, msp

    logits = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    for score in (msp, energy):
        with pytest.warns(RuntimeWarning, match="temperature 1e-40 makes 2 of 2 scores non-finite"):
            score(logits, temperature=1e-40)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        msp(logits, temperature=1000.0), energy(logits, temperature=1e-3)


def test_7_mahalanobis_needs_a_labelled_fit_folder(finished, data, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted((data / "a").iterdir())):
        os.symlink(p, flat / f"{i}.png")
    common = [
        "evaluate",
        "--checkpoint",
        finished / CHECKPOINT_NAME,
        "--id",
        data,
        "--ood",
        f"o={data}",
        "--output",
        tmp_path / "e",
        "--workers",
        "0",
        "--scorers",
        "msp,mahalanobis",
    ]
    code, _, err = cli([*common, "--fit", flat], capsys)
    one_line(code, err, "Mahalanobis needs labelled ID training images")
    code, _, err = cli([*common, "--fit", data], capsys)
    assert code == 0, err


def test_7_the_no_class_folders_hint_names_no_missing_option(tmp_path, capsys):
    flat = png_folder(tmp_path / "d", classes=("a",), per_class=2) / "a"
    code, _, err = cli(train_args(flat, tmp_path / "o"), capsys)
    one_line(code, err, "has no class sub-folders")
    assert "flat=True" not in err


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


# ---------------------------------------------------------------- review of issue 11 (the CLI probed again)
@pytest.mark.parametrize(
    "old, new, message",
    [
        ("img_size=16", "img_size=32", "model argument img_size: 16 -> 32"),
        ("embed_dim=16", "embed_dim=32", "model argument embed_dim: 16 -> 32"),
    ],
)
def test_r1_resume_refuses_another_model_or_image_size(data, finished, tmp_path, capsys, old, new, message):
    out = tmp_path / "o"
    out.mkdir()
    for n in (CHECKPOINT_NAME, "log.jsonl"):
        (out / n).write_bytes((finished / n).read_bytes())
    before = (out / CHECKPOINT_NAME).read_bytes()
    args = [new if a == old else a for a in train_args(data, out, "--resume")]
    code, _, err = cli(args, capsys)
    one_line(code, err, message)
    assert "--model-arg" in err and (out / CHECKPOINT_NAME).read_bytes() == before


def test_r2_resume_with_another_architecture_is_one_line(tmp_path):
    # no recorded model name to compare (library use): the weights themselves do not fit
    finetune(tiny_t2t(), toy(), output_dir=tmp_path, steps=1, **FAST)
    with pytest.raises(ValueError, match="its weights do not fit this model"):
        finetune(tiny_t2t(classes=4), toy(), output_dir=tmp_path, steps=1, resume=True, **FAST)


def test_r8_resume_from_a_nan_checkpoint_is_refused(tmp_path):
    finetune(tiny_t2t(), toy(), output_dir=tmp_path, steps=1, **FAST)
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    ckpt["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match=r"the weights resumed from .* hold NaN/inf values"):
        finetune(tiny_t2t(), toy(), output_dir=tmp_path, steps=1, resume=True, **FAST)


@pytest.mark.parametrize(
    "error, status, message",
    [
        (DivergedError("training diverged: non-finite loss"), 3, "samnorm demo: stopped: training diverged"),
        (KeyboardInterrupt(), 130, "samnorm demo: interrupted"),
    ],
)
def test_r3_r7_divergence_and_ctrl_c_are_one_line_in_every_command(monkeypatch, capsys, error, status, message):
    import samnorm.demo.run

    def run_demo(config):
        raise error

    monkeypatch.setattr(samnorm.demo.run, "run_demo", run_demo)
    code, _, err = cli(["demo", "--no-plots", "--no-progress"], capsys)
    one_line(code, err, message, status=status)


def test_r7_ctrl_c_during_finetune_names_the_checkpoint_kept(tmp_path):
    def ctrl_c_at_step_3(line):
        if line.startswith("{") and json.loads(line)["step"] == 3:
            raise KeyboardInterrupt

    kw = dict(FAST, steps=6, checkpoint_every=1, log_every=1, log=ctrl_c_at_step_3)
    with pytest.raises(KeyboardInterrupt, match=r"interrupted; the last checkpoint \(step 2\) is kept in .*--resume"):
        finetune(tiny_t2t(), toy(), output_dir=tmp_path, **kw)
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 2
    with pytest.raises(KeyboardInterrupt, match="interrupted; no checkpoint was written"):
        finetune(tiny_t2t(), toy(), **kw)


def test_r4_overwrite_removes_the_old_run_before_the_new_one_starts(data, finished, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    for n in (CHECKPOINT_NAME, "log.jsonl", "config.json"):
        (out / n).write_bytes((finished / n).read_bytes())
    (out / "notes.txt").write_text("mine")
    (out / f"{CHECKPOINT_NAME}.tmp-999999999").write_bytes(b"half")  # a killed writer's
    # the new run diverges before its first save: nothing of the old run may be left beside it
    code, _, err = cli(
        train_args(
            data,
            out,
            "--overwrite",
            "--optimizer",
            "sgd",
            "--lr",
            "1e30",
            "--momentum",
            "0",
            "--checkpoint-every",
            "100",
        ),
        capsys,
    )
    assert code == 3 and "removed the previous run's checkpoint.pt, log.jsonl, config.json" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "log.jsonl", "notes.txt"]
    assert json.loads((out / "config.json").read_text())["lr"] == 1e30


def test_r5_a_file_link_may_not_put_an_image_under_another_label(tmp_path):
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


@pytest.mark.parametrize("inside", ["train", "class link"])
def test_r6_an_output_folder_inside_the_training_images_is_refused_first(tmp_path, capsys, inside):
    root = png_folder(tmp_path / "train", per_class=4)
    if inside == "class link":  # a class folder that is a link: its real path counts
        os.rename(root / "c", tmp_path / "c_real")
        os.symlink(tmp_path / "c_real", root / "c")
        out = tmp_path / "c_real" / "out"
    else:
        out = root / "out"
    code, _, err = cli(train_args(root, out), capsys)
    one_line(code, err, "is inside --train")
    assert not out.exists()


def test_r1_resume_without_model_options_takes_the_checkpoints(data, finished, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    for n in (CHECKPOINT_NAME, "log.jsonl"):
        (out / n).write_bytes((finished / n).read_bytes())
    bare = [
        "finetune",
        "--train",
        data,
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
