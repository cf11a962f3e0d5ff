"""The fine-tuning recipe: determinism, exact resumption, optimizers, checkpoints and image folders."""

from __future__ import annotations

import json
import os

import helpers
import pytest
import torch
from helpers import CrashAfter
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from samnorm.data.folders import ImageFolder, ImageTransform
from samnorm.sam.optimizer import SAM
from samnorm.train.recipe import CHECKPOINT_NAME, DivergedError, FinetuneConfig, _build_optimizer, finetune
from samnorm.utils.io import atomic_save

timm = pytest.importorskip("timm")


def tiny_t2t(seed: int = 0) -> nn.Module:
    # dropout inside the T2T module (0.1) exercises the saved RNG too
    return helpers.tiny_t2t(seed, classes=4)


def toy_data(n: int = 64) -> TensorDataset:
    return helpers.toy(n, classes=4)


FAST = dict(batch_size=8, progress=False, log=lambda _: None)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_same_weights():
    a = finetune(tiny_t2t(), toy_data(), steps=3, **FAST).model
    b = finetune(tiny_t2t(), toy_data(), steps=3, **FAST).model
    assert_bit_identical(state(a), state(b))
    c = finetune(tiny_t2t(), toy_data(), steps=3, seed=1, **FAST).model
    assert not torch.equal(state(a)["head.weight"], state(c)["head.weight"])


@pytest.mark.parametrize("optimizer", ["sam-on", "sgd"])
def test_resumed_run_is_bit_identical(tmp_path, optimizer):
    kw = dict(steps=7, checkpoint_every=2, log_every=1, optimizer=optimizer, ood_ratio=0.5, **FAST)
    straight = finetune(tiny_t2t(), toy_data(), output_dir=tmp_path / "a", **kw)
    # Epochs have 8 steps of 8 images; crash while loading step 6, after the checkpoint of step 4.
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_t2t(), CrashAfter(toy_data(), 5 * 8 + 3), output_dir=tmp_path / "b", **kw)
    assert torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)["step"] == 4
    resumed = finetune(tiny_t2t(seed=123), toy_data(), output_dir=tmp_path / "b", resume=True, **kw)
    assert_bit_identical(state(straight.model), state(resumed.model))
    assert straight.history == resumed.history
    a = torch.load(tmp_path / "a" / CHECKPOINT_NAME, weights_only=True)
    b = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, b["optimizer"]["state"][k][name]), (k, name)
    logged = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 8))


def test_the_log_after_a_resume_is_the_uninterrupted_one(tmp_path):
    # issue 11, finding 5: checkpoints that fall between log lines lost the steps since the last line
    kw = dict(steps=6, checkpoint_every=2, log_every=3, **FAST)
    straight = finetune(tiny_t2t(), toy_data(), output_dir=tmp_path / "a", **kw)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_t2t(), CrashAfter(toy_data(), 4 * 8 + 1), output_dir=tmp_path / "b", **kw)  # dies in step 5
    assert torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)["step"] == 4
    resumed = finetune(tiny_t2t(), toy_data(), output_dir=tmp_path / "b", resume=True, **kw)
    assert resumed.history == straight.history and [r["step"] for r in resumed.history] == [3, 6]
    assert (tmp_path / "a" / "log.jsonl").read_text() == (tmp_path / "b" / "log.jsonl").read_text()


def test_resume_across_an_epoch_boundary(tmp_path):
    kw = dict(steps=11, checkpoint_every=9, **FAST)  # 8 steps per epoch: resume inside epoch 2
    straight = finetune(tiny_t2t(), toy_data(), **kw)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_t2t(), CrashAfter(toy_data(), 10 * 8), output_dir=tmp_path, **kw)
    resumed = finetune(tiny_t2t(), toy_data(), output_dir=tmp_path, resume=True, **kw)
    assert_bit_identical(state(straight.model), state(resumed.model))


def test_resume_refuses_other_settings(tmp_path):
    finetune(tiny_t2t(), toy_data(), steps=2, output_dir=tmp_path, **FAST)
    with pytest.raises(ValueError, match=r"lr: 0.001 -> 0.01"):
        finetune(tiny_t2t(), toy_data(), steps=2, lr=0.01, output_dir=tmp_path, resume=True, **FAST)
    # Logging cadence may change on resume; a finished run stays finished.
    done = finetune(tiny_t2t(), toy_data(), steps=2, log_every=7, output_dir=tmp_path, resume=True, **FAST)
    assert done.steps == 2


def test_checkpoint_rebuilds_the_model(tmp_path):
    from samnorm.models import create_model

    kwargs = dict(img_size=16, in_chans=1, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)
    model = create_model("t2t_vit_7", num_classes=4, **kwargs)
    result = finetune(
        model, toy_data(), steps=2, output_dir=tmp_path, model_name="t2t_vit_7", model_kwargs=kwargs, **FAST
    )
    rebuilt = create_model(None, checkpoint=result.checkpoint)
    assert_bit_identical(state(result.model), state(rebuilt))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["total_steps"] == 2 and cfg["optimizer"] == "sam-on" and cfg["model_name"] == "t2t_vit_7"


@pytest.mark.parametrize(
    "name, sam, norm_only, adaptive, rho",
    [
        ("sam-on", True, True, False, 0.5),
        ("asam-on", True, True, True, 10.0),
        ("sam", True, False, False, 0.05),
        ("asam", True, False, True, 0.5),
        ("sgd", False, 0, 0, 0),
    ],
)
def test_optimizer_choices(name, sam, norm_only, adaptive, rho):
    model = tiny_t2t()
    opt = _build_optimizer(model, FinetuneConfig(optimizer=name))
    assert isinstance(opt, SAM) == sam
    if sam:
        norm_params = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        perturbed = {id(p) for p in opt.perturbed_parameters()}
        assert (perturbed == norm_params) if norm_only else (perturbed == {id(p) for p in model.parameters()})
        assert opt.adaptive == adaptive and opt.rho == rho
    before = state(model)
    finetune(model, toy_data(), steps=1, optimizer=name, **FAST)
    assert not torch.equal(before["head.weight"], model.state_dict()["head.weight"])


def test_sam_on_differs_from_sgd_and_logs_are_sane():
    sam = finetune(tiny_t2t(), toy_data(), steps=2, log_every=1, **FAST)
    sgd = finetune(tiny_t2t(), toy_data(), steps=2, log_every=1, optimizer="sgd", **FAST)
    assert not torch.equal(state(sam.model)["norm.weight"], state(sgd.model)["norm.weight"])
    # The first step is taken from identical weights and data: identical first-pass logs.
    assert sam.history[0]["loss"] == pytest.approx(sgd.history[0]["loss"], rel=1e-6)
    for r in sam.history:
        # the recipe's default weight of the uniform loss: 0.25 (RESULTS.md section 8.4), not the library's 0.5
        assert 0 <= r["acc"] <= 1 and r["ood"] > 0 and r["loss"] == pytest.approx(r["ce"] + 0.25 * r["ood"], rel=1e-5)
    assert sam.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to zero at the last step


def test_epochs_and_no_pseudo_ood():
    r = finetune(tiny_t2t(), toy_data(), epochs=0.5, ood_ratio=0.0, log_every=1, **FAST)
    assert r.steps == 4 and all(h["ood"] == 0 for h in r.history)


def test_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="DataLoader"):
        finetune(tiny_t2t(), DataLoader(toy_data()), steps=1, **FAST)
    with pytest.raises(ValueError, match="fewer than one batch"):
        finetune(tiny_t2t(), toy_data(4), steps=1, **FAST)
    with pytest.raises(ValueError, match="unknown optimizer"):
        FinetuneConfig(optimizer="adam-on")
    with pytest.raises(ValueError, match="ood_ratio"):
        FinetuneConfig(ood_ratio=2)
    with pytest.raises(TypeError):
        finetune(tiny_t2t(), toy_data(), steps=1, not_a_setting=3, **FAST)


def test_atomic_save_never_leaves_half_a_file(tmp_path):
    path = tmp_path / "c.pt"
    atomic_save({"v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_save({"v": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["v"] == 1 and os.listdir(tmp_path) == ["c.pt"]


# ---------------------------------------------------------------- image folders


def make_folder(root, classes=("ant", "bee"), per_class=3, size=(20, 14), mode="RGB", corrupt=()):
    from PIL import Image

    for ci, c in enumerate(classes):
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            colour = (40 * ci + 10 * i,) * (3 if mode == "RGB" else 1)
            Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(root / c / f"{i}.png")
    for rel in corrupt:
        (root / rel).write_bytes(b"this is not an image")
    return root


def test_image_folder_skips_and_counts_unreadable_files(tmp_path):
    root = make_folder(tmp_path, corrupt=["ant/broken.jpg", "bee/zz.png"])
    ds = ImageFolder(root, transform=ImageTransform(size=8))
    assert len(ds) == 8 and ds.classes == ["ant", "bee"]
    with pytest.warns(RuntimeWarning, match="unreadable"):
        batches = list(DataLoader(ds, batch_size=4))
    assert sum(len(b[0]) for b in batches) == 8  # every slot filled by a readable neighbour
    assert ds.skipped == 2 and sorted(os.path.basename(p) for p in ds.skipped_paths()) == ["broken.jpg", "zz.png"]


def test_image_folder_counts_across_worker_processes(tmp_path):
    root = make_folder(tmp_path, corrupt=["ant/broken.jpg"])
    ds = ImageFolder(root, transform=ImageTransform(size=8))
    list(DataLoader(ds, batch_size=2, num_workers=2))
    assert ds.skipped == 1


def test_image_folder_layouts_and_errors(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    from PIL import Image

    Image.new("L", (5, 9)).save(flat / "a.png")
    ds = ImageFolder(flat, transform=ImageTransform(size=6, mean=(0.5,), std=(0.5,)))
    x, y = ds[0]
    assert x.shape == (1, 6, 6) and y == 0 and ds.classes == ["."]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no images"):
        (tmp_path / "empty").mkdir()
        ImageFolder(tmp_path / "empty")
    root = make_folder(tmp_path / "val", classes=("ant", "wasp"))
    with pytest.raises(ValueError, match=r"not trained on.*wasp"):
        ImageFolder(root, classes=["ant", "bee"])
    fixed = ImageFolder(make_folder(tmp_path / "val2", classes=("bee",)), classes=["ant", "bee"])
    assert set(fixed.targets) == {1}
    bad = make_folder(tmp_path / "allbad", classes=("a", "b"), per_class=0, corrupt=["a/x.png", "b/x.png"])
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="no readable image"):
        ImageFolder(bad)[0]


def test_image_transform_against_pil_reference():
    import numpy as np
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (15, 30, 3), dtype=np.uint8))
    t = ImageTransform(size=10, crop_pct=0.5, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="nearest")
    # Shorter side 15 -> 10 / 0.5 = 20, so 30x15 -> 40x20, then the centred 10x10 crop.
    ref = img.resize((40, 20), resample=Image.NEAREST).crop((15, 5, 25, 15))
    expected = torch.from_numpy(np.asarray(ref, dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(t(img), expected)


def test_finetune_on_a_folder_with_a_corrupt_image(tmp_path):
    root = make_folder(tmp_path, classes=("a", "b", "c", "d"), per_class=4, corrupt=["b/bad.jpg"])
    ds = ImageFolder(root, transform=ImageTransform(size=16, mean=(0.5,), std=(0.5,)))
    with pytest.warns(RuntimeWarning, match="unreadable"):
        result = finetune(tiny_t2t(), ds, epochs=1, batch_size=4, progress=False, log=lambda _: None)
    assert result.steps == 4 and result.skipped_images == 1


def _counted_t2t():
    model = tiny_t2t().eval()
    calls = []
    model.blocks[0].register_forward_hook(lambda *args: calls.append(1))
    return model, calls


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),  # was a ZeroDivisionError in the sharding
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0"),
        ({"tpr": 95.0}, "tpr must be a fraction"),
        ({"convention": "openood_v2"}, "unknown convention"),
        ({"scorer_options": {"react": {"percentile": 95}}}, "not evaluated"),
        ({"scorer_options": {"msp": {"temprature": 2.0}}}, "has no option 'temprature'"),
        ({"scorer_options": {"msp": {}, "MSP": {}}}, "twice"),
    ],
)
def test_evaluate_datasets_checks_its_arguments_before_any_forward_pass(bad, match):
    from samnorm.ood.sharded import evaluate_datasets

    model, calls = _counted_t2t()
    data = toy_data(8)
    with pytest.raises(ValueError, match=match):
        evaluate_datasets(model, data, {"noise": data}, ["msp", "energy"], **{"fit_data": data, **bad})
    assert calls == []


def test_evaluate_datasets_passes_scorer_options():
    from samnorm.ood import MSP
    from samnorm.ood.sharded import evaluate_datasets

    model, data = tiny_t2t().eval(), toy_data(8)
    res, _ = evaluate_datasets(
        model, data, {"noise": data}, ["msp", "energy"], batch_size=3, scorer_options={"MSP": {"temperature": 7.0}}
    )
    want = MSP(model, temperature=7.0).score(data.tensors[0]).double().numpy()
    assert res.scores["MSP"]["noise"] == pytest.approx(want, rel=1e-6)
    assert res.scores["MSP"]["noise"] != pytest.approx(MSP(model).score(data.tensors[0]).double().numpy())


# ---------------------------------------------------------------- fp16 (issue 20): GradScaler in the recipe
MARK = -1.0  # an all-MARK image (the toy images are in [0, 1]) makes the gradient of its step inf


class InfOnMark(nn.Module):
    """The tiny T2T-ViT; a batch holding an all-MARK image gets an inf gradient at the logits (the forward
    stays finite), and every forward records the head's weights."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net, self.seen = tiny_t2t(seed), []

    def forward(self, x):
        out = self.net(x)
        self.seen.append(self.net.head.weight.detach().clone())
        if out.requires_grad and bool((x == MARK).flatten(1).all(1).any()):
            out.register_hook(lambda g: torch.full_like(g, float("inf")))
        return out


def marked_data(step: int) -> TensorDataset:
    """toy_data with an all-MARK image in the batch of 0-based ``step`` (8 images a step, epoch 0's order)."""
    from torch.utils.data import DistributedSampler

    data = toy_data()
    order = list(DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True))
    data.tensors[0][order[8 * step]] = MARK
    return data


@pytest.mark.parametrize(
    "optimizer, variant, clip",
    [
        ("sam-on", None, None),
        ("sgd", None, None),
        ("sam-on", "looksam", None),
        ("sam-on", "onepass", None),
        ("sam-on", None, 1e-3),
        ("sgd", None, 1e-3),
    ],
)
def test_fp16_follows_the_fp32_run_within_the_measured_tolerance(optimizer, variant, clip):
    # Measured on the CPU (tiny T2T-ViT, 4 steps, lr 0.01): the fp16 run's total update (every weight)
    # differs from the fp32 run's by 0.04-0.08% of its norm (SAM-ON 0.055%, SGD 0.057%, LookSAM 0.083%,
    # OnePass 0.070%; clipped to 1e-3, which shrinks the update 1000x: 0.044%, 0.069%), the logged losses
    # by < 1e-5 relative; the bounds leave about 6x room. An unscaled update (65536x), gradients clipped
    # before unscaling, a skipped step or no autocast at all (bit-identical) fails.
    kw = dict(steps=4, lr=0.01, log_every=1, optimizer=optimizer, variant=variant, grad_clip=clip, **FAST)
    init = state(tiny_t2t())
    ref, half = finetune(tiny_t2t(), toy_data(), **kw), finetune(tiny_t2t(), toy_data(), precision="fp16", **kw)
    a, b = state(ref.model), state(half.model)
    keys = [k for k in a if a[k].is_floating_point()]
    moved_ref = torch.cat([(a[k] - init[k]).flatten() for k in keys])
    moved_half = torch.cat([(b[k] - init[k]).flatten() for k in keys])
    assert 0 < (moved_half - moved_ref).norm() <= 0.005 * moved_ref.norm()  # > 0: fp16 autocast ran
    for r, h in zip(ref.history, half.history, strict=True):
        assert h["loss"] == pytest.approx(r["loss"], rel=1e-4) and h["acc"] == r["acc"]
        assert (h["loss_scale"], h["skipped_steps"]) == (65536.0, 0) and "loss_scale" not in r
    assert half.skipped_steps == ref.skipped_steps == 0


@pytest.mark.filterwarnings("ignore:SAM. the first-pass gradient norm was not finite:RuntimeWarning")
@pytest.mark.parametrize("optimizer", ["sam-on", "sgd"])
def test_fp16_skips_a_step_with_an_inf_gradient_and_counts_it(optimizer):
    model = InfOnMark()
    result = finetune(
        model, marked_data(step=2), steps=5, lr=0.01, log_every=1, optimizer=optimizer, precision="fp16", **FAST
    )
    assert result.skipped_steps == 1
    assert [r["skipped_steps"] for r in result.history] == [0, 0, 1, 0, 0]
    assert [r["loss_scale"] for r in result.history] == [65536.0] * 2 + [32768.0] * 3  # backed off once
    per_step = len(model.seen) // 5  # forwards per step: 2 for SAM-ON, 1 for SGD
    first = model.seen[::per_step]  # the head's weights at each step's first forward
    assert torch.equal(first[2], first[3]) and not torch.equal(first[1], first[2])  # step 2 moved nothing
    assert all(bool(torch.isfinite(p).all()) for p in result.model.parameters())


@pytest.mark.filterwarnings("ignore:SAM. the first-pass gradient norm was not finite:RuntimeWarning")
def test_fp16_resume_restores_the_loss_scale_bit_identically(tmp_path):
    kw = dict(steps=7, checkpoint_every=2, log_every=1, lr=0.01, precision="fp16", **FAST)
    straight = finetune(InfOnMark(), marked_data(step=1), output_dir=tmp_path / "a", **kw)
    with pytest.raises(KeyboardInterrupt):  # dies loading step 6, after the checkpoint of step 4
        finetune(InfOnMark(), CrashAfter(marked_data(step=1), 5 * 8 + 3), output_dir=tmp_path / "b", **kw)
    saved = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == 4 and saved["scaler"]["scale"] == 32768.0  # the skipped step 2 halved it
    resumed = finetune(InfOnMark(seed=123), marked_data(step=1), output_dir=tmp_path / "b", resume=True, **kw)
    assert_bit_identical(state(straight.model), state(resumed.model))
    assert straight.history == resumed.history and resumed.skipped_steps == straight.skipped_steps == 1
    assert [r["loss_scale"] for r in resumed.history][4:] == [32768.0] * 3  # not a fresh scaler's 65536


def test_a_checkpoint_of_0_1_0_resumes_with_the_defaults_it_was_written_with(tmp_path):
    # issue 20 changed the defaults (jigsaw alone, uniform weight 0.25); a 0.1.0 checkpoint records
    # transforms=None, ood_weight=None and no "resolved" record: it meant all six and 0.5
    from samnorm.train.recipe import DEFAULTS_0_1_0

    finetune(tiny_t2t(), toy_data(), steps=2, output_dir=tmp_path, **FAST)
    path = tmp_path / CHECKPOINT_NAME
    saved = torch.load(path, weights_only=True)
    assert saved["resolved"] == {"ood_weight": 0.25, "transforms": ["jigsaw"]}
    del saved["resolved"]
    torch.save(saved, path)
    with pytest.raises(
        ValueError,
        match=r"ood_weight: 0\.5 -> 0\.25; transforms: \['jigsaw', 'patch_mix'.*\] "
        r"-> \['jigsaw'\]",
    ):
        finetune(tiny_t2t(), toy_data(), steps=2, output_dir=tmp_path, resume=True, **FAST)
    old = dict(transforms=list(DEFAULTS_0_1_0["transforms"]), ood_weight=0.5)
    assert finetune(tiny_t2t(), toy_data(), steps=2, output_dir=tmp_path, resume=True, **old, **FAST).steps == 2


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    # SGD at lr 1e30: the first step is finite, the weights then overflow. Checkpoints every step,
    # log lines never: the check before each save catches it.
    kw = dict(steps=6, checkpoint_every=1, log_every=100, optimizer="sgd", lr=1e30, momentum=0.0, **FAST)
    with pytest.raises(DivergedError, match=r"training diverged: .* the last good checkpoint \(step (\d)\)") as info:
        finetune(tiny_t2t(), toy_data(), output_dir=tmp_path, **kw)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert f"(step {saved['step']})" in str(info.value) and saved["step"] < 6
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    # Only ever a sync where the loop already had one: at log lines and checkpoints.
    with pytest.raises(DivergedError, match="no checkpoint was written"):
        finetune(tiny_t2t(), toy_data(), **{**kw, "checkpoint_every": 100, "log_every": 2})


def test_ctrl_c_during_finetune_names_the_checkpoint_kept(tmp_path):
    def ctrl_c_at_step_3(line):
        if line.startswith("{") and json.loads(line)["step"] == 3:
            raise KeyboardInterrupt

    kw = dict(FAST, steps=6, checkpoint_every=1, log_every=1, log=ctrl_c_at_step_3)
    with pytest.raises(KeyboardInterrupt, match=r"interrupted; the last checkpoint \(step 2\) is kept in .*--resume"):
        finetune(tiny_t2t(), toy_data(), output_dir=tmp_path, **kw)
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 2
    with pytest.raises(KeyboardInterrupt, match="interrupted; no checkpoint was written"):
        finetune(tiny_t2t(), toy_data(), **kw)
