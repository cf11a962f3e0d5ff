"""The samnorm CLI on tiny image folders made here, and the same commands in 2 gloo processes."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
from helpers import TINY, cli, free_port, one_line, png_folder, train_args

from samnorm.cli import build_parser, main
from samnorm.cli.common import UsageError
from samnorm.train.recipe import CHECKPOINT_NAME, DivergedError

pytestmark = pytest.mark.filterwarnings("ignore:skipping unreadable image:RuntimeWarning")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """train/ (3 classes x 8, one corrupt file), val/ (3 x 3), ood/ (7 colour images in sub-folders, one corrupt)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.random((18, 22)) * 70 + 80 * c).astype(np.uint8)).save(d / f"{i}.png")
    (root / "train" / "class1" / "broken.jpg").write_bytes(b"not a jpeg")
    for sub in ("a", "b/c"):
        (root / "ood" / sub).mkdir(parents=True)
    for i in range(7):
        img = Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8))
        img.save(root / "ood" / ("a" if i < 4 else "b/c") / f"{i}.jpg")
    (root / "ood" / "a" / "zz_truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n0000")
    return root


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(
        [
            "finetune",
            "--train",
            str(folders / "train"),
            "--output",
            str(out),
            *TINY,
            "--batch-size",
            "4",
            "--epochs",
            "1",
            "--log-every",
            "2",
            "--checkpoint-every",
            "3",
            "--no-progress",
        ]
    )
    assert code == 0
    return out


def test_finetune_writes_a_checkpoint_that_records_everything(trained):
    ckpt = torch.load(trained / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["world_size"] == 1  # 25 images // batch 4
    assert ckpt["model_name"] == "t2t_vit_7" and ckpt["model_kwargs"]["embed_dim"] == 16
    assert ckpt["metadata"]["classes"] == ["class0", "class1", "class2"]
    assert ckpt["metadata"]["transform"]["size"] == 16 and len(ckpt["metadata"]["transform"]["mean"]) == 1
    logged = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4, 6]
    assert json.loads((trained / "config.json").read_text())["optimizer"] == "sam-on"


def test_evaluate_tables_and_raw_scores(folders, trained, tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    code, out, err = run(
        [
            "evaluate",
            "--checkpoint",
            str(trained / "checkpoint.pt"),
            "--id",
            str(folders / "val"),
            "--ood",
            f"noise={folders / 'ood'}",
            "--fit",
            str(folders / "train"),
            "--scorers",
            "msp,energy,react",
            "--output",
            str(tmp_path),
            "--workers",
            "0",
            "--batch-size",
            "4",
        ],
        capsys,
    )
    assert code == 0, err
    assert "| Energy | noise |" in out and "left out 1 unreadable" in err
    data = json.loads((tmp_path / "scores.json").read_text())
    assert len(data["scores"]["MSP"]["ID"]) == 9 and len(data["scores"]["MSP"]["noise"]) == 7
    assert len(data["files"]["noise"]) == 7 and data["skipped"]["noise"][0].endswith("zz_truncated.png")
    for row in data["metrics"]:
        if row["ood_set"] == "noise":
            s_id, s_ood = data["scores"][row["scorer"]]["ID"], data["scores"][row["scorer"]]["noise"]
            ref = roc_auc_score([1] * len(s_id) + [0] * len(s_ood), s_id + s_ood)
            assert row["AUROC"] == pytest.approx(ref, abs=1e-12)
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("scorer,ood_set,FPR95,AUROC") and len(csv_lines) == 1 + 3 * 2
    assert "Model: t2t_vit_7" in (tmp_path / "results.md").read_text()


# an evaluate command whose model would only fail later: the options are checked first
_EVAL_NO_MODEL = [
    "evaluate",
    "--model",
    "no_such_net",
    "--id",
    "{root}/val",
    "--ood",
    "o={root}/ood",
    "--output",
    "{tmp}",
]


@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate", "--id", "{root}/missing", "--ood", "o={root}/ood", "--output", "{tmp}"], "does not exist"),
        (
            ["evaluate", "--id", "{root}/val", "--ood", "o={root}/ood", "--output", "{tmp}", "--scorers", "msp,wat"],
            "unknown scorer",
        ),
        (
            ["evaluate", "--id", "{root}/val", "--ood", "o={root}/ood", "--ood", "o={root}/val", "--output", "{tmp}"],
            "share a name",
        ),
        (
            [
                "evaluate",
                "--checkpoint",
                "{ckpt}",
                "--model",
                "t2t_vit_7",
                "--id",
                "{root}/val",
                "--ood",
                "o={root}/ood",
                "--output",
                "{tmp}",
            ],
            "does not fit T2TViT: missing keys: blocks.1.",
        ),
        (
            [
                "evaluate",
                "--checkpoint",
                "{tmp}/garbage.pt",
                "--id",
                "{root}/val",
                "--ood",
                "o={root}/ood",
                "--output",
                "{tmp}",
            ],
            "cannot read",
        ),
        (
            [
                "evaluate",
                "--checkpoint",
                "{ckpt}",
                "--id",
                "{root}/val",
                "--ood",
                "o={root}/ood",
                "--output",
                "{tmp}",
                "--scorers",
                "react",
            ],
            "need ID training statistics",
        ),
        (
            ["finetune", "--train", "{root}/train", "--output", "{tmp}", "--model", "no_such_net", "--random-init"],
            "unknown model name",
        ),
        (["finetune", "--train", "{root}/val/class0", "--output", "{tmp}"], "no class sub-folders"),
        # checked before a model is built (no_such_net would fail later) or an image is read
        ([*_EVAL_NO_MODEL, "--batch-size", "0"], "--batch-size must be an integer in [1, 1048576], got 0"),
        ([*_EVAL_NO_MODEL, "--tpr", "95"], "--tpr: tpr must be a fraction"),
        ([*_EVAL_NO_MODEL, "--convention", "openood_v2"], "unknown convention"),
        ([*_EVAL_NO_MODEL, "--scorer-opt", "rankfeat.blocks=-1"], "scorer 'rankfeat' is not in --scorers"),
        ([*_EVAL_NO_MODEL, "--scorer-opt", "msp.temprature=2"], "has no option 'temprature'; its options: temperature"),
        ([*_EVAL_NO_MODEL, "--scorer-opt", "temperature=2"], "SCORER.KEY=VALUE"),
        (["finetune", "--train", "{root}/train", "--output", "{tmp}", "--batch-size", "0"], "--batch-size must be"),
    ],
)
def test_bad_input_gets_one_clear_line(folders, trained, tmp_path, capsys, args, message):
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage")
    fill = dict(root=folders, tmp=tmp_path, ckpt=trained / "checkpoint.pt")
    code, _out, err = run([a.format(**fill) for a in args] + ["--workers", "0"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("samnorm ") and message in lines[0], err


def test_scorer_options_reach_the_scorers(folders, trained, tmp_path, capsys):
    common = [
        "evaluate",
        "--checkpoint",
        str(trained / "checkpoint.pt"),
        "--id",
        str(folders / "val"),
        "--ood",
        f"noise={folders / 'ood'}",
        "--scorers",
        "msp,rankfeat",
        "--workers",
        "0",
    ]
    code, _, err = run([*common, "--output", str(tmp_path / "plain")], capsys)
    assert code == 0, err
    code, _, err = run(
        [
            *common,
            *("--output", str(tmp_path / "hot"), "--scorer-opt", "msp.temperature=1e9"),
            *("--scorer-opt", "rankfeat.method=power", "--scorer-opt", "rankfeat.blocks=-1,"),
        ],
        capsys,
    )
    assert code == 0, err
    plain, hot = (json.loads((tmp_path / d / "scores.json").read_text()) for d in ("plain", "hot"))
    assert hot["scorer_options"] == {"MSP": {"temperature": 1e9}, "RankFeat": {"method": "power", "blocks": [-1]}}
    # at T = 1e9 the softmax is uniform over the 3 classes; at T = 1 it is not
    assert np.allclose(hot["scores"]["MSP"]["ID"], 1 / 3) and not np.allclose(plain["scores"]["MSP"]["ID"], 1 / 3)
    # power iteration approximates the SVD: close, not equal
    np.testing.assert_allclose(hot["scores"]["RankFeat"]["ID"], plain["scores"]["RankFeat"]["ID"], rtol=1e-3)
    assert "rankfeat.blocks=-2,-1" in build_parser()._subparsers._group_actions[0].choices["evaluate"].format_help()


def test_other_class_count_needs_new_head(folders, trained, tmp_path, capsys):
    os.makedirs(tmp_path / "two")
    for c in ("class0", "class1"):
        os.symlink(folders / "train" / c, tmp_path / "two" / c)
    common = [
        "finetune",
        "--train",
        str(tmp_path / "two"),
        "--output",
        str(tmp_path / "o"),
        "--checkpoint",
        str(trained / "checkpoint.pt"),
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--no-progress",
    ]
    code, _, err = run(common, capsys)
    assert code == 2 and "--new-head" in err
    code, _, err = run([*common, "--new-head"], capsys)
    assert code == 0, err
    assert torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)["model"]["head.weight"].shape[0] == 2


def test_pseudo_ood_grid(folders, tmp_path, capsys):
    code, out, _ = run(
        [
            "pseudo-ood",
            "--images",
            str(folders / "train"),
            "--output",
            str(tmp_path / "g.png"),
            "--n",
            "5",
            "--size",
            "24",
            "--channels",
            "1",
            "--transforms",
            "jigsaw,blur",
        ],
        capsys,
    )
    assert code == 0 and "5 images x 2 transforms" in out
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = run(
        ["pseudo-ood", "--images", str(folders / "train"), "--output", str(tmp_path / "h.png"), "--size", "0"], capsys
    )
    assert code == 2 and err.strip() == "samnorm pseudo-ood: error: --size must be an integer in [1, 8192], got 0"


def test_parser():
    args = build_parser().parse_args(
        [
            "evaluate",
            "--id",
            "v",
            "--ood",
            "some/dir/textures",
            "--output",
            "o",
            "--model-arg",
            "img_size=(32, 32)",
            "--model-arg",
            "name=abc",
        ]
    )
    assert args.ood == [("textures", "some/dir/textures")]
    assert args.model_arg == [("img_size", (32, 32)), ("name", "abc")]


# Runs `samnorm ARGS --help` for each ARGS in one fresh interpreter, then names the heavy modules loaded.
_HELP_SCRIPT = """
import contextlib, io, sys
from samnorm.cli import main
for argv in {cases!r}:
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        main(argv + ["--help"])
    assert "usage: samnorm" in out.getvalue(), argv
print(sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules))
"""


def test_help_imports_neither_torch_nor_timm():
    cases = [[], ["finetune"], ["evaluate"], ["pseudo-ood"], ["diagnose"], ["demo"]]
    res = subprocess.run(
        [sys.executable, "-c", _HELP_SCRIPT.format(cases=cases)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


def test_cli_modules_import_no_private_names_and_not_each_other():
    import ast

    import samnorm

    root = os.path.dirname(samnorm.__file__)
    # The commands (samnorm/cli/*.py, the plugins) share samnorm.cli.common; only the package's
    # __init__ (build_parser, main) imports the commands.
    commands = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "cli", "*.py")))
    assert {"cli/__init__.py", "cli/common.py", "cli/finetune.py"} <= set(commands), commands
    for rel in [*commands, "diagnostics/cli.py", "demo/cli.py"]:
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("samnorm"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{rel} imports private {private} from {node.module}"
                assert not (rel != "cli/__init__.py" and node.module == "samnorm.cli"), f"{rel} imports samnorm.cli"


@pytest.mark.parametrize(
    "error, status, hint",
    [
        (lambda: UsageError("--lr must be finite"), 2, None),
        (lambda: FileNotFoundError("image folder 'x' does not exist"), 2, None),
        (lambda: RuntimeError("CUDA out of memory"), 1, "internal error (RuntimeError)"),
        (lambda: TypeError("unsupported operand"), 1, "internal error (TypeError)"),
        (lambda: KeyError("model"), 1, "internal error (KeyError)"),
    ],
)
def test_usage_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys, error, status, hint):
    import samnorm.cli.pseudo_ood as command

    def fail(args):
        raise error()

    monkeypatch.setattr(command, "run", fail)
    code, _, err = run(["pseudo-ood", "--images", "x", "--output", "y.png"], capsys)
    assert code == status
    if hint is None:
        assert err.count("\n") == 1 and err.startswith("samnorm pseudo-ood: error: ")
    else:
        assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(
            f"samnorm pseudo-ood: {hint}"
        )
    with pytest.raises(type(error())):
        main(["--debug", "pseudo-ood", "--images", "x", "--output", "y.png"])


@pytest.mark.distributed
def test_two_gloo_processes_train_and_evaluate_like_torchrun(folders, tmp_path, capsys):
    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    finetune = [
        "finetune",
        "--train",
        str(folders / "train"),
        "--output",
        str(run_dir),
        *TINY,
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--log-every",
        "1",
        "--no-progress",
    ]

    def evaluate_to(out):
        return [
            "evaluate",
            "--checkpoint",
            str(run_dir / "checkpoint.pt"),
            "--id",
            str(folders / "val"),
            "--ood",
            f"noise={folders / 'ood'}",
            "--scorers",
            "msp,energy,rankfeat",
            "--output",
            str(out),
            "--workers",
            "0",
            "--batch-size",
            "2",
        ]

    evaluate = evaluate_to(eval_dir)
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        from samnorm.cli import main
        assert main({finetune!r}) == 0
        assert main({evaluate!r}) == 0
    """)
    port = free_port()
    procs = []
    for rank in range(2):  # the environment torchrun gives each worker
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "done:" in outs[0][0] and "| MSP | noise |" in outs[0][0]
    assert outs[1][0] == ""  # rank 1 prints nothing
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 3  # 25 // 2 // 4
    sharded = json.loads((eval_dir / "scores.json").read_text())
    # The same evaluation in one process: the merged scores are identical, bit for bit, in order.
    code, _, err = run(evaluate_to(tmp_path / "single"), capsys)
    assert code == 0, err
    single = json.loads((tmp_path / "single" / "scores.json").read_text())
    assert sharded["scores"] == single["scores"] and sharded["files"] == single["files"]
    assert sharded["skipped"] == single["skipped"] and sharded["metrics"] == single["metrics"]


def test_torch_free_parsers_offer_exactly_the_losses_the_library_has():
    # The parsers cannot import samnorm.train.losses (it imports torch, and --help must not), so they spell
    # the names out; this keeps those spellings equal to the one list, OOD_LOSSES.
    import argparse

    from samnorm.demo.cli import add_parser
    from samnorm.train.losses import OOD_LOSSES

    def choices(parser: argparse.ArgumentParser) -> list[str]:
        action = next(a for a in parser._actions if "--ood-loss" in a.option_strings)
        return sorted(action.choices)

    finetune = build_parser()._subparsers._group_actions[0].choices["finetune"]
    demo = argparse.ArgumentParser().add_subparsers()
    add_parser(demo)
    assert choices(finetune) == choices(demo.choices["demo"]) == sorted(OOD_LOSSES)


def _every_help() -> dict[str, str]:
    """The rendered --help of samnorm and of each of its commands, as the user sees them."""
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    return {"samnorm": parser.format_help(), **{name: p.format_help() for name, p in commands.items()}}


def test_every_help_renders_without_format_leftovers():
    # issue 20: `samnorm demo --help` printed "95%%" (argparse %-formats a description only when it holds %(prog))
    import re

    helps = _every_help()
    assert {"samnorm", "finetune", "evaluate", "diagnose", "pseudo-ood", "demo"} <= set(helps)
    for name, text in helps.items():
        leftovers = re.findall(r"%%|%\(|\{[A-Za-z_][A-Za-z0-9_]*\}|\\n", text)
        assert not leftovers, f"{name} --help holds {leftovers}:\n{text}"


def test_finetune_fp16_and_a_variant_end_to_end_and_checked_on_resume(folders, tmp_path, capsys):
    # issue 20: --precision fp16 (GradScaler), --variant and --variant-k on the command line
    common = [
        "finetune",
        "--train",
        str(folders / "train"),
        "--output",
        str(tmp_path),
        *TINY,
        "--batch-size",
        "4",
        "--steps",
        "3",
        "--log-every",
        "1",
        "--no-progress",
    ]
    chosen = ["--precision", "fp16", "--variant", "interval", "--variant-k", "2"]
    code, _, err = run(common + chosen, capsys)
    assert code == 0, err
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {k: ckpt["config"][k] for k in ("precision", "variant", "variant_k")} == {
        "precision": "fp16",
        "variant": "interval",
        "variant_k": 2,
    }
    assert ckpt["scaler"]["scale"] > 0 and ckpt["resolved"] == {"ood_weight": 0.25, "transforms": ["jigsaw"]}
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3] and all(r["skipped_steps"] == 0 for r in logged)
    assert all(r["loss_scale"] == ckpt["scaler"]["scale"] for r in logged)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["precision"], config["variant"], config["variant_k"]) == ("fp16", "interval", 2)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    for other, change in (
        (["--precision", "bf16", "--variant", "interval", "--variant-k", "2"], "precision: 'fp16' -> 'bf16'"),
        (["--precision", "fp16", "--variant", "looksam", "--variant-k", "2"], "variant: 'interval' -> 'looksam'"),
        (["--precision", "fp16", "--variant", "interval", "--variant-k", "3"], "variant_k: 2 -> 3"),
        (["--precision", "fp16"], "variant: 'interval' -> None"),
    ):
        code, _, err = run(common + other + ["--resume"], capsys)
        errors = [line for line in err.splitlines() if " error: " in line]
        assert code == 2 and len(errors) == 1 and "cannot resume" in errors[0] and change in errors[0], err
        assert err.strip().splitlines()[-1] == errors[0]
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    code, _, err = run(common + chosen + ["--resume"], capsys)  # the same settings: the finished run stays so
    assert code == 0, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--variant-k", "2"], "--variant-k must be an int >= 1 with a variant that takes k (interval or looksam)"),
        (["--variant", "onepass", "--variant-k", "2"], "--variant-k must be"),
        (["--variant", "interval", "--variant-k", "0"], "--variant-k must be an integer >= 1, got 0"),
        (["--variant", "interval", "--optimizer", "sgd"], "--variant 'interval' is a schedule of a SAM optimizer"),
    ],
)
def test_bad_variant_settings_get_one_line(folders, tmp_path, capsys, extra, message):
    code, _, err = run(
        ["finetune", "--train", str(folders / "train"), "--output", str(tmp_path), *TINY, "--steps", "1", *extra],
        capsys,
    )
    lines = err.strip().splitlines()  # checked before a model is built: the error is the only line
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not os.listdir(tmp_path)


def test_the_cli_offers_the_registry_variants_and_the_recipe_precisions():
    from samnorm.sam import registry
    from samnorm.train.recipe import _AUTOCAST

    finetune = build_parser()._subparsers._group_actions[0].choices["finetune"]
    choices = {a.dest: a.choices for a in finetune._actions if a.choices is not None}
    assert list(choices["variant"]) == registry.schedules()
    assert set(choices["precision"]) == set(_AUTOCAST) == {"fp32", "bf16", "fp16"}


def test_a_registered_scorer_that_needs_labels_gets_a_labelled_fit_folder(
    folders, trained, tmp_path, capsys, monkeypatch
):
    # The CLI reads the scorer's needs_labels: a user's scorer works with no change to samnorm.cli.
    from samnorm import ood

    seen: list[int] = []

    class ClassCount(ood.OutputScorer):
        """A user's scorer whose fit reads class labels (it records them)."""

        name = "ClassCount"
        needs_fit = True
        needs_labels = True

        def _fit(self, passes):
            for _, _, labels in passes():
                seen.extend(labels.tolist())

        def _from_outputs(self, features, logits):
            return logits.max(1).values

    monkeypatch.setitem(ood.SCORERS, "classcount", ClassCount)
    flat = tmp_path / "flat"  # the training images without their class folders: every label would be 0
    flat.mkdir()
    for c in range(3):
        for i in range(2):
            os.symlink(folders / "train" / f"class{c}" / f"{i}.png", flat / f"{c}_{i}.png")
    common = ["evaluate", "--checkpoint", str(trained / "checkpoint.pt"), "--id", str(folders / "val")]
    common += ["--ood", f"noise={folders / 'ood'}", "--scorers", "msp,class-count", "--workers", "0"]
    code, _, err = run([*common, "--fit", str(flat), "--output", str(tmp_path / "flat_out")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "ClassCount needs labelled ID training images, one sub-folder per class" in err
    assert not seen
    code, out, err = run([*common, "--fit", str(folders / "train"), "--output", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert sorted(set(seen)) == [0, 1, 2]  # each class folder its label (a flat folder: all 0)
    assert "ClassCount" in out


def test_divergence_in_the_cli_exits_3_with_one_line(image_folder, tmp_path, capsys):
    code, _, err = cli(
        train_args(
            image_folder,
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


def test_an_all_corrupt_folder_read_by_workers_names_the_real_problem(tmp_path, capsys):
    for c in ("a", "b"):
        os.makedirs(tmp_path / "d" / c)
        for i in range(4):
            (tmp_path / "d" / c / f"{i}.png").write_bytes(b"not a png")
    code, _, err = cli([*train_args(tmp_path / "d", tmp_path / "o")[:-2], "--workers", "2"], capsys)
    one_line(code, err, "samnorm finetune: error: no readable image left")


def test_the_seed_is_set_before_the_model_is_built(image_folder, tmp_path, capsys):
    states = []
    for i in range(2):
        torch.manual_seed(100 + i)  # whatever ran before must not matter
        out = tmp_path / str(i)
        code, _, err = cli(train_args(image_folder, out, "--steps", "1", "--seed", "3"), capsys)
        assert code == 0, err
        states.append(torch.load(out / CHECKPOINT_NAME, weights_only=True)["model"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_mahalanobis_needs_a_labelled_fit_folder(finished_run, image_folder, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted((image_folder / "a").iterdir())):
        os.symlink(p, flat / f"{i}.png")
    common = [
        "evaluate",
        "--checkpoint",
        finished_run / CHECKPOINT_NAME,
        "--id",
        image_folder,
        "--ood",
        f"o={image_folder}",
        "--output",
        tmp_path / "e",
        "--workers",
        "0",
        "--scorers",
        "msp,mahalanobis",
    ]
    code, _, err = cli([*common, "--fit", flat], capsys)
    one_line(code, err, "Mahalanobis needs labelled ID training images")
    code, _, err = cli([*common, "--fit", image_folder], capsys)
    assert code == 0, err


def test_the_no_class_folders_hint_names_no_missing_option(tmp_path, capsys):
    flat = png_folder(tmp_path / "d", classes=("a",), per_class=2) / "a"
    code, _, err = cli(train_args(flat, tmp_path / "o"), capsys)
    one_line(code, err, "has no class sub-folders")
    assert "flat=True" not in err


@pytest.mark.parametrize(
    "error, status, message",
    [
        (DivergedError("training diverged: non-finite loss"), 3, "samnorm demo: stopped: training diverged"),
        (KeyboardInterrupt(), 130, "samnorm demo: interrupted"),
    ],
)
def test_divergence_and_ctrl_c_are_one_line_in_every_command(monkeypatch, capsys, error, status, message):
    import samnorm.demo.run

    def run_demo(config):
        raise error

    monkeypatch.setattr(samnorm.demo.run, "run_demo", run_demo)
    code, _, err = cli(["demo", "--no-plots", "--no-progress"], capsys)
    one_line(code, err, message, status=status)
