"""The demo pipeline on a tiny configuration: structure, finiteness, cache, arms, statistics, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("timm")
pytest.importorskip("mlxtend")
pytest.importorskip("skimage")

from samnorm import demo
from samnorm.cli.common import UsageError
from samnorm.demo import ARMS, SCORER_NAMES, DemoConfig, stats

TINY = dict(
    seeds=(0, 1),
    n_train=192,
    n_test=80,
    n_ood=30,
    widths=(8, 16, 16, 32),
    stem_width=8,
    groups=4,
    pretrain_epochs=1,
    batch_size=32,
    progress=False,
    quiet=True,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoConfig, demo.DemoReport]:
    root = tmp_path_factory.mktemp("demo")
    config = DemoConfig(out_dir=str(root / "out"), cache_dir=str(root / "cache"), plot_scorers=("MSP",), **TINY)
    return config, demo.run_demo(config)


def _numbers(tree: object) -> list[float]:
    if isinstance(tree, dict):
        return [v for x in tree.values() for v in _numbers(x)]
    if isinstance(tree, list):
        return [v for x in tree for v in _numbers(x)]
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return [float(tree)]
    return []


def test_report_structure_and_every_figure_is_finite(tiny) -> None:
    config, report = tiny
    data = report.data
    assert list(data["arms"]) == list(config.arms)
    sets = ["textures", "photos", "faces", "noise"]
    assert data["ood_sets"] == sets
    for block in [
        data["pretrained"],
        *(run for arm in data["arms"].values() for run in arm["seeds"].values()),
        *(arm[k] for arm in data["arms"].values() for k in ("mean", "std")),
    ]:
        assert set(block["metrics"]) == set(SCORER_NAMES)
        for per_set in block["metrics"].values():
            assert list(per_set) == [*sets, "average"]
            for row in per_set.values():
                assert {"FPR95", "AUROC"} <= set(row)
    for arm in data["arms"].values():
        assert list(arm["seeds"]) == ["0", "1"]
    numbers = _numbers(data)
    assert len(numbers) > 500 and all(math.isfinite(v) for v in numbers)
    # Rates and accuracies are fractions.
    for block in [data["pretrained"], *(run for arm in data["arms"].values() for run in arm["seeds"].values())]:
        assert 0 <= block["id_accuracy"] <= 1
        assert all(0 <= v <= 1 for v in _numbers(block["metrics"]))
    # The JSON file holds the same figures.
    saved = json.loads(Path(report.files["json"]).read_text(encoding="utf-8"))
    assert _numbers(saved["arms"]) == _numbers(data["arms"])


def test_markdown_tables_and_files(tiny) -> None:
    config, report = tiny
    text = Path(report.files["markdown"]).read_text(encoding="utf-8")
    assert text == report.markdown
    for scorer in SCORER_NAMES:
        assert text.count(f"| {scorer} |") == 2 * (1 + 4)  # FPR95 and AUROC, average and 4 sets
    for name in (
        "SAM-ON",
        "SGD",
        "full SAM",
        "SAM-ON − SGD",
        "ID accuracy",
        "Convention",
        "How the defaults",
        "samnorm.train.recipe.finetune",
        "95% Student-t interval",
        "appendix's quantities",
    ):
        assert name in text
    assert "Target" not in text  # conclusions are intervals, not a pass/fail target
    # Each difference cell is "mean [low, high]" from the report's data.
    d = report.data["differences"]["sam_on"]["vs_sgd"]["MSP"]["FPR95"]
    from samnorm.demo.report import interval_text

    assert interval_text(d) in text and "[" in interval_text(d)
    for key, path in report.files.items():
        assert Path(path).stat().st_size > 0, key
    pngs = sorted(Path(config.out_dir).glob("*.png"))
    assert [p.name for p in pngs] == sorted(f"scores_msp_{arm}.png" for arm in config.arms)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_metrics_match_sklearn_on_the_cached_model(tiny) -> None:
    from sklearn.metrics import roc_auc_score, roc_curve

    from samnorm.demo.data import load_data, logits

    config, report = tiny
    model, info = demo.pretrain(config)
    assert info["cached"]
    data = load_data(config)
    logits_id = logits(model, data.test[0])
    assert report.data["pretrained"]["id_accuracy"] == pytest.approx(
        float((logits_id.argmax(1) == data.test[1]).double().mean())
    )
    for name, x in data.ood.items():
        logits_ood = logits(model, x)
        for scorer, fn in (
            ("MSP", lambda z: z.double().softmax(1).amax(1)),
            ("Energy", lambda z: z.double().logsumexp(1)),
        ):
            s_id, s_ood = fn(logits_id).numpy(), fn(logits_ood).numpy()
            labels = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))]
            scores = np.r_[s_id, s_ood]
            fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
            row = report.data["pretrained"]["metrics"][scorer][name]
            assert row["AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
            assert row["FPR95"] == pytest.approx(fpr[np.searchsorted(tpr, 0.95)], abs=1e-6)
    # The theory quantities: a plain per-sample float64 loop over autograd gradients of the FC layer.
    fc = model.get_classifier()
    x = data.test[0][:8]
    expected = []
    for i in range(len(x)):
        model.zero_grad()
        out = model(x[i : i + 1]).double()
        torch.nn.functional.cross_entropy(out, out.argmax(1)).backward()
        grads = [p.grad.double().flatten() for p in fc.parameters()]
        expected.append(torch.cat(grads).norm().item())
    from samnorm.demo.run import theory_quantities

    small = dataclasses.replace(data, test=(x, data.test[1][:8]))
    got = theory_quantities(model, small)
    assert got["id"]["grad_norm"] == pytest.approx(float(np.mean(expected)), rel=1e-4)
    assert got["id"]["max_logit"] == pytest.approx(float(logits_id[:8].amax(1).double().mean()), rel=1e-5)


def test_cache_is_keyed_by_configuration_and_survives_corruption(tiny, tmp_path) -> None:
    config, _ = tiny
    _, info = demo.pretrain(config)
    assert info["cached"] and Path(info["path"]).is_file()
    other = DemoConfig(**{**TINY, "pretrain_lr": 0.05}, cache_dir=config.cache_dir)
    assert other.pretrain_key() != config.pretrain_key()
    # A corrupt file is ignored with a warning, retrained and replaced.
    cfg = DemoConfig(**TINY, cache_dir=str(tmp_path))
    _, first = demo.pretrain(cfg)
    assert not first["cached"]
    Path(first["path"]).write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="ignoring the cached weights"):
        again, second = demo.pretrain(cfg)
    assert not second["cached"] and second["path"] == first["path"]
    reloaded, third = demo.pretrain(cfg)
    assert third["cached"]
    for a, b in zip(again.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)


def test_cache_dir_follows_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("SAMNORM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_cache_dir() == tmp_path / "xdg" / "samnorm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.default_cache_dir() == tmp_path / "home" / ".cache" / "samnorm"
    monkeypatch.setenv("SAMNORM_CACHE_DIR", str(tmp_path / "explicit"))
    assert demo.default_cache_dir() == tmp_path / "explicit"


def test_arms_run_through_the_recipe_and_share_data_order_loss_and_sampler(tiny) -> None:
    # SAM with rho = 0 perturbs nothing, so SAM-ON and full SAM at rho 0 must reproduce the SGD arm
    # bit for bit: that holds only if all arms see the same batches, pseudo-OOD images and loss.
    from samnorm.demo.data import load_data
    from samnorm.demo.run import arm_config, finetune_copy

    config, _ = tiny
    model, _ = demo.pretrain(config)
    data = load_data(config)
    train = (data.train[0][:96], data.train[1][:96])
    sgd = finetune_copy(model, train, arm_config(config, "sgd"), 3)
    for arm in ("sam_on", "sam"):
        tuned = finetune_copy(model, train, arm_config(config, arm, rho=0.0), 3)
        for a, b in zip(sgd.state_dict().values(), tuned.state_dict().values()):
            assert torch.equal(a, b)
    # The demo's runs are samnorm.train.recipe.finetune's: the same call by hand gives the same weights.
    import copy

    from samnorm.train.recipe import finetune

    by_hand = copy.deepcopy(model)
    finetune(by_hand, train, arm_config(config, "sam_on"), seed=3, progress=False, log=lambda _: None)
    via_demo = finetune_copy(model, train, arm_config(config, "sam_on"), 3)
    for a, b in zip(by_hand.state_dict().values(), via_demo.state_dict().values()):
        assert torch.equal(a, b)
    # With rho > 0 the arms differ, the same seed repeats exactly, another seed differs.
    sam_on = finetune_copy(model, train, arm_config(config, "sam_on", rho=0.5), 3)
    other = finetune_copy(model, train, arm_config(config, "sam_on", rho=0.5), 4)
    weights = [torch.cat([p.flatten() for p in m.parameters()]) for m in (sgd, sam_on, other)]
    assert not torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[1], weights[2])
    # The pretrained model is never modified by fine-tuning.
    fresh, _ = demo.pretrain(config)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_arm_config_maps_arms_onto_recipe_optimizers() -> None:
    from samnorm.demo.run import arm_config

    cfg = DemoConfig(adaptive_sam_on=False, adaptive_sam=True, rho_sam_on=0.3, rho_sam=0.02, ood_ratio=0.0)
    assert (arm_config(cfg, "sam_on").optimizer, arm_config(cfg, "sam_on").rho) == ("sam-on", 0.3)
    assert (arm_config(cfg, "sam").optimizer, arm_config(cfg, "sam").rho) == ("asam", 0.02)
    assert arm_config(cfg, "sgd").optimizer == "sgd" and arm_config(cfg, "sgd").ood_ratio == 0.0
    with pytest.raises(ValueError, match="unknown arm"):
        arm_config(cfg, "adam")


def test_sam_on_perturbs_only_groupnorm_parameters(tiny) -> None:
    from timm.layers import GroupNormAct

    import samnorm

    config, _ = tiny
    model = demo.build_backbone(config)
    selected = {id(p) for p in samnorm.norm_layers(model)}
    expected = {id(p) for m in model.modules() if isinstance(m, GroupNormAct) for p in m.parameters(recurse=False)}
    assert selected == expected and selected


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.floats(-10, 10), min_size=3, max_size=3), min_size=1, max_size=5))
def test_mean_std_matches_numpy(rows: list[list[float]]) -> None:
    runs = [{"a": r[0], "b": {"c": r[1], "d": r[2]}} for r in rows]
    mean, std = stats.mean_std(runs)
    values = np.array(rows)
    expected_std = values.std(axis=0, ddof=1) if len(rows) > 1 else np.zeros(3)
    assert mean["a"] == pytest.approx(values[:, 0].mean(), abs=1e-9)
    assert mean["b"]["d"] == pytest.approx(values[:, 2].mean(), abs=1e-9)
    assert std["b"]["c"] == pytest.approx(expected_std[1], abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=2, max_size=12), st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_t_interval_matches_scipy(values: list[float], level: float) -> None:
    from scipy import stats as sps

    got = stats.t_interval(values, level)
    x = np.asarray(values)
    assert got["mean"] == pytest.approx(x.mean(), abs=1e-12)
    if x.std() > 1e-9:
        ref = sps.ttest_1samp(x, 0.0).confidence_interval(level)
        assert (got["low"], got["high"]) == (pytest.approx(ref.low, abs=1e-9), pytest.approx(ref.high, abs=1e-9))
    assert got["low"] <= got["mean"] <= got["high"]


def test_bootstrap_interval_matches_a_plain_loop_and_paired_differences() -> None:
    x = np.array([0.3, -0.1, 0.25, 0.05, 0.4, -0.2, 0.15])
    got = stats.bootstrap_interval(x, 0.9, n_boot=2000, seed=5)
    rng = np.random.default_rng(5)
    idx = rng.integers(0, len(x), size=(2000, len(x)))
    means = sorted(sum(x[j] for j in row) / len(x) for row in idx)
    assert got["low"] == pytest.approx(np.quantile(means, 0.05)) and got["high"] == pytest.approx(
        np.quantile(means, 0.95)
    )
    a, b = [0.5, 0.6, 0.7], [0.4, 0.4, 0.4]
    assert stats.paired(a, b)["mean"] == pytest.approx(0.2)
    assert stats.paired(a, b)["low"] == pytest.approx(stats.t_interval([0.1, 0.2, 0.3])["low"])
    with pytest.raises(ValueError, match="as many"):
        stats.paired([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="level"):
        stats.t_interval([1.0, 2.0], 1.5)
    assert math.isnan(stats.t_interval([1.0])["low"])


def _synthetic(pre_fpr: float, sgd: list[float], sam_on: list[float]) -> dict:
    def block(fpr: float) -> dict:
        return {
            "id_accuracy": 0.95,
            "metrics": {s: {"average": {"FPR95": fpr, "AUROC": 1 - fpr}} for s in ("MSP", "Energy")},
        }

    report = {"pretrained": block(pre_fpr), "arms": {}}
    for arm, fprs in (("sgd", sgd), ("sam_on", sam_on)):
        report["arms"][arm] = {"seeds": {str(i): block(f) for i, f in enumerate(fprs)}}
    return report


def test_differences_are_paired_seed_by_seed() -> None:
    # SAM-ON is 1 point below SGD on every seed: the seeds vary a lot, the paired difference does not.
    report = _synthetic(0.5, [0.30, 0.40, 0.20], [0.29, 0.39, 0.19])
    d = stats.differences(report)["sam_on"]
    assert d["vs_sgd"]["MSP"]["FPR95"]["mean"] == pytest.approx(-0.01)
    assert d["vs_sgd"]["MSP"]["FPR95"]["high"] == pytest.approx(-0.01)  # zero spread of the differences
    assert d["vs_pretrained"]["Energy"]["FPR95"]["mean"] == pytest.approx(0.29 - 0.5)
    assert d["vs_pretrained"]["Energy"]["FPR95"]["low"] < d["vs_pretrained"]["Energy"]["FPR95"]["mean"]
    assert "vs_sgd" not in stats.differences(report)["sgd"]


def test_config_rejects_bad_values() -> None:
    for kwargs, match in (
        ({"backbone": "vgg"}, "backbone"),
        ({"arms": ("sam_on", "adam")}, "arms"),
        ({"seeds": ()}, "seeds"),
        ({"scorers": ("MSP", "KNN")}, "scorers"),
        ({"lr": 0.0}, "lr"),
        ({"n_train": 5}, "n_train"),
        ({"widths": (8, 16), "depths": (1,)}, "widths"),
        ({"plot_scorers": ("ViM",)}, "plot_scorers"),
        ({"pretrain_optimizer": "lbfgs"}, "pretrain_optimizer"),
        ({"image_size": 8}, "image_size"),
        ({"ood_loss": "hinge"}, "ood_loss"),
        ({"transforms": ("jigsaw", "cutout")}, "transforms"),
        ({"ood_ratio": 1.5}, "ood_ratio"),
    ):
        with pytest.raises(ValueError, match=match):
            DemoConfig(**kwargs)


def test_backbone_defaults_fill_only_unset_fields() -> None:
    for backbone, defaults in demo.BACKBONE_DEFAULTS.items():
        config = DemoConfig(backbone=backbone)
        assert all(getattr(config, k) == v for k, v in defaults.items())
    assert DemoConfig(backbone="t2t_vit", lr=0.5).lr == 0.5
    assert DemoConfig(backbone="t2t_vit").pretrain_key() != DemoConfig().pretrain_key()
    assert DemoConfig(pretrain_seed=1).pretrain_key() != DemoConfig().pretrain_key()


def test_cli_parser_and_bad_arguments(capsys) -> None:
    from samnorm.demo import cli

    parser = argparse.ArgumentParser(prog="samnorm")
    demo.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo"])
    assert args.func is cli.main and args.seeds == 3 and args.backbone == "resnetv2" and args.ood_ratio == 1.0
    args = parser.parse_args(["demo", "--no-adaptive-sam-on", "--ood-loss", "energy", "--pretrain-seed", "2"])
    assert not args.adaptive_sam_on and args.ood_loss == "energy" and args.lr is None and args.pretrain_seed == 2
    # a bad setting is a UsageError, which samnorm prints as one line with exit 2
    args = parser.parse_args(["demo", "--arms", "sam_on,bogus", "--no-progress"])
    with pytest.raises(UsageError, match="arms must be"):
        args.func(args)
    args = parser.parse_args(["demo", "--ood-ratio", "2"])
    with pytest.raises(UsageError, match="ood_ratio must be"):
        args.func(args)
    from samnorm.cli import main

    assert main(["demo", "--arms", "sam_on,bogus", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("samnorm demo: error: arms must be")
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--seeds", "0"])
    assert list(ARMS) == ["sam_on", "sgd", "sam"]


def test_cli_and_config_import_neither_torch_nor_timm() -> None:
    code = (
        "import argparse, sys\n"
        "import samnorm.demo\n"
        "from samnorm.demo.cli import add_parser\n"
        "p = argparse.ArgumentParser(prog='samnorm'); add_parser(p.add_subparsers(dest='command'))\n"
        "p.parse_args(['demo', '--seeds', '2']); samnorm.demo.DemoConfig(pretrain_seed=1).pretrain_key()\n"
        "print(sorted({'torch', 'timm'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_transform_names_match_the_sampler() -> None:
    from samnorm.data.pseudo_ood import TRANSFORMS
    from samnorm.demo.config import PSEUDO_OOD_TRANSFORMS

    assert set(PSEUDO_OOD_TRANSFORMS) == set(TRANSFORMS)


def test_t2t_vit_backbone_runs_end_to_end(tmp_path) -> None:
    config = DemoConfig(
        backbone="t2t_vit",
        out_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        seeds=(0,),
        arms=("sam_on",),
        n_train=64,
        n_test=40,
        n_ood=20,
        widths=(8, 16),
        depths=(1, 1),
        pretrain_epochs=1,
        batch_size=32,
        plots=False,
        progress=False,
        quiet=True,
    )
    assert config.size == 42
    report = demo.run_demo(config)
    assert "T2T-ViT" in report.data["backbone"]
    assert set(report.data["pretrained"]["metrics"]) == set(SCORER_NAMES)
    assert all(math.isfinite(v) for v in _numbers(report.data["arms"]))


def test_selection_uses_validation_data_and_picks_the_best_eligible(tiny) -> None:
    config, _ = tiny
    lines: list[str] = []
    result = demo.select_hyperparameters(
        config,
        grid={"lr": (0.01, 0.05)},
        rhos={"sam_on": (0.05,), "sam": (0.02,)},
        adaptive_rhos={"sam_on": (0.5,)},
        seeds=(100,),
        out=lines.append,
    )
    table = result["table"]
    assert [e["arm"] for e in table] == ["sgd", "sgd", "sam_on", "sam_on", "sam"]
    assert len(lines) == 1 + len(table) + 1 and lines[-1].startswith("chosen")
    sgd = [e for e in table if e["arm"] == "sgd"]
    pool = [e for e in sgd if e["eligible"]] or sgd
    assert result["chosen"]["lr"] == min(pool, key=lambda e: e["criterion"])["lr"]
    assert set(result["chosen"]) == {"lr", "rho_sam_on", "adaptive_sam_on", "rho_sam", "adaptive_sam"}
    for e in table:
        assert e["eligible"] == (e["accuracy"] >= result["pretrained"]["accuracy"] - 0.01)
        assert e["criterion"] == pytest.approx((e["heldout MSP"] + e["heldout Energy"]) / 2)
    with pytest.raises(ValueError, match="grid keys"):
        demo.select_hyperparameters(config, grid={"momentum_typo": (0.9,)})
    chosen_arm = next(e for e in table if e["arm"] == "sam_on" and e["adaptive"])
    assert chosen_arm["rho"] == 0.5


def _ablation_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"
    spec = importlib.util.spec_from_file_location("samnorm_ablation_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_chooses_rho_on_validation_and_pairs_runs() -> None:
    ab = _ablation_module()
    args = ab.parser().parse_args(
        [
            "--backbones",
            "0,1",
            "--seeds",
            "0,1,2",
            "--lrs",
            "0.1",
            "--ood",
            "on",
            "--optimizers",
            "sgd,sam-on",
            "--rhos",
            "sam-on=0.1,0.5,1",
        ]
    )
    rng = np.random.default_rng(0)

    def figures(fpr: float, criterion: float, accuracy: float) -> dict:
        return {
            "id_accuracy": accuracy,
            "val": {"criterion": criterion, "accuracy": accuracy},
            "test": {s: {"FPR95": fpr, "AUROC": 1 - fpr} for s in ab.SCORERS},
            "theory": {w: {"grad_norm": fpr, "max_logit": 1 + fpr} for w in ("id", "ood")},
        }

    states = {b: {"pretrained": figures(0.5, 0.5, 0.95), "runs": {}} for b in (0, 1)}
    # rho 1 has the best validation criterion but loses 5 points of validation accuracy: not eligible;
    # rho 0.5 is the best eligible one, and its test FPR95 is the worst (the test sets must not decide).
    quality = {0.1: (0.30, 0.20, 0.95), 0.5: (0.40, 0.10, 0.95), 1.0: (0.05, 0.05, 0.90)}
    expected = []
    for b in (0, 1):
        for seed in (0, 1, 2):
            base = float(rng.uniform(0.2, 0.3))
            run = {"seed": seed, "ood": "on", "lr": 0.1}
            states[b]["runs"][ab._key({**run, "optimizer": "sgd", "rho": None})] = figures(base, 0.3, 0.95)
            for rho, (fpr, crit, acc) in quality.items():
                if seed == 0 or rho == 0.5:  # the sweep on seed 0, the chosen rho on the others
                    states[b]["runs"][ab._key({**run, "optimizer": "sam-on", "rho": rho})] = figures(
                        base + fpr, crit, acc
                    )
            expected.append(0.40)
    selection = ab.choose_rhos(states, args)
    assert selection["chosen"] == {"on|0.1|sam-on": 0.5}
    assert [run["rho"] for run in ab._grid(args, selection["chosen"]) if run["optimizer"] == "sam-on"] == [0.5, 0.5]
    result = ab.analyse(states, args)
    entry = result["cells"]["OOD term on, lr 0.1"]["arms"]["sam-on"]
    assert entry["rho"] == 0.5 and entry["n"] == 6
    assert entry["FPR95"]["MSP"]["mean"] == pytest.approx(np.mean(expected))
    assert entry["FPR95"]["MSP"]["high"] == pytest.approx(0.40)  # identical paired differences: no spread
    assert "| OOD term on, lr 0.1 | SAM-ON (0.5) | 6 |" in ab.markdown(result, args)
    del states[1]["runs"][ab._key({"seed": 0, "ood": "on", "lr": 0.1, "optimizer": "sam-on", "rho": 1.0})]
    with pytest.raises(RuntimeError, match="incomplete"):
        ab.choose_rhos(states, args)


@pytest.mark.parametrize(
    "arm, cls, k, passes",
    [("onepass-on", "OnePassSAM", None, 5), ("interval-on", "IntervalSAM", 4, 7), ("looksam-on", "LookSAM", 4, 7)],
)
def test_variant_arms_train_through_the_recipe_with_their_pass_counts(arm, cls, k, passes) -> None:
    """Each cheaper arm is SAM-ON (GroupNorm only) under its schedule: 5 steps cost one forward each,
    plus a second one on SAM steps (interval/LookSAM k=4: steps 0 and 4)."""
    from samnorm.sam import variants
    from samnorm.train.recipe import _build_optimizer, finetune

    ab = _ablation_module()
    run = {"seed": 0, "ood": "on", "lr": 0.1, "optimizer": arm, "rho": 0.1}
    recipe = ab.recipe_of(run, DemoConfig())
    assert (recipe.optimizer, recipe.variant, recipe.variant_k, recipe.rho, recipe.ood_ratio) == (
        "sam-on",
        ab.VARIANT_ARMS[arm][0],
        k,
        0.1,
        1.0,
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.GroupNorm(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    opt = _build_optimizer(model, recipe)
    assert type(opt) is getattr(variants, cls) and getattr(opt, "k", None) == k
    assert {id(p) for p in opt.perturbed_parameters()} == {id(p) for p in model[2].parameters()}
    forwards = []
    model[1].register_forward_hook(lambda *_: forwards.append(1))
    data = (torch.rand(40, 1, 4, 4), torch.arange(40) % 3)
    finetune(
        model, data, dataclasses.replace(recipe, batch_size=8, transforms=None), progress=False, log=lambda _: None
    )
    assert len(forwards) == passes
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_recipe_rejects_a_variant_without_sam_or_a_bad_k() -> None:
    from samnorm.train.recipe import FinetuneConfig

    for bad in (
        dict(optimizer="sgd", variant="onepass"),
        dict(variant="lookahead"),
        dict(variant="onepass", variant_k=4),
        dict(variant="interval", variant_k=0),
    ):
        with pytest.raises(ValueError, match="variant"):
            FinetuneConfig(**bad)


def test_ablation_reports_variant_minus_sam_on_paired() -> None:
    ab = _ablation_module()
    args = ab.parser().parse_args(
        [
            "--backbones",
            "0",
            "--seeds",
            "0,1,2",
            "--lrs",
            "0.1",
            "--ood",
            "on",
            "--optimizers",
            "sgd,sam-on,onepass-on",
            "--rhos",
            "sam-on=0.1;onepass-on=0.1",
        ]
    )

    def figures(fpr: float, accuracy: float = 0.95) -> dict:
        return {
            "id_accuracy": accuracy,
            "val": {"criterion": fpr, "accuracy": accuracy},
            "test": {s: {"FPR95": fpr, "AUROC": 1 - fpr} for s in ab.SCORERS},
            "theory": {w: {"grad_norm": fpr, "max_logit": 1 + fpr} for w in ("id", "ood")},
        }

    runs = {}
    gaps = [0.04, 0.05, 0.06]  # onepass − SAM-ON per seed
    for seed, gap in enumerate(gaps):
        for opt, rho, fpr in (
            ("sgd", None, 0.3),
            ("sam-on", 0.1, 0.2 + seed / 100),
            ("onepass-on", 0.1, 0.2 + seed / 100 + gap),
        ):
            runs[ab._key({"seed": seed, "ood": "on", "lr": 0.1, "optimizer": opt, "rho": rho})] = figures(fpr)
    result = ab.analyse({0: {"pretrained": figures(0.5), "runs": runs}}, args)
    entry = result["cells"]["OOD term on, lr 0.1"]["arms"]["onepass-on"]
    assert entry["vs_sam_on"]["FPR95"]["Energy"]["mean"] == pytest.approx(np.mean(gaps))
    assert entry["vs_sam_on"]["FPR95"]["Energy"]["low"] > 0  # every seed loses: the interval excludes 0
    assert "vs_sam_on" not in result["cells"]["OOD term on, lr 0.1"]["arms"]["sam-on"]
    assert "| OOD term on, lr 0.1 | OnePass SAM-ON (0.1) | 3 | +5.0 [" in ab.markdown(result, args)


@pytest.mark.parametrize("variant, k", [("onepass", None), ("looksam", 3), ("interval", 3), ("gsam", None)])
def test_a_variant_run_resumes_bit_identically(tmp_path, variant, k) -> None:
    """The recipe's checkpoint holds the variant's state (step count, LookSAM's g_v, the momentum):
    resumed after step 4 (a plain step of k=3 that adds g_v), 7 steps end as an uninterrupted run."""
    from helpers import CrashAfter

    from samnorm.train.recipe import finetune

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.GroupNorm(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
        )

    data = torch.utils.data.TensorDataset(torch.rand(64, 1, 4, 4), torch.arange(64) % 3)
    kw = dict(
        steps=7,
        checkpoint_every=2,
        batch_size=8,
        optimizer="sam-on",
        rho=0.5,
        lr=0.1,
        variant=variant,
        variant_k=k,
        ood_ratio=0.0,
        progress=False,
        log=lambda _: None,
    )
    straight = finetune(model(), data, output_dir=tmp_path / "a", **kw).model
    with pytest.raises(KeyboardInterrupt):
        finetune(model(), CrashAfter(data, 5 * 8 + 3), output_dir=tmp_path / "b", **kw)
    resumed = finetune(model(), data, output_dir=tmp_path / "b", resume=True, **kw).model
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
