"""FSDP2 cases for tests/test_ddp.py, run by its torchrun worker (tests/ddp_sam_worker.py) in the same launch.

Each case trains a tiny float64 MLP (LayerNorm and GroupNorm, shards of uneven size) for 3 steps with
SAM, SAM-ON, ASAM-ON or a variant, under ``fully_shard`` on 2 CPU ranks, each rank on its half of the
batch, through the loss path (``first_step(loss)``) or the ``.grad`` path. Every rank saves the full
parameters (``full_tensor()``) and the ascent's norm of each step. The test compares them with the
same run on one process on the whole batch (:func:`reference`, outside the process group: a variant
would take the group's ranks for replicas). A case that raises records the error, and the next runs.
"""

from __future__ import annotations

import torch
from torch import nn

from samnorm import SAM
from samnorm.sam.variants import GSAM, IntervalSAM, LookSAM, OnePassSAM

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6 has it under its first, private name, or not at all
    try:
        from torch.distributed._composable.fsdp import fully_shard
    except ImportError:
        fully_shard = None

# name: (class, perturb the norm layers (SAM-ON) or everything, keyword arguments, path)
CASES = {
    f"{name}-{path}": (cls, on, kwargs, path)
    for name, cls, on, kwargs, paths in [
        ("sam", SAM, False, {}, ("loss", "grad")),
        ("sam-on", SAM, True, {}, ("loss", "grad", "closure", "scaler", "scaler-inf")),
        ("sam-on-sync", SAM, True, {"sync_first_pass": True}, ("grad",)),
        ("sam-on-hsdp", SAM, True, {}, ("grad",)),  # HSDP: replicated over the 2 ranks, "sharded" over 1
        ("asam-on", SAM, True, {"adaptive": True, "eta": 0.1}, ("loss", "grad")),
        ("asam-on-nobias", SAM, True, {"adaptive": True, "normalize_bias": False}, ("grad",)),
        ("interval", IntervalSAM, True, {"k": 2}, ("loss", "grad")),
        ("looksam", LookSAM, True, {"k": 2, "alpha": 0.7}, ("loss", "grad")),
        ("looksam-all", LookSAM, False, {"k": 2, "alpha": 0.7}, ("grad",)),
        ("onepass-momentum", OnePassSAM, True, {"direction": "momentum"}, ("grad",)),
        ("onepass-grad", OnePassSAM, True, {"direction": "grad"}, ("grad",)),
        ("gsam-on", GSAM, True, {"alpha": 0.3}, ("loss", "grad")),
        ("gsam-all", GSAM, False, {"alpha": 0.3}, ("grad",)),
    ]
    for path in paths
}


def make() -> nn.Module:
    torch.manual_seed(0)
    # 9 and 3 rows split 5/4 and 2/1 over 2 ranks: uneven shards
    return nn.Sequential(
        nn.Linear(6, 9), nn.LayerNorm(9), nn.ReLU(), nn.Linear(9, 9), nn.GroupNorm(3, 9), nn.ReLU(), nn.Linear(9, 3)
    ).double()


def build(case: str, model: nn.Module) -> SAM:
    cls, on, kwargs, _ = CASES[case]
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return cls(base, model if on else None, rho=0.3, model=model, **kwargs)


def train(
    case: str, model: nn.Module, opt: SAM, x: torch.Tensor, y: torch.Tensor, holds_first_row: bool = True
) -> list[float | None]:
    """3 steps; the ascent's norm (``last_grad_norm``) after each step's ascent (None: no ascent).

    Paths "scaler" and "scaler-inf": the loss path through a GradScaler; "scaler-inf" puts an inf
    into the first element of the first gradient at step 1 (on the rank that ``holds_first_row``):
    the whole step must be skipped, on every rank."""
    path = CASES[case][3]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if path.startswith("scaler") else None

    def loss_fn() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    norms = []
    for _ in range(3):
        opt.last_grad_norm = None
        if path == "closure":
            opt.step(closure)
        elif scaler is not None:
            with opt.first_pass(model):
                loss = loss_fn()
            opt.first_step(scaler.scale(loss))
            with opt.second_pass(model):
                scaler.scale(loss_fn()).backward()
            if path == "scaler-inf" and len(norms) == 1 and holds_first_row:
                grad = next(iter(model.parameters())).grad
                (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("inf")
            opt.second_step(zero_grad=True, scaler=scaler)
            scaler.update()
        elif isinstance(opt, OnePassSAM):
            opt.first_step()
            loss_fn().backward()
            opt.second_step(zero_grad=True)
        else:
            sam_step = opt.is_sam_step
            with opt.first_pass(model):
                loss = loss_fn()
            if path == "loss":
                opt.first_step(loss)
            else:
                loss.backward()
                opt.first_step(zero_grad=sam_step)
            if sam_step:
                with opt.second_pass(model):
                    loss_fn().backward()
            opt.second_step(zero_grad=True)
        norms.append(None if opt.last_grad_norm is None else float(opt.last_grad_norm))
    return norms


def batch(world: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch, 8 examples per rank."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(8 * world, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8 * world,), generator=g)


def reference(case: str) -> dict:
    """The case on one process on the whole batch (outside torch.distributed)."""
    model = make()
    norms = train(case, model, build(case, model), *batch())
    return {"params": [p.detach().clone() for p in model.parameters()], "norms": norms}


def run(out: str, rank: int, world: int) -> None:
    """Every case under FSDP2; writes ``{out}.rank{rank}``: ``{case: result}`` or ``{"skip": why}``."""
    if fully_shard is None:
        torch.save({"skip": f"fully_shard is not available in torch {torch.__version__}"}, f"{out}.rank{rank}")
        return
    from torch.distributed.device_mesh import init_device_mesh

    meshes = {
        False: init_device_mesh("cpu", (world,)),
        True: init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard")),
    }
    x, y = batch(world)
    xs, ys = x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8]
    results: dict = {}
    for case in CASES:
        mesh = meshes["hsdp" in case]
        model = make()
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        try:
            norms = train(case, model, build(case, model), xs, ys, holds_first_row=rank == 0)
            result = {"params": [p.full_tensor().detach().clone() for p in model.parameters()], "norms": norms}
        except Exception as e:  # recorded, so that one case's failure does not hide the others'
            result = {"error": f"{type(e).__name__}: {e}"}
        results[case] = result
    results["mixed"] = mixed(meshes[False], xs, ys)
    torch.save(results, f"{out}.rank{rank}")


def mixed(mesh: object, x: torch.Tensor, y: torch.Tensor) -> str:
    """The error of a first step over sharded and plain parameters (the root and the last layer
    left out of fully_shard), as ``"Type: message"``; "" if none was raised."""
    model = make()
    for layer in list(model)[:-1]:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    opt = build("sam-grad", model)
    nn.functional.cross_entropy(model(x), y).backward()
    try:
        opt.first_step()
    except Exception as e:  # the test checks its type and message
        return f"{type(e).__name__}: {e}"
    return ""
