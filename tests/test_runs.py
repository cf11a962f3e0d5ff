"""The run lifecycle (samnorm.runs): one run per output folder (never replaced unless asked, and then
removed first), signals as Ctrl-C, write errors as one line, result files replaced atomically and
result sets as a unit, no output inside an input.

Real subprocesses where signals, locks and file-size limits matter; the rest in-process. One
SIGTERM run (module fixture) is shared: the concurrent second run, the file-size limit during a
checkpoint and the resume all start from it. SIGINT/SIGHUP/SIGKILL runs are marked slow.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
from helpers import TINY, cli, one_line, png_folder, train_args

from samnorm import runs
from samnorm.train.recipe import CHECKPOINT_NAME, finetune
from samnorm.utils.io import WriteError, atomic_save, atomic_write

pytestmark = pytest.mark.filterwarnings("ignore:skipping unreadable image:RuntimeWarning")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 120  # long enough that a signal sent at step <= 30 lands well before the end (~1 s of steps)


def long_run_args(data, out, *extra):
    """A run of STEPS steps with a checkpoint every 7: long enough to be stopped midway."""
    return train_args(data, out, "--steps", str(STEPS), "--checkpoint-every", "7", *extra)


def spawn(args, fsize=None):
    """``python -m samnorm ARGS`` in a new process (stderr piped), optionally under a file-size limit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.Popen(
        [sys.executable, "-m", "samnorm", *map(str, args)],
        env=env,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=limit if fsize else None,
    )


def wait_for_step(proc, step):
    """Read the run's log lines until the one of ``step``; returns the lines read."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("{") and json.loads(line)["step"] >= step:
            return lines
    raise AssertionError(f"the run ended before step {step}: {''.join(lines)}")


def stopped_by(proc, sig, step):
    """Send ``sig`` once the run logged ``step``; returns (exit status, the non-log lines of stderr)."""
    wait_for_step(proc, step)
    proc.send_signal(sig)
    rest = proc.stderr.read()
    code = proc.wait(timeout=60)
    return code, [line for line in rest.splitlines() if line and not line.startswith("{")]


def weights(folder):
    return torch.load(Path(folder) / CHECKPOINT_NAME, weights_only=True)["model"]


def same_run(a, b):
    wa, wb = weights(a), weights(b)
    return (
        wa.keys() == wb.keys()
        and all(torch.equal(wa[k], wb[k]) for k in wa)
        and ((Path(a) / "log.jsonl").read_text() == (Path(b) / "log.jsonl").read_text())
    )


@pytest.fixture(scope="module")
def reference(image_folder, tmp_path_factory):
    """The uninterrupted run, in-process (bit-identical on the CPU to one in a subprocess)."""
    from samnorm.cli import main

    out = tmp_path_factory.mktemp("reference")
    assert main(long_run_args(image_folder, out)) == 0
    return out


@pytest.fixture(scope="module")
def terminated(image_folder, tmp_path_factory):
    """A run stopped by SIGTERM at a random step; a second run on its folder was tried while it ran."""
    from samnorm.cli import main

    out = tmp_path_factory.mktemp("terminated")
    proc = spawn(long_run_args(image_folder, out))
    wait_for_step(proc, 2)  # its lock is held from before the first step
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        second = main(long_run_args(image_folder, out, "--overwrite"))
    code, lines = stopped_by(proc, signal.SIGTERM, random.Random(15).randint(3, 30))
    return {"out": out, "pid": proc.pid, "second": (second, err.getvalue()), "code": code, "lines": lines}


# ---------------------------------------------------------------- the lock
def test_a_second_run_on_one_output_fails_at_once_naming_the_first(terminated):
    code, err = terminated["second"]
    one_line(code, err, f"is in use by samnorm finetune (pid {terminated['pid']} on ")
    # the first run was not disturbed: it wrote its checkpoints and stopped only at the signal
    assert terminated["code"] == 143 and torch.load(terminated["out"] / CHECKPOINT_NAME, weights_only=True)["step"]


def test_the_python_api_takes_the_same_lock(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from samnorm.runs import hold\n"
            f"with hold({str(tmp_path)!r}, 'other'):\n print('held', flush=True); sys.stdin.read()",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runs.FolderBusy, match=rf"in use by samnorm other \(pid {holder.pid} on "):
            finetune(
                torch.nn.Linear(4, 2),
                (torch.rand(8, 4), torch.arange(8) % 2),
                output_dir=tmp_path,
                steps=1,
                batch_size=4,
                progress=False,
            )
    finally:
        holder.communicate("")
    assert not (tmp_path / CHECKPOINT_NAME).exists() and not (tmp_path / runs.LOCK_NAME).exists()


def test_a_stale_lock_is_named_and_taken_over(image_folder, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / runs.LOCK_NAME).write_text(
        json.dumps({"pid": 999999999, "host": "elsewhere", "command": "finetune", "started": "2026-01-01T00:00:00"})
    )
    code, _, err = cli(long_run_args(image_folder, out, "--steps", "1"), capsys)
    assert code == 0, err
    assert "taking over the lock of samnorm finetune (pid 999999999 on elsewhere" in err
    assert not (out / runs.LOCK_NAME).exists()  # released at the end


@pytest.mark.slow
def test_sigkill_leaves_a_stale_lock_that_the_next_run_names(image_folder, reference, tmp_path, capsys):
    proc = spawn(long_run_args(image_folder, tmp_path))
    wait_for_step(proc, random.Random(9).randint(8, 30))
    proc.kill()
    proc.wait(timeout=60)
    code, _, err = cli(long_run_args(image_folder, tmp_path, "--resume"), capsys)
    assert code == 0, err
    assert f"taking over the lock of samnorm finetune (pid {proc.pid} on " in err
    assert same_run(tmp_path, reference)


# ---------------------------------------------------------------- signals
def test_sigterm_keeps_the_checkpoint_with_one_line_and_exit_143(image_folder, terminated, reference, tmp_path, capsys):
    assert terminated["code"] == 128 + signal.SIGTERM
    assert len(terminated["lines"]) == 1, terminated["lines"]
    line = terminated["lines"][0]
    assert line.startswith("samnorm finetune: interrupted by SIGTERM; the last checkpoint (step "), line
    kept = torch.load(terminated["out"] / CHECKPOINT_NAME, weights_only=True)["step"]
    assert f"(step {kept}) is kept in" in line
    shutil.copytree(terminated["out"], tmp_path / "o")
    code, _, err = cli(long_run_args(image_folder, tmp_path / "o", "--resume"), capsys)
    assert code == 0, err
    assert same_run(tmp_path / "o", reference)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])  # SIGTERM: the module fixture
def test_signal_matrix_at_a_random_step_then_resume_equals_the_uninterrupted_run(
    image_folder, reference, tmp_path, capsys, sig
):
    code, lines = stopped_by(spawn(long_run_args(image_folder, tmp_path)), sig, random.Random(int(sig)).randint(8, 40))
    assert code == 128 + sig and len(lines) == 1, lines
    assert lines[0].startswith(f"samnorm finetune: interrupted by {sig.name}; the last checkpoint (step "), lines
    code, _, err = cli(long_run_args(image_folder, tmp_path, "--resume"), capsys)
    assert code == 0, err
    assert same_run(tmp_path, reference)


def test_signals_raise_where_the_program_is_and_wait_for_a_checkpoint():
    with runs.handle_signals():
        with pytest.raises(runs.Signalled) as caught:
            os.kill(os.getpid(), signal.SIGHUP)
        assert runs.exit_status(caught.value) == 129
        done = []
        with pytest.raises(runs.Signalled, match="SIGTERM"), runs.deferred_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("the whole block ran")
        assert done
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_signal_inside_a_finalizer_is_delivered_after_it():
    """Python drops exceptions raised in __del__ (a DataLoader shuts its workers down there)."""
    finished = []

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs here, inside __del__
            finished.append(True)

    with runs.handle_signals(), pytest.raises(runs.Signalled, match="SIGTERM"):
        Finalized()
        for _ in range(500):
            time.sleep(0.01)
    assert finished


def test_a_run_whose_workers_outlive_an_error_still_exits(tmp_path):
    # workers that ignored SIGTERM kept multiprocessing's exit (terminate, then join) waiting forever
    for c in ("a", "b"):
        os.makedirs(tmp_path / "d" / c)
        for i in range(4):
            (tmp_path / "d" / c / f"{i}.png").write_bytes(b"not a png")
    args = long_run_args(tmp_path / "d", tmp_path / "o")
    proc = spawn([a if a != "0" or args[i - 1] != "--workers" else "2" for i, a in enumerate(args)])
    try:
        _, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 2 and "no readable image left" in err, err


# ---------------------------------------------------------------- write errors
def test_a_file_size_limit_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(
    image_folder, terminated, tmp_path
):
    out = tmp_path / "o"
    shutil.copytree(terminated["out"], out)
    before = (out / CHECKPOINT_NAME).read_bytes()
    assert len(before) > 64 * 1024
    proc = spawn(long_run_args(image_folder, out, "--resume"), fsize=64 * 1024)
    _, err = proc.communicate(timeout=120)
    lines = [
        line
        for line in err.splitlines()
        if not line.startswith(("{", "fine-tuning ", "resuming ")) and not line.endswith("(--random-init)")
    ]
    assert proc.returncode == runs.EXIT_IOERR and len(lines) == 1, err
    assert lines[0] == (
        f"samnorm finetune: write error: cannot write {out / CHECKPOINT_NAME}: EFBIG (File too "
        "large); its previous version is kept"
    ), lines
    assert (out / CHECKPOINT_NAME).read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT_NAME, "config.json", "log.jsonl"]


def test_torch_save_errors_name_the_errno_and_the_path(tmp_path):
    """torch.save hides the OSError in a RuntimeError's context; the write error is still one line."""
    target = tmp_path / "x.pt"
    atomic_save({"old": 1}, target)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))
    try:
        with pytest.raises(WriteError) as caught:
            atomic_save({"new": torch.zeros(100_000)}, target)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert caught.value.errno == errno.EFBIG and caught.value.filename == str(target)
    assert str(caught.value) == f"cannot write {target}: EFBIG (File too large); its previous version is kept"
    assert torch.load(target, weights_only=True) == {"old": 1} and os.listdir(tmp_path) == ["x.pt"]


# ---------------------------------------------------------------- result sets
def test_an_evaluate_rerun_whose_write_fails_leaves_the_previous_set_whole(image_folder, reference, tmp_path, capsys):
    ood = png_folder(tmp_path / "ood", classes=("x",), per_class=24)
    args = [
        "evaluate",
        "--checkpoint",
        reference / CHECKPOINT_NAME,
        "--id",
        image_folder,
        "--ood",
        f"o={ood}",
        "--output",
        tmp_path / "ev",
        "--workers",
        "0",
    ]
    code, _, err = cli([*args, "--scorers", "msp"], capsys)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in (tmp_path / "ev").iterdir()}
    assert {"results.md", "results.csv", "scores.json"} <= set(before)
    # above every file of the first run (and the 4 KiB of shared memory a folder needs), below the new scores.json
    # of three scorers
    limit = max(4096, *map(len, before.values())) + 512
    proc = spawn([*args, "--id-name", "other"], fsize=limit)
    _, err = proc.communicate(timeout=120)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ev").iterdir()} == before, err  # not a mix of two runs
    one_line(
        proc.returncode,
        err,
        f"write error: cannot write {tmp_path / 'ev' / 'scores.json'}: EFBIG",
        status=runs.EXIT_IOERR,
    )
    assert runs.read_manifest(tmp_path / "ev", "evaluate")["command"] == "evaluate"


def test_a_result_set_replaces_the_previous_one_whole():
    import tempfile

    out = tempfile.mkdtemp()
    with runs.result_set(out, "diagnose", {"run": 1}):
        for name in ("a.png", "b.png", "summary.json"):
            atomic_write(os.path.join(out, name), name)
    atomic_write(os.path.join(out, "mine.txt"), "not a result")
    with runs.result_set(out, "evaluate"):  # another command's set lives beside it
        atomic_write(os.path.join(out, "results.md"), "table")
    with runs.result_set(out, "diagnose", {"run": 2}):
        for name in ("a.png", "summary.json"):
            atomic_write(os.path.join(out, name), "2")
    manifest = runs.read_manifest(out, "diagnose")
    assert manifest["info"] == {"run": 2} and sorted(manifest["files"]) == ["a.png", "summary.json"]
    assert sorted(os.listdir(out)) == [
        "a.png",
        "diagnose.manifest.json",
        "evaluate.manifest.json",
        "mine.txt",
        "results.md",
        "summary.json",
    ]  # b.png was the first run's
    assert runs.read_manifest(out, "evaluate")["files"]["results.md"]["bytes"] == 5
    with open(os.path.join(out, "a.png"), "a") as f:
        f.write("changed")
    assert runs.read_manifest(out, "diagnose") is None  # a file that no longer matches: not a complete set


# ---------------------------------------------------------------- output inside an input
@pytest.mark.parametrize(
    "command, option",
    [
        ("finetune", "--train"),
        ("evaluate", "--id"),
        ("evaluate", "--ood"),
        ("evaluate", "--fit"),
        ("diagnose", "--id"),
        ("diagnose", "--ood"),
        ("diagnose", "--fit"),
        ("pseudo-ood", "--images"),
    ],
)
def test_an_output_inside_any_input_folder_is_refused_before_any_work(tmp_path, capsys, command, option):
    folders = {name: png_folder(tmp_path / name, per_class=1) for name in ("id", "ood", "fit")}
    inside = {"--train": "id", "--images": "id", "--id": "id", "--ood": "ood", "--fit": "fit"}[option]
    out = folders[inside] / ("a" if option != "--ood" else "") / "out"
    listing = sorted(str(p) for p in tmp_path.rglob("*"))
    model = ["--checkpoint", tmp_path / "no.pt", *(a for a in TINY if a != "--random-init")]
    args = {
        "finetune": ["finetune", "--train", folders["id"], "--output", out, *TINY],
        "evaluate": [
            "evaluate",
            "--id",
            folders["id"],
            "--ood",
            f"o={folders['ood']}",
            "--fit",
            folders["fit"],
            "--output",
            out,
            *model,
        ],
        "diagnose": [
            "diagnose",
            "--id",
            folders["id"],
            "--ood",
            f"o={folders['ood']}",
            "--fit",
            folders["fit"],
            "--output",
            out,
            *model,
        ],
        "pseudo-ood": ["pseudo-ood", "--images", folders["id"], "--output", out / "grid.png"],
    }[command]
    code, _, err = cli(args, capsys)
    one_line(code, err, f"is inside {option} ")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == listing  # nothing created in it


def test_demo_checks_its_cache_folder_before_pretraining(tmp_path, capsys, monkeypatch):
    import samnorm.demo.backbone

    def pretraining(*args, **kwargs):
        raise AssertionError("pretraining started")

    monkeypatch.setattr(samnorm.demo.backbone, "build_backbone", pretraining)
    cache = tmp_path / "cache"
    cache.write_text("a file, not a folder")
    code, _, err = cli(
        ["demo", "--cache-dir", cache, "--out", tmp_path / "out", "--seeds", "1", "--no-plots", "--no-progress"], capsys
    )
    one_line(code, err, f"the cache folder (--cache-dir, DemoConfig.cache_dir) {cache / 'demo'}: cannot create")


def test_a_run_in_the_output_folder_is_never_replaced_without_being_asked(image_folder, finished_run, tmp_path, capsys):
    before = {n: (finished_run / n).read_bytes() for n in (CHECKPOINT_NAME, "log.jsonl")}
    code, _, err = cli(train_args(image_folder, finished_run, "--steps", "1"), capsys)
    one_line(code, err, "already holds a run")
    assert {n: (finished_run / n).read_bytes() for n in before} == before
    # --overwrite replaces it; --resume with --overwrite is contradictory
    copy = tmp_path / "copy"
    copy.mkdir()
    for n, b in before.items():
        (copy / n).write_bytes(b)
    code, _, err = cli(train_args(image_folder, copy, "--steps", "1", "--overwrite"), capsys)
    assert code == 0, err
    assert torch.load(copy / CHECKPOINT_NAME, weights_only=True)["step"] == 1
    code, _, err = cli(train_args(image_folder, copy, "--resume", "--overwrite"), capsys)
    one_line(code, err, "pass one of them")


@pytest.mark.parametrize("command", ["evaluate", "finetune"])
def test_a_file_as_output_fails_before_the_work(image_folder, tmp_path, capsys, command):
    (tmp_path / "file").write_text("x")
    # --model no_such_net would only fail once the model is built: the output is checked first
    args = {"evaluate": ["--id", image_folder, "--ood", f"o={image_folder}"], "finetune": ["--train", image_folder]}[
        command
    ]
    code, _, err = cli(
        [command, "--model", "no_such_net", *args, "--output", tmp_path / "file", "--workers", "0"], capsys
    )
    one_line(code, err, "is a file, not a folder")


def test_stale_temps_are_removed_and_every_result_file_is_replaced_atomically(
    image_folder, finished_run, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / (CHECKPOINT_NAME + ".tmp-999999999")  # a writer killed mid-save
    stale.write_bytes(b"half")
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append(os.path.basename(b)), real_replace(a, b)))
    code, _, err = cli(train_args(image_folder, run, "--steps", "1"), capsys)
    assert code == 0, err
    assert not stale.exists()
    assert {"config.json", "log.jsonl", CHECKPOINT_NAME} <= set(replaced)
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "scores.json.tmp-999999999").write_text("{")
    code, _, err = cli(
        [
            "evaluate",
            "--checkpoint",
            finished_run / CHECKPOINT_NAME,
            "--id",
            image_folder,
            "--ood",
            f"o={image_folder}",
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


def test_overwrite_removes_the_old_run_before_the_new_one_starts(image_folder, finished_run, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    for n in (CHECKPOINT_NAME, "log.jsonl", "config.json"):
        (out / n).write_bytes((finished_run / n).read_bytes())
    (out / "notes.txt").write_text("mine")
    (out / f"{CHECKPOINT_NAME}.tmp-999999999").write_bytes(b"half")  # a killed writer's
    # the new run diverges before its first save: nothing of the old run may be left beside it
    code, _, err = cli(
        train_args(
            image_folder,
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


@pytest.mark.parametrize("inside", ["train", "class link"])
def test_an_output_folder_inside_the_training_images_is_refused_first(tmp_path, capsys, inside):
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
