"""Verified models: real torchvision, timm and mmseg models, converted, trained on 2 ranks, checked.

    python examples/convert_zoo.py                       # every installed client, 2 gloo ranks
    python examples/convert_zoo.py --quick               # one case per client (minutes)
    python examples/convert_zoo.py --only fcn_resnet50 efficientnet_b0 --conversions SyncSN
    torchrun --nproc-per-node 2 examples/convert_zoo.py --device cuda      # NCCL, one GPU a rank

For every model of every installed client (torchvision, timm, mmsegmentation) and every
conversion (SN, SyncSN, SSN and syncsn's SyncBN; for mmseg, ``norm_cfg`` SyncSN, SyncSSN and
``syncsn.SyncBN``; ``--conversions`` also takes SyncSSN for the others),
the script builds the model, converts it and checks:

- converted: the norm layers the conversion made, and the norm layers it left alone (by
  class), and how many warnings it gave;
- train: ``--steps`` SGD steps under DistributedDataParallel, every rank on its own part of
  one global batch; every loss finite;
- ranks: parameters identical on every rank after training;
- reference: the same converted model made local (``revert_sync``) and trained in one process
  gives the same losses and parameters: on the whole global batch when the layers are
  synchronized, on each rank's part separately when they are local. For Mask R-CNN, whose
  losses are not means over samples, every rank gets the same images instead and the
  reference runs them once (its sampling is seeded alike);
- state dict: a freshly built and converted model loads the trained state dict strictly and
  computes the same outputs, bit for bit;
- revert: ``revert_sync`` leaves no synchronized layer and computes the same eval outputs;
- compile: ``torch.compile(fullgraph=True)`` of the converted model in eval mode (the whole
  forward in one graph, no break) computes what eager computes (not for Mask R-CNN, whose
  forward branches on data).

Dropout is set to 0 in the models that have it, so that ranks and reference draw nothing at
random. Inputs are small (64x64 images, 2 a rank) so a full run takes minutes on CPU.

Where a client's compiled operators cannot load (torchvision's PyPI wheel next to a CPU
torch, mmseg with mmcv-lite), the models are imported through ``tests/thirdparty.py``, which
skips those operators' registration and changes nothing where they load; the table header
says what it replaced. Prints progress, a markdown table, and writes ``--json``. Exits 1 when
any check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import json
import math
import os
import platform
import socket
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel

import syncsn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import thirdparty  # noqa: E402

SIZE = 64  # image side
PER_RANK = 2  # images per rank and step
NUM_CLASSES = 5
LR = 0.01
MARK = "syncsn-convert-zoo"  # marks the JSON files this script writes

Batch = tuple[Sequence[Any], ...]  # leading dimension = samples

# --- conversions ---------------------------------------------------------------------------

CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "SN": lambda m: syncsn.convert_switchnorm(m),
    "SyncSN": lambda m: syncsn.convert_sync_switchnorm(m),
    "SSN": lambda m: syncsn.convert_switchnorm(m, sparse=True),
    "SyncSSN": lambda m: syncsn.convert_sync_switchnorm(m, sparse=True),
    "SyncBN": lambda m: syncsn.convert_sync_batchnorm(m),
}
# What the table runs for torchvision and timm (--conversions picks others).
CONVERSIONS = ("SN", "SyncSN", "SSN", "SyncBN")
# mmseg builds the layers itself from norm_cfg.
MMSEG_NORMS = {"SyncSN": "SyncSN", "SyncSSN": "SyncSSN", "SyncBN": "syncsn.SyncBN"}

SYNCHRONIZED = (
    syncsn.SyncBatchNorm,
    nn.SyncBatchNorm,
    syncsn.SyncSwitchNorm1d,
    syncsn.SyncSwitchNorm2d,
    syncsn.SyncSwitchNorm3d,
    syncsn.SyncSparseSwitchNorm1d,
    syncsn.SyncSparseSwitchNorm2d,
    syncsn.SyncSparseSwitchNorm3d,
)  # and their subclasses: the norm-act layers


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (_NormBase, nn.LayerNorm, nn.GroupNorm)) or (
        "BatchNorm" in type(module).__name__  # FrozenBatchNorm2d: no torch base class
    )


def norm_census(model: nn.Module) -> Counter[str]:
    return Counter(type(m).__name__ for m in model.modules() if is_norm(m))


def is_syncsn(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "syncsn"


def no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return model


# --- cases ---------------------------------------------------------------------------------


@dataclass
class Case:
    """One model: how to build it converted, its data, its loss and its eval output."""

    client: str
    name: str
    build: Callable[[str], nn.Module]  # conversion -> converted model (seeded by the caller)
    batch: Callable[[int, int], Batch]  # (seed, samples) -> batch
    loss: Callable[[nn.Module, Batch], Tensor]
    output: Callable[[nn.Module, Batch], Tensor]  # eval mode, for the comparisons
    conversions: tuple[str, ...]
    split: bool = True  # ranks take parts of the global batch (False: all the same batch)
    compiles: bool = True
    quick: str | None = None  # the conversion --quick runs, if any
    note: str = ""


def image_batch(seed: int, n: int, dense: bool) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    shape = (n, SIZE, SIZE) if dense else (n,)
    return x, torch.randint(0, NUM_CLASSES, shape, generator=g)


def torchvision_cases() -> list[Case]:
    tv = thirdparty.import_module("torchvision")
    from torchvision.models import detection, segmentation

    def seg(fn: Callable[..., nn.Module]) -> Callable[[str], nn.Module]:
        def build(conversion: str) -> nn.Module:
            model = fn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
            return CONVERTERS[conversion](no_dropout(model))

        return build

    def seg_loss(model: nn.Module, b: Batch) -> Tensor:
        return F.cross_entropy(model(b[0])["out"], b[1])

    def seg_out(model: nn.Module, b: Batch) -> Tensor:
        return model(b[0])["out"]

    def maskrcnn(conversion: str) -> nn.Module:
        model = detection.maskrcnn_resnet50_fpn(
            weights=None,
            weights_backbone=None,
            num_classes=3,
            min_size=SIZE,
            max_size=SIZE,
            # Few proposals and sampled boxes: without torchvision's C++ ops, roi_align runs
            # in plain torch.
            rpn_pre_nms_top_n_train=200,
            rpn_post_nms_top_n_train=64,
            rpn_pre_nms_top_n_test=200,
            rpn_post_nms_top_n_test=64,
            box_batch_size_per_image=32,
            box_score_thresh=0.0,  # detections to compare, even from an untrained model
        )
        return CONVERTERS[conversion](model)

    def det_batch(seed: int, n: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        images, targets = [], []
        for _ in range(n):
            lo = torch.randint(0, SIZE // 2, (2,), generator=g).float()
            hi = lo + SIZE // 4 + torch.randint(0, SIZE // 4, (2,), generator=g).float()
            masks = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
            masks[0, int(lo[1]) : int(hi[1]), int(lo[0]) : int(hi[0])] = 1
            images.append(torch.rand(3, SIZE, SIZE, generator=g))
            targets.append(
                {"boxes": torch.cat([lo, hi])[None], "labels": torch.tensor([1]), "masks": masks}
            )
        return images, targets

    def det_loss(model: nn.Module, b: Batch) -> Tensor:
        torch.manual_seed(0)  # the proposal sampling, alike on every rank and the reference
        return sum(model(list(b[0]), list(b[1])).values())  # type: ignore[return-value]

    def det_out(model: nn.Module, b: Batch) -> Tensor:
        images = list(b[0][:1])
        features = model.backbone(model.transform(images)[0].tensors).values()
        (det,) = model(images)
        outputs = [*features, det["boxes"], det["scores"], det["masks"]]
        return torch.cat([t.flatten() for t in outputs])

    del tv
    return [
        Case(
            "torchvision",
            "fcn_resnet50",
            seg(segmentation.fcn_resnet50),
            lambda s, n: image_batch(s, n, dense=True),
            seg_loss,
            seg_out,
            CONVERSIONS,
            quick="SyncSN",
        ),
        Case(
            "torchvision",
            "deeplabv3_resnet50",
            seg(segmentation.deeplabv3_resnet50),
            lambda s, n: image_batch(s, n, dense=True),
            seg_loss,
            seg_out,
            CONVERSIONS,
            note="ASPP image pooling normalizes 1x1 maps",
        ),
        Case(
            "torchvision",
            "maskrcnn_resnet50_fpn",
            maskrcnn,
            det_batch,
            det_loss,
            det_out,
            ("SyncSN", "SyncBN"),
            split=False,
            compiles=False,
            note="same images on every rank (see above); compile n/a: data-dependent forward",
        ),
    ]


def timm_cases() -> list[Case]:
    timm = thirdparty.import_module("timm")

    def build(name: str) -> Callable[[str], nn.Module]:
        def fn(conversion: str) -> nn.Module:
            model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
            return CONVERTERS[conversion](no_dropout(model))

        return fn

    def loss(model: nn.Module, b: Batch) -> Tensor:
        return F.cross_entropy(model(b[0]), b[1])

    def out(model: nn.Module, b: Batch) -> Tensor:
        return model(b[0])

    notes = {
        "efficientnet_b0": "timm BatchNormAct2d",
        "regnety_002": "timm BatchNormAct2d",
        "convnext_tiny": "LayerNorm only: nothing to convert",
    }
    return [
        Case(
            "timm",
            name,
            build(name),
            lambda s, n: image_batch(s, n, dense=False),
            loss,
            out,
            ("SyncSN",) if name == "convnext_tiny" else CONVERSIONS,
            quick="SyncSSN" if name == "regnety_002" else None,
            note=notes.get(name, ""),
        )
        for name in ("resnet50", "efficientnet_b0", "regnety_002", "convnext_tiny")
    ]


def mmseg_cases() -> list[Case]:
    thirdparty.install()
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    import syncsn.integrations  # noqa: F401 - registers the norm_cfg names

    register_all_modules(init_default_scope=False)
    heads = {
        "FCN": dict(type="FCNHead", num_convs=2, concat_input=True),
        "DeepLabV3": dict(type="ASPPHead", dilations=(1, 12, 24, 36)),
        "PSPNet": dict(type="PSPHead", pool_scales=(1, 2, 3, 6)),
    }

    def build(head: dict[str, Any]) -> Callable[[str], nn.Module]:
        def fn(conversion: str) -> nn.Module:
            # mmseg's {fcn,deeplabv3,pspnet}_r50-d8 configs, without dropout or auxiliary head.
            norm_cfg = dict(type=MMSEG_NORMS[conversion], requires_grad=True)
            cfg = dict(
                type="EncoderDecoder",
                backbone=dict(
                    type="ResNetV1c",
                    depth=50,
                    num_stages=4,
                    out_indices=(0, 1, 2, 3),
                    dilations=(1, 1, 2, 4),
                    strides=(1, 2, 1, 1),
                    norm_cfg=norm_cfg,
                    norm_eval=False,
                    style="pytorch",
                    contract_dilation=True,
                ),
                decode_head=dict(
                    **head,
                    in_channels=2048,
                    in_index=3,
                    channels=512,
                    dropout_ratio=0.0,
                    num_classes=NUM_CLASSES,
                    norm_cfg=norm_cfg,
                    align_corners=False,
                    loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                ),
                train_cfg=dict(),
                test_cfg=dict(mode="whole"),
            )
            return MODELS.build(cfg)

        return fn

    def batch(seed: int, n: int) -> Batch:
        x, y = image_batch(seed, n, dense=True)
        samples = []
        for label in y:
            sample = SegDataSample(metainfo={"img_shape": (SIZE, SIZE), "pad_shape": (SIZE, SIZE)})
            sample.gt_sem_seg = PixelData(data=label[None])
            samples.append(sample)
        return x, samples

    def loss(model: nn.Module, b: Batch) -> Tensor:
        losses = model(b[0], list(b[1]), mode="loss")
        module = model.module if isinstance(model, DistributedDataParallel) else model
        return module.parse_losses(losses)[0]

    def out(model: nn.Module, b: Batch) -> Tensor:
        return model(b[0], mode="tensor")

    return [
        Case(
            "mmseg",
            name,
            build(head),
            batch,
            loss,
            out,
            tuple(MMSEG_NORMS),
            quick="SyncSN" if name == "FCN" else None,
            note=f"{head['type']}, norm_cfg type "
            + "/".join(MMSEG_NORMS.values())
            + ("; pool scale 1 is a 1x1 map" if name == "PSPNet" else ""),
        )
        for name, head in heads.items()
    ]


CLIENTS: dict[str, tuple[tuple[str, ...], Callable[[], list[Case]]]] = {
    # client: (the packages it needs, its cases)
    "torchvision": (("torchvision",), torchvision_cases),
    "timm": (("timm", "torchvision"), timm_cases),
    "mmseg": (("mmseg", "mmengine", "mmcv"), mmseg_cases),
}


# --- one case on every rank ----------------------------------------------------------------


PASSED = ("ok", "n/a", "skipped")  # check outcomes that are not failures


@dataclass
class Result:
    client: str
    model: str
    conversion: str
    note: str = ""
    converted: dict[str, int] = field(default_factory=dict)
    left_alone: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # global loss at each step
    reference_losses: list[float] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)  # check -> "ok" / "n/a" / why not
    details: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(v in PASSED for v in self.checks.values())

    @property
    def skipped(self) -> list[str]:
        """The checks that were not run (``--no-compile``)."""
        return [check for check, outcome in self.checks.items() if outcome == "skipped"]


def seeded(fn: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return fn()


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


def move(b: Batch, device: torch.device, dtype: torch.dtype) -> Batch:
    def to(v: Any) -> Any:
        if isinstance(v, Tensor):
            return v.to(device, dtype) if v.is_floating_point() else v.to(device)
        if isinstance(v, dict):
            return {k: to(t) for k, t in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(to(t) for t in v)
        return v.to(device) if hasattr(v, "to") else v

    return tuple(to(part) for part in b)


def take(b: Batch, lo: int, hi: int) -> Batch:
    return tuple(part[lo:hi] for part in b)


def close(a: float, b: float, rtol: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rtol * max(1.0, abs(b))


def run_case(case: Case, conversion: str, args: argparse.Namespace) -> Result:
    """Run on every rank; the returned result is complete on rank 0."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu")
    dtype = getattr(torch, args.dtype)
    res = Result(case.client, case.name, conversion, note=case.note)
    start = time.perf_counter()

    def build() -> nn.Module:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = case.build(conversion)
        res.warnings = [str(w.message).splitlines()[0] for w in caught if is_convert_warning(w)]
        return model.to(device, dtype)

    # --- build and convert (the same weights on every rank) ---
    # The reference runs on the last rank while rank 0 checks the state dict, revert, compile.
    reference_rank = world - 1
    with agreement("build", args.verbose):
        model = seeded(build, 0)
        census = norm_census(model)
        res.converted = {k: v for k, v in census.items() if k in syncsn_classes(model)}
        res.left_alone = {k: v for k, v in census.items() if k not in res.converted}
        reference = syncsn.revert_sync(copy.deepcopy(model)) if rank == reference_rank else None
        synchronized = any(isinstance(m, SYNCHRONIZED) for m in model.modules())

    # --- train under DDP ---
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.index is not None else None
    )
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    n = PER_RANK * world if case.split else PER_RANK
    batches = [case.batch(100 + step, n) for step in range(args.steps)]
    model.train()
    spreads = []
    for b in batches:
        part = take(b, rank * PER_RANK, (rank + 1) * PER_RANK) if case.split else b
        loss = case.loss(ddp, move(part, device, dtype))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses = [torch.zeros(1, device=device, dtype=dtype) for _ in range(world)]
        dist.all_gather(losses, loss.detach().reshape(1))
        step_losses = [float(t) for t in losses]
        res.losses.append(sum(step_losses) / world if case.split else step_losses[0])
        spreads.append(max(step_losses) - min(step_losses))
    res.checks["finite"] = "ok" if all(map(math.isfinite, res.losses)) else "non-finite loss"
    if not case.split:  # the same images on every rank: the same losses
        res.details["rank_loss_spread"] = max(spreads)
        if not max(spreads) <= 1e-5 * max(1.0, abs(res.losses[0])):
            res.checks["finite"] = f"ranks' losses differ by {max(spreads):.2e} on the same images"

    # --- identical replicas ---
    mine = flat_params(model).to(device)
    theirs = mine.clone()
    dist.broadcast(theirs, 0)
    gap = (mine - theirs).abs().max().reshape(1)
    dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    res.details["rank_param_gap"] = float(gap)
    res.checks["ranks"] = "ok" if float(gap) == 0.0 else f"parameters differ by {float(gap):.2e}"

    if rank == reference_rank:
        assert reference is not None
        local_checks(case, conversion, args, res, model, reference, batches, synchronized)
    if rank == 0:
        local_checks(case, conversion, args, res, model, None, batches, synchronized)
    found: list[Any] = [None] * world
    dist.all_gather_object(found, (res.checks, res.details, res.reference_losses))
    for checks, details, reference_losses in found:
        res.checks.update(checks)
        res.details.update(details)
        res.reference_losses = res.reference_losses or reference_losses
    res.seconds = time.perf_counter() - start
    return res


@contextlib.contextmanager
def agreement(phase: str, verbose: bool) -> Iterator[None]:
    """Run a phase without collectives; if it fails on any rank, raise on every rank (a rank
    that went on alone would pair its collectives with another case's and hang)."""
    error = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - passed to every rank
        error = f"{type(exc).__name__}: {exc}"
        if verbose:
            print(f"[zoo] rank {dist.get_rank()}: {traceback.format_exc()}", flush=True)
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        rank, first = failed[0]
        raise RuntimeError(f"{phase} failed on rank {rank}: {first}")


def local_checks(
    case: Case,
    conversion: str,
    args: argparse.Namespace,
    res: Result,
    model: nn.Module,
    reference: nn.Module | None,
    batches: list[Batch],
    synchronized: bool,
) -> None:
    """With ``reference``: the check against it; else the state dict, revert and compile."""
    world = dist.get_world_size()
    some = next(model.parameters())
    device, dtype = some.device, some.dtype
    # float32 rounding, amplified by the BatchNorm layers of a randomly initialized deep
    # network, moves some float32 gradients by up to 10%: parameters are compared in float64.
    exact = dtype == torch.float64

    def attempt(name: str, fn: Callable[[], str]) -> None:
        try:
            res.checks[name] = fn()
        except Exception as exc:  # noqa: BLE001 - reported in the table
            res.checks[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            if args.verbose:
                traceback.print_exc()

    def check_reference() -> str:
        assert reference is not None
        opt = torch.optim.SGD(reference.parameters(), lr=LR)
        reference.train()
        for b in batches:
            if not case.split:
                parts = [b]
            elif synchronized:
                parts = [b]  # synchronized layers: the global batch at once
            else:
                parts = [take(b, r * PER_RANK, (r + 1) * PER_RANK) for r in range(world)]
            opt.zero_grad(set_to_none=True)
            total = sum(case.loss(reference, move(p, device, dtype)) for p in parts) / len(parts)
            total.backward()  # type: ignore[union-attr]
            opt.step()
            res.reference_losses.append(float(total.detach()))  # type: ignore[union-attr]
        gaps = [abs(a - b) for a, b in zip(res.losses, res.reference_losses, strict=True)]
        res.details["loss_gap"] = max(gaps)
        rtol = 1e-9 if exact else 1e-4
        pairs = zip(res.losses, res.reference_losses, strict=True)
        if not all(close(a, b, rtol) for a, b in pairs):
            return f"losses {fmt(res.losses)} vs reference {fmt(res.reference_losses)}"
        worst, name = max(
            (param_gap(p, q), n)
            for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True)
        )
        res.details["param_gap"] = worst
        if exact and worst > 1e-7:
            return f"parameter {name} differs by {worst:.2e} (relative)"
        return "ok"

    probe = move(batches[0], device, dtype)

    def check_state_dict() -> str:
        fresh = seeded(lambda: case.build(conversion), 1).to(device, dtype)
        state = model.state_dict()
        fresh.load_state_dict(state, strict=True)
        unequal = [k for k, v in fresh.state_dict().items() if not torch.equal(v, state[k])]
        if unequal:
            return f"{len(unequal)} tensors differ after loading, e.g. {unequal[0]}"
        with torch.no_grad():
            same = torch.equal(case.output(fresh.eval(), probe), case.output(model.eval(), probe))
        return "ok" if same else "outputs differ after loading"

    def check_revert() -> str:
        local = syncsn.revert_sync(copy.deepcopy(model)).eval()
        left = [type(m).__name__ for m in local.modules() if isinstance(m, SYNCHRONIZED)]
        if left:
            return f"{len(left)} synchronized layers left, e.g. {left[0]}"
        with torch.no_grad():
            a, b = case.output(local, probe), case.output(model.eval(), probe)
        res.details["revert_gap"] = float((a - b).abs().max()) if a.numel() else 0.0
        tol = 1e-10 if exact else 1e-5
        return "ok" if torch.allclose(a, b, rtol=tol, atol=tol) else "outputs differ"

    def check_compile() -> str:
        if args.no_compile:
            return "skipped"
        if not case.compiles:
            return "n/a"
        torch._dynamo.reset()
        model.eval()
        compiled = torch.compile(
            lambda b: case.output(model, b), fullgraph=True, backend=args.compile_backend
        )
        with torch.no_grad():
            a, b = compiled(probe), case.output(model, probe)
        res.details["compile_gap"] = float((a - b).abs().max())
        tol = 1e-10 if exact else 1e-4
        return "ok" if torch.allclose(a, b, rtol=tol, atol=tol) else "outputs differ"

    if reference is not None:
        attempt("reference", check_reference)
    else:
        attempt("state_dict", check_state_dict)
        attempt("revert", check_revert)
        attempt("compile", check_compile)


def is_convert_warning(w: warnings.WarningMessage) -> bool:
    return issubclass(w.category, UserWarning) and str(w.message).startswith(
        ("convert_", "revert_sync")
    )


def syncsn_classes(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if is_norm(m) and is_syncsn(m)}


def param_gap(p: Tensor, q: Tensor) -> float:
    """Largest difference between two parameter tensors, relative to the tensor's scale."""
    return float((p - q).abs().max() / (p.abs().max() + 1e-3))


def fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


# --- the world -----------------------------------------------------------------------------


def select(args: argparse.Namespace, log: Callable[[str], None]) -> list[tuple[Case, str]]:
    plan = []
    for client, (packages, make) in CLIENTS.items():
        if args.clients and client not in args.clients:
            continue
        missing = [p for p in packages if importlib.util.find_spec(p) is None]
        if missing:
            log(f"{client}: not installed ({', '.join(missing)} missing), skipped")
            continue
        for case in make():
            if args.only and case.name not in args.only:
                continue
            if args.quick:
                conversions: tuple[str, ...] = (case.quick,) if case.quick else ()
            else:
                conversions = tuple(
                    c for c in case.conversions if not args.conversions or c in args.conversions
                )
            plan += [(case, c) for c in conversions]
    return plan


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "nccl" if args.device == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}" if port else "env://",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=args.timeout),
    )
    try:
        main_loop(rank, args)
    finally:
        dist.destroy_process_group()


def main_loop(rank: int, args: argparse.Namespace) -> None:
    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    warnings.filterwarnings("ignore", module="mmengine|mmseg|torchvision|timm")
    plan = select(args, log)
    log(f"[zoo] {len(plan)} cases on {dist.get_world_size()} {args.device} ranks")
    results: list[Result] = []
    start = time.perf_counter()
    for i, (case, conversion) in enumerate(plan, 1):
        log(f"[zoo] {i}/{len(plan)} {case.client} {case.name} {conversion} ...")
        try:
            res = run_case(case, conversion, args)
        except Exception as exc:  # noqa: BLE001 - both ranks fail alike (same code, data)
            res = Result(case.client, case.name, conversion, note=case.note)
            res.checks["run"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            if args.verbose:
                print(f"[zoo] rank {rank}: {traceback.format_exc()}", flush=True)
        results.append(res)
        verdict = (
            "ok"
            if res.ok
            else "FAILED: "
            + "; ".join(f"{k}: {v}" for k, v in res.checks.items() if v not in PASSED)
        )
        elapsed = time.perf_counter() - start
        log(f"[zoo] {i}/{len(plan)} {verdict} ({res.seconds:.1f} s, {elapsed:.0f} s in all)")
    if rank == 0:
        report(results, args)
        if not all(r.ok for r in results):
            sys.exit(1)


def versions() -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "syncsn": syncsn.__version__,
    }
    for name in ("torchvision", "timm", "mmseg", "mmcv", "mmengine"):
        if name in sys.modules:
            out[name] = getattr(sys.modules[name], "__version__", "?")
    return out


def report(results: list[Result], args: argparse.Namespace) -> None:
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python examples/convert_zoo.py " + " ".join(sys.argv[1:]),
        "ranks": args.ranks,
        "device": args.device,
        "dtype": args.dtype,
        "versions": versions(),
        "shim": dict(thirdparty.STUBBED),
    }
    print(markdown(results, meta))
    if args.json:
        write_json(Path(args.json), meta, results)
        print(f"[zoo] wrote {args.json}")


COLUMNS = (
    "client",
    "model",
    "conversion",
    "converted",
    "left alone",
    "warnings",
    "train losses",
    "ranks",
    "reference",
    "state dict",
    "revert",
    "compile",
)


def markdown(results: list[Result], meta: dict[str, Any]) -> str:
    setting = f"{meta['ranks']} {meta['device']} ranks, DDP, {meta['dtype']}"
    lines = [
        f"Verified {meta['date']} with `{meta['command']}` ({setting}): "
        + ", ".join(f"{k} {val}" for k, val in meta["versions"].items())
        + ".",
    ]
    if meta["shim"]:
        lines.append(
            "Imported through tests/thirdparty.py: "
            + "; ".join(f"{k}: {s}" for k, s in meta["shim"].items())
            + "."
        )
    lines += [
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    mark = {"ok": "✓", "n/a": "n/a", "skipped": "skipped"}
    for r in results:
        cells = [
            r.client,
            r.model,
            r.conversion,
            ", ".join(f"{n} {k}" for k, n in r.converted.items()) or "none",
            ", ".join(f"{n} {k}" for k, n in r.left_alone.items()) or "none",
            str(len(r.warnings)),
            fmt(r.losses) if r.losses else "—",
        ] + [
            mark.get(r.checks.get(c, "—"), "✗ " + r.checks.get(c, "—"))
            for c in ("ranks", "reference", "state_dict", "revert", "compile")
        ]
        if "run" in r.checks:
            cells[6] = "✗ " + r.checks["run"]
        elif r.checks.get("finite") != "ok":
            cells[6] = "✗ " + r.checks.get("finite", "")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = sorted({(r.model, r.note) for r in results if r.note})
    if notes:
        lines += [""] + [f"- {m}: {n}" for m, n in notes]
    lines += ["", *summary(results)]
    failed = sum(not r.ok for r in results)
    partial = sum(r.ok and bool(r.skipped) for r in results)
    lines += [
        "",
        f"{len(results) - failed - partial} of {len(results)} cases passed every check"
        + (f"; {partial} passed every check that ran, with some skipped." if partial else "."),
    ]
    return "\n".join(lines)


def verdict_mark(result: Result) -> str:
    if not result.ok:
        return "✗"
    if result.skipped:  # passed only what ran: not a ✓
        return " ".join(result.skipped) + " skipped"
    return "✓"


def summary(results: list[Result]) -> list[str]:
    """One row per model, one column per conversion: every check passed (✓), some were
    skipped and the others passed ("compile skipped"), or one failed (✗); then the legend."""
    conversions = list(dict.fromkeys(r.conversion for r in results))
    models: dict[tuple[str, str], dict[str, str]] = {}
    for r in results:
        models.setdefault((r.client, r.model), {})[r.conversion] = verdict_mark(r)
    lines = [
        "| client | model | " + " | ".join(conversions) + " |",
        "|---|---|" + "---|" * len(conversions),
    ]
    for (client, model), marks in models.items():
        cells = [marks.get(c, "") for c in conversions]
        lines.append(f"| {client} | {model} | " + " | ".join(cells) + " |")
    lines += [
        "",
        '✓: every check passed; ✗: one failed (see the table above); "compile skipped": '
        "every other check passed, torch.compile was not checked (--no-compile); empty: not "
        "part of the run.",
    ]
    return lines


def check_output(path: Path) -> None:
    """Refuse to overwrite a file this script did not write."""
    if path.exists():
        try:
            ours = json.loads(path.read_text()).get("written_by") == MARK
        except (ValueError, AttributeError, OSError):
            ours = False
        if not ours:
            raise SystemExit(
                f"--json {path}: the file exists and is not a result of this script; not "
                "overwritten (choose another path or move it)"
            )


def write_json(path: Path, meta: dict[str, Any], results: list[Result]) -> None:
    check_output(path)
    rows = [{**r.__dict__, "ok": r.ok} for r in results]
    path.write_text(json.dumps({"written_by": MARK, **meta, "results": rows}, indent=1))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one case per client (CI)")
    p.add_argument("--clients", nargs="+", choices=list(CLIENTS), help="default: all installed")
    p.add_argument("--only", nargs="+", metavar="MODEL", help="model names, e.g. fcn_resnet50 FCN")
    p.add_argument("--conversions", nargs="+", choices=list(CONVERTERS))
    p.add_argument("--ranks", type=int, default=2, help="processes to start (not with torchrun)")
    p.add_argument("--steps", type=int, default=2, help="training steps per case")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--dtype",
        choices=["float64", "float32"],
        default=None,
        help="default: float64 on CPU, where the reference comparison is then exact to 1e-9 "
        "(float32 compares losses only); float32 on CUDA",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile check")
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default: eager on CPU, which checks the whole forward is "
        "one graph without generating code; inductor on CUDA)",
    )
    p.add_argument("--json", default="convert_zoo.json", help="results file ('' for none)")
    p.add_argument(
        "--table-from",
        metavar="JSON",
        help="print the tables of an earlier run's results; run nothing",
    )
    p.add_argument("--timeout", type=float, default=900, help="collective timeout, seconds")
    p.add_argument("--verbose", action="store_true", help="print the tracebacks of failures")
    args = p.parse_args(argv)
    if args.steps < 1 or args.ranks < 1:
        p.error(f"--steps and --ranks must be at least 1, got {args.steps} and {args.ranks}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cuda" else "float64"
    if args.compile_backend is None:
        args.compile_backend = "inductor" if args.device == "cuda" else "eager"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        fields = set(Result.__dataclass_fields__)
        rows = [Result(**{k: v for k, v in r.items() if k in fields}) for r in saved["results"]]
        print(markdown(rows, saved))
        return
    if args.json:
        check_output(Path(args.json))
    if "RANK" in os.environ:  # started by torchrun
        args.ranks = int(os.environ["WORLD_SIZE"])
        worker(int(os.environ["RANK"]), args.ranks, 0, args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(worker, args=(args.ranks, port, args), nprocs=args.ranks, join=True)
    except mp.ProcessExitedException as exc:  # a failed check (rank 0 exits 1) or a crash
        sys.exit(exc.exit_code or 1)


if __name__ == "__main__":
    main()
