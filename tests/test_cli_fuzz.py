"""Hypothesis-generated argument vectors for every ``samnorm`` command (issue 18, deliverable 6).

Each run ends in success (0), or in exactly one line ``samnorm COMMAND: error|stopped: ...`` with exit
2 or 3; never a traceback; never a changed file that existed before (the image folders, a file in
the output folder). Option values come from pools of hostile text (zero, negative, fractional, NaN,
inf, overflowing, empty, not a number, unknown names) and of valid values; the pools also bound
the cost of a successful run (no 8192 px image, no 10,000 steps).

CI draws a few derandomized examples per command (``HYPOTHESIS_PROFILE=ci``); the ``deep`` profile
draws ten times more, at random: ``python -m pytest -q tests/test_cli_fuzz.py --hypothesis-profile=deep``.
"""

import hashlib
import os
import tempfile

import numpy as np
import pytest
from helpers import TINY_MODEL
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from samnorm.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

EXAMPLES = max(4, settings.default.max_examples // 4)  # ci: 6 per command; deep: 62

INT = ["0", "-1", "1", "2", "2.5", "1e3", "nan", "", "abc", str(2**64), str(2**31), "0x10", " 3"]
REAL = ["0", "-1", "0.5", "1e-3", "nan", "inf", "-inf", "1e309", "", "abc", "2**64", "1e-320", "1"]
NAMES = ["", ",", "blur", "blur,blur", "nope", "b,l,u,r", "ü", "x" * 300, "msp", "energy,msp", "react"]
MODEL_ARGS = [
    "num_classes=7",
    "img_size=16",
    "img_size=100000",
    "img_size=(16, 16)",
    "img_size='a'",
    "drop_rate=0.1",
    "nope=1",
    "embed_dim=0",
    "=1",
    "depth",
]

OPTIONS = {
    "finetune": {
        "--lr": REAL,
        "--rho": REAL,
        "--eta": REAL,
        "--momentum": REAL,
        "--weight-decay": REAL,
        "--warmup-steps": INT,
        "--steps": ["0", "-1", "2.5", "1", "2", "abc"],
        "--epochs": REAL,
        "--batch-size": [*INT, str(2**20)],
        "--ood-ratio": REAL,
        "--ood-weight": REAL,
        "--m-in": REAL,
        "--m-out": REAL,
        "--grad-clip": REAL,
        "--seed": INT,
        "--checkpoint-every": INT,
        "--log-every": INT,
        "--img-size": ["0", "-1", "8", "16", "32", "100000", "nan"],
        "--workers": ["0", "-1", "abc", "5000"],
        "--transforms": NAMES,
        "--optimizer": ["sgd", "sam", "asam-on", "nope"],
        "--precision": ["bf16", "fp16", "fp8"],
        "--variant": ["interval", "looksam", "onepass", "gsam", "sam", "x"],
        "--variant-k": INT,
        "--model-arg": MODEL_ARGS,
        "--ood-loss": ["energy", "maxlogit", "x"],
        "--base-optimizer": ["adamw", "x"],
    },
    "evaluate": {
        "--tpr": REAL,
        "--convention": ["samnorm", "openood", "", "x"],
        "--scorers": NAMES,
        "--scorer-opt": ["msp.temperature=2", "energy.temperature=nan", "rankfeat.blocks=-1", "x", "msp.x=1"],
        "--batch-size": INT,
        "--workers": ["0", "-1"],
        "--img-size": ["0", "8", "16", "100000"],
        "--id-name": NAMES,
        "--model-arg": MODEL_ARGS,
        "--random-init": None,
    },
    "diagnose": {
        "--target": ["pred", "label", "uniform", "x"],
        "--grad-norm-p": REAL,
        "--max-images": INT,
        "--seed": INT,
        "--theory": ["0", "-1", "1", "abc"],
        "--h": REAL,
        "--rho": REAL,
        "--theory-iters": ["0", "1", "-2", "x"],
        "--dpi": ["0", "-1", "1", "20", "1001", "nan", "abc"],
        "--scorers": NAMES,
        "--batch-size": INT,
        "--img-size": ["0", "8", "16", "100000"],
        "--id-name": NAMES,
        "--model-arg": MODEL_ARGS,
    },
    "pseudo-ood": {
        "--n": ["0", "-1", "1", "3", "5000", "abc", "2.5"],
        "--size": ["0", "-1", "8", "9000", "abc", "nan"],
        "--channels": ["1", "3", "2", "x"],
        "--transforms": NAMES,
        "--seed": INT,
        "--title": NAMES,
    },
    "demo": {
        "--seeds": INT,
        "--pretrain-seed": INT,
        "--arms": [*NAMES, "sam_on,sgd", "sgd"],
        "--lr": REAL,
        "--ood-weight": REAL,
        "--ood-ratio": REAL,
        "--rho-sam-on": REAL,
        "--rho-sam": REAL,
        "--epochs": INT,
        "--transforms": NAMES,
        "--backbone": ["resnetv2", "t2t_vit", "x"],
        "--ood-loss": ["energy", "x"],
    },
}


def snapshot(*roots):
    """Every file under ``roots`` with its content hash and modification time."""
    out = {}
    for root in roots:
        for folder, _, files in os.walk(root):
            for f in files:
                path = os.path.join(folder, f)
                with open(path, "rb") as handle:
                    out[path] = (hashlib.sha256(handle.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny class folders, an OOD folder and a checkpoint trained on them."""
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "ood/x"):
        os.makedirs(root / "data" / c)
        for i in range(2):
            Image.fromarray((rng.random((10, 10)) * 255).astype(np.uint8)).save(root / "data" / c / f"{i}.png")
    train = root / "data"
    os.rename(train / "ood", root / "ood")
    assert (
        main(
            [
                "finetune",
                "--train",
                str(train),
                "--output",
                str(root / "run"),
                *TINY_MODEL,
                "--random-init",
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    return root


def base(command, world, out):
    data, ood, ckpt = str(world / "data"), f"o={world / 'ood'}", str(world / "run" / "checkpoint.pt")
    return {
        "finetune": [
            "finetune",
            "--train",
            data,
            "--output",
            out,
            *TINY_MODEL,
            "--random-init",
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--no-progress",
        ],
        "evaluate": ["evaluate", "--checkpoint", ckpt, "--id", data, "--ood", ood, "--output", out, "--workers", "0"],
        "diagnose": [
            "diagnose",
            "--checkpoint",
            ckpt,
            "--id",
            data,
            "--ood",
            ood,
            "--output",
            out,
            "--workers",
            "0",
            "--dpi",
            "20",
        ],
        "pseudo-ood": ["pseudo-ood", "--images", data, "--output", os.path.join(out, "grid.png"), "--size", "8"],
        "demo": ["demo", "--out", out, "--no-plots", "--no-progress"],
    }[command]


def options(command):
    pools = OPTIONS[command]
    pick = st.sampled_from(sorted(pools)).flatmap(
        lambda o: st.just([o]) if pools[o] is None else st.sampled_from(pools[o]).map(lambda v, o=o: [o, v])
    )
    return st.lists(pick, min_size=1, max_size=4).map(lambda items: [a for item in items for a in item])


def check_run(argv, world, out, capsys, monkeypatch=None):
    before = snapshot(world / "data", world / "ood", world / "run", out)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse: a bad option name or value
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code in (0, 2, 3), (code, err)
    if code:
        errors = [line for line in err.splitlines() if line.strip()]
        last = errors[-1] if errors else ""
        assert last.startswith("samnorm") and (" error: " in last or "stopped:" in last), err
        assert sum(" error: " in line or "stopped:" in line for line in errors) == 1, err
    after = snapshot(world / "data", world / "ood", world / "run", out)
    assert {p: after.get(p) for p in before} == before, "a file that existed before was changed"


@pytest.mark.parametrize("command", list(OPTIONS))
def test_every_argument_vector_ends_in_success_or_one_line(world, capsys, monkeypatch, command):
    import samnorm.demo.run

    # the demo's work (minutes) is not what is fuzzed: its settings are checked before it starts
    monkeypatch.setattr(samnorm.demo.run, "run_demo", lambda config: None)

    @settings(max_examples=EXAMPLES)
    @given(extra=options(command))
    def run(extra):
        out = tempfile.mkdtemp(dir=world)
        with open(os.path.join(out, "notes.txt"), "w") as f:
            f.write("the user's own file")
        check_run([*base(command, world, out), *extra], world, out, capsys)

    run()
