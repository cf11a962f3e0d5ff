"""benchmarks/ablation.py's studies (issue 20): the runs' recipes, the references and the lr chosen on validation."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("timm")

from samnorm.demo import DemoConfig
from samnorm.train.recipe import FinetuneConfig


@pytest.fixture(scope="module")
def ab():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"
    spec = importlib.util.spec_from_file_location("samnorm_ablation_studies", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(ab, *argv: str):
    return ab.resolve(ab.parser().parse_args(list(argv)))


def _figures(ab, fpr: float, criterion: float, accuracy: float = 0.95) -> dict:
    return {
        "id_accuracy": accuracy,
        "val": {"criterion": criterion, "accuracy": accuracy},
        "test": {s: {"FPR95": fpr, "AUROC": 1 - fpr} for s in ab.SCORERS},
        "theory": {w: {"grad_norm": fpr, "max_logit": 1 + fpr} for w in ("id", "ood")},
    }


def test_each_term_sets_only_its_field_of_the_demo_recipe(ab) -> None:
    config = DemoConfig()
    base = ab.recipe_of({"ood": "on", "lr": 0.1, "optimizer": "sam-on", "rho": 0.1}, config)
    assert (base.ood_ratio, base.ood_loss, base.ood_weight, base.transforms) == (
        1.0,
        "uniform",
        ab.OOD_WEIGHT,
        list(config.transforms),
    )
    expected = {
        "off": {"ood_ratio": 0.0},
        "only=rotate": {"transforms": ["rotate"]},
        "drop=rotate": {"transforms": [t for t in config.transforms if t != "rotate"]},
        "ratio=0.25": {"ood_ratio": 0.25},
        "loss=energy+weight=0.1": {"ood_loss": "energy", "ood_weight": 0.1},
        "weight=0.5": {"ood_weight": 0.5},
    }
    for term, fields in expected.items():
        recipe = ab.recipe_of({"ood": term, "lr": 0.1, "optimizer": "sam-on", "rho": 0.1}, config)
        assert dataclasses.asdict(recipe) == dataclasses.asdict(dataclasses.replace(base, **fields)), term
    assert (base.m_in, base.m_out) == (config.m_in, config.m_out)  # the energy margins fitted to the demo's logits


def test_the_cli_term_is_samnorm_finetune_with_its_0_1_0_defaults(ab) -> None:
    # The recorded cli runs measured the defaults of 0.1.0 (all six transforms, uniform weight 0.5); the
    # defaults chosen from them (RESULTS.md section 8.4) must not change what the term reruns.
    measured = dict(transforms=["jigsaw", "patch_mix", "rotate", "blur", "noise", "fourier"], ood_weight=0.5)
    default = ab.recipe_of(
        {"ood": "cli", "lr": FinetuneConfig.lr, "optimizer": "cli-default", "rho": None}, DemoConfig()
    )
    assert dataclasses.asdict(default) == dataclasses.asdict(FinetuneConfig(**measured))
    sgd = ab.recipe_of({"ood": "cli", "lr": 0.1, "optimizer": "sgd", "rho": None}, DemoConfig())
    assert dataclasses.asdict(sgd) == dataclasses.asdict(FinetuneConfig(optimizer="sgd", lr=0.1, **measured))
    # ... and those are no longer today's: jigsaw alone, uniform weight 0.25
    today = FinetuneConfig()
    assert (today.resolved_transforms(), today.resolved_ood_weight()) == (["jigsaw"], 0.25)
    assert (default.resolved_transforms(), default.resolved_ood_weight()) == (measured["transforms"], 0.5)


@pytest.mark.parametrize(
    "term",
    [
        "only=rotat",
        "only=rotate+drop=blur",
        "ratio=0",
        "ratio=2",
        "loss=hinge",
        "weight=-1",
        "on+ratio=0.5",
        "ratio=0.5+ratio=0.25",
        "ratio",
    ],
)
def test_a_bad_term_is_refused_before_any_run(ab, term, capsys) -> None:
    with pytest.raises(ValueError, match="bad pseudo-OOD term"):
        ab.parse_term(term)
    assert ab.main(["--study", "term", "--terms", f"on,{term}", "--report-only"]) == 2
    assert "bad pseudo-OOD term" in capsys.readouterr().err


def test_defaults_per_study_and_family(ab) -> None:
    arms = _args(ab, "--family", "t2t_vit")
    assert arms.out == "benchmarks/ablation_runs/t2t_vit"
    assert (arms.widths, arms.lrs) == ((32, 64, 128, 256), (0.01, 0.03, 0.1))
    assert "cli-default" not in arms.optimizers.split(",")
    term = _args(ab, "--study", "term")
    assert term.terms.split(",")[0] == "on" and term.lrs == (0.1,) and term.optimizers == "sgd,sam-on"
    cli = _args(ab, "--study", "cli")
    assert FinetuneConfig.lr in cli.lrs and cli.terms == "cli"


def test_term_study_reports_each_cell_minus_the_full_term_arm_by_arm(ab) -> None:
    args = _args(
        ab, "--study", "term", "--backbones", "0", "--seeds", "0,1,2", "--terms", "on,only=blur", "--rhos", "sam-on=0.1"
    )
    runs = {}
    gaps = {"sgd": [0.10, 0.12, 0.14], "sam-on": [-0.02, 0.0, 0.02]}  # only=blur − on, per seed
    for seed in range(3):
        for opt, rho in (("sgd", None), ("sam-on", 0.1)):
            base = 0.2 + seed / 50 + (0.05 if opt == "sgd" else 0.0)
            for term, fpr in (("on", base), ("only=blur", base + gaps[opt][seed])):
                runs[ab._key({"seed": seed, "ood": term, "lr": 0.1, "optimizer": opt, "rho": rho})] = _figures(
                    ab, fpr, fpr
                )
    result = ab.analyse({0: {"pretrained": _figures(ab, 0.5, 0.5), "runs": runs}}, args)
    cell = result["cells"]["OOD term only=blur, lr 0.1"]["arms"]
    for opt in ("sgd", "sam-on"):
        assert cell[opt]["vs_reference"]["of"] == ["on", 0.1, opt]
        assert cell[opt]["vs_reference"]["FPR95"]["MSP"]["mean"] == pytest.approx(np.mean(gaps[opt]))
    assert cell["sgd"]["vs_reference"]["FPR95"]["MSP"]["low"] > 0  # every seed worse: the interval excludes 0
    assert "vs_reference" not in result["cells"]["OOD term on, lr 0.1"]["arms"]["sgd"]
    assert "| OOD term only=blur, lr 0.1 | SGD | 3 | +12.0 [" in ab.markdown(result, args)


def test_lr_is_chosen_per_arm_on_validation_not_on_test(ab) -> None:
    args = _args(
        ab,
        "--backbones",
        "0,1",
        "--seeds",
        "0,1",
        "--lrs",
        "0.01,0.1",
        "--terms",
        "on",
        "--optimizers",
        "sgd,sam-on",
        "--rhos",
        "sam-on=0.1,1",
    )
    # (fpr on test, validation criterion, validation accuracy) per (lr, arm, rho): SGD's best validation
    # criterion is at lr 0.1, SAM-ON's at lr 0.01 (rho 1 at lr 0.01 is better still but loses accuracy)
    quality = {
        (0.01, "sgd", None): (0.1, 0.4, 0.95),
        (0.1, "sgd", None): (0.5, 0.2, 0.95),
        (0.01, "sam-on", 0.1): (0.6, 0.1, 0.95),
        (0.01, "sam-on", 1.0): (0.0, 0.05, 0.80),
        (0.1, "sam-on", 0.1): (0.0, 0.3, 0.95),
        (0.1, "sam-on", 1.0): (0.0, 0.35, 0.95),
    }
    states = {b: {"pretrained": _figures(ab, 0.5, 0.5), "runs": {}} for b in (0, 1)}
    for b in (0, 1):
        for seed in (0, 1):
            for (lr, opt, rho), (fpr, crit, acc) in quality.items():
                run = {"seed": seed, "ood": "on", "lr": lr, "optimizer": opt, "rho": rho}
                states[b]["runs"][ab._key(run)] = _figures(ab, fpr + seed / 100, crit, acc)
    result = ab.analyse(states, args)
    assert {k: v["lr"] for k, v in result["selection"]["lr"].items()} == {"on|sgd": 0.1, "on|sam-on": 0.01}
    cell = result["cells"]["OOD term on, lr chosen on validation"]
    assert cell["arms"]["sam-on"]["rho"] == 0.1 and cell["arms"]["sam-on"]["n"] == 4
    assert cell["arms"]["sam-on"]["FPR95"]["MSP"]["mean"] == pytest.approx(0.6 - 0.5)
    assert "| OOD term on, lr chosen on validation | SAM-ON (lr 0.01, rho 0.1) | 4 | +10.0 [" in ab.markdown(
        result, args
    )


def test_runs_of_another_backbone_are_not_mixed_in(ab, tmp_path) -> None:
    args = _args(ab, "--family", "t2t_vit", "--out", str(tmp_path))
    stored = {"pretrained": {"pretrain": {"path": "/cache/demo/resnetv2-30acf0d7f1cd7e03.pt"}}, "runs": {}}
    (tmp_path / "backbone0.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="another pretrained backbone"):
        ab.run_backbone(args, 0)


def test_the_backbone_json_holds_one_run_per_line_and_reads_back_equal(ab) -> None:
    state = {"pretrained": {"val": {"accuracy": 0.95}}, "runs": {}}
    assert json.loads(ab.dumps_state(state)) == state
    state["runs"] = {f"on|0.1|sgd|None|{seed}": {**_figures(ab, 0.1 * seed, 0.2), "seconds": 1.5} for seed in range(3)}
    text = ab.dumps_state(state)
    assert json.loads(text) == state
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines[2:5]] == [json.dumps(k) for k in state["runs"]]
