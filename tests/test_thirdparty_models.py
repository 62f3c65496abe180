"""The converters and layers on model code nobody here wrote: torchvision, timm, mmseg.

The packages come from the test extra and are imported through tests/thirdparty.py (see its
docstring: on a CPU torch, torchvision's and mmcv's compiled operators do not load). The
distributed cases train on 2 gloo ranks under DistributedDataParallel, each rank on its half
of a batch, and compare with the same model made local (``revert_sync``) and trained in one
process on the whole batch (local layers: on each half), in float64 so that the comparison
is exact to rounding. ``examples/convert_zoo.py`` runs the same kind of check on whole
models; one test runs it.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import thirdparty
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_world import DistWorld
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import syncsn

thirdparty.install()

import mmcv.ops  # noqa: E402
import mmseg.models  # noqa: E402, F401 - registers the heads
import timm  # noqa: E402
import torchvision  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from torchvision.models import detection, segmentation  # noqa: E402

import syncsn.integrations  # noqa: E402, F401 - norm_cfg names for mmseg

ROOT = Path(__file__).resolve().parents[1]


def converter_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message) for w in caught if str(w.message).startswith(("convert_", "revert_sync"))
    ]


# --- the shim ------------------------------------------------------------------------------


def brute_force_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """Greedy NMS written out with Python numbers."""

    def iou(a: list[float], b: list[float]) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
        return inter / (area - inter)

    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    kept: list[int] = []
    for i in order:
        if all(iou(boxes[i].tolist(), boxes[k].tolist()) <= threshold for k in kept):
            kept.append(i)
    return kept


def test_reference_nms_is_greedy_nms():
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(60, 2, generator=g) * 10
    boxes = torch.cat([lo, lo + 5 + torch.rand(60, 2, generator=g) * 20], dim=1)
    scores = torch.rand(60, generator=g)
    for threshold in (0.1, 0.3, 0.7):
        kept = thirdparty.reference_nms(boxes, scores, threshold)
        assert kept.dtype == torch.int64
        assert kept.tolist() == brute_force_nms(boxes, scores, threshold)
        assert 0 < len(kept) < 60
    assert thirdparty.reference_nms(boxes[:0], scores[:0], 0.5).shape == (0,)
    if "torchvision" in thirdparty.STUBBED:  # what Mask R-CNN's proposal network calls
        assert torchvision.ops.boxes.nms is thirdparty.reference_nms


def test_stubbed_mmcv_op_fails_loudly_when_used():
    if "mmcv.ops" not in thirdparty.STUBBED:
        pytest.fail("mmcv-lite (the test extra) has no compiled ops: the stub should be active")
    with pytest.raises(RuntimeError, match=r"mmcv\.ops\.RoIAlign is one of mmcv's compiled"):
        mmcv.ops.RoIAlign(7)
    from mmcv.ops.nms import batched_nms

    with pytest.raises(RuntimeError, match="batched_nms"):
        batched_nms(torch.zeros(1, 4), torch.zeros(1), torch.zeros(1), {})


# --- conversions in one process ------------------------------------------------------------


def test_timm_batchnormact_becomes_switchnorm_act_with_its_act_and_drop():
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    norm_act = {
        name: (m.act, m.drop)
        for name, m in model.named_modules()
        if type(m).__name__ == "BatchNormAct2d"
    }
    assert len(norm_act) == 49
    assert any(not isinstance(act, nn.Identity) for act, _ in norm_act.values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = syncsn.convert_switchnorm(model, init="bn")
    assert converter_warnings(caught) == []
    modules = dict(converted.named_modules())
    for name, (act, drop) in norm_act.items():
        assert type(modules[name]) is syncsn.SwitchNormAct2d, name
        assert modules[name].act is act and modules[name].drop is drop, name
    # init="bn": in eval, the BN scope dominates and the network computes what it computed.
    with torch.no_grad():
        got = converted.eval()(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3 * expected.abs().max().item())


def test_timm_convnext_has_nothing_to_convert_and_is_left_as_it_was():
    torch.manual_seed(0)
    model = timm.create_model("convnext_tiny", num_classes=5).eval()
    before = [(name, type(m)) for name, m in model.named_modules()]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = syncsn.convert_sync_switchnorm(model)
    assert converter_warnings(caught) == []
    assert [(name, type(m)) for name, m in converted.named_modules()] == before
    with torch.no_grad():
        assert torch.equal(converted(x), expected)


def pretrained_style_maskrcnn() -> nn.Module:
    """Mask R-CNN as torchvision builds it for pretrained backbone weights: the backbone's
    norms are FrozenBatchNorm2d (statistics set to non-trivial values here)."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    backbone = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    for m in backbone.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.1, 0.1)
    backbone = _resnet_fpn_extractor(backbone, 3)
    return detection.MaskRCNN(backbone, num_classes=3, min_size=64, max_size=64).eval()


def test_torchvision_frozen_batchnorm_named_or_converted_from_its_statistics():
    model = pretrained_style_maskrcnn()
    frozen = [n for n, m in model.named_modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    assert len(frozen) == 53
    with pytest.warns(UserWarning, match="FrozenBatchNorm2d") as record:
        syncsn.convert_sync_switchnorm(model)
    (message,) = converter_warnings(list(record))  # one summary for the whole call
    assert frozen[0] in message and frozen[-1] in message and "convert_frozen" in message
    assert all(
        type(m).__name__ == "FrozenBatchNorm2d" for n, m in model.named_modules() if n in frozen
    )

    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.backbone(x)
    converted = syncsn.convert_switchnorm(copy.deepcopy(model), init="bn", convert_frozen=True)
    modules = dict(converted.named_modules())
    assert {type(modules[n]) for n in frozen} == {syncsn.SwitchNorm2d}
    old = dict(model.named_modules())[frozen[0]]
    assert torch.equal(modules[frozen[0]].running_var, old.running_var)
    assert torch.equal(modules[frozen[0]].weight.detach(), old.weight)
    with torch.no_grad():
        got = converted.eval().backbone(x)
    for key in expected:
        scale = expected[key].abs().max().item()
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-3 * scale)


# --- 2 ranks under DDP against one process -------------------------------------------------

CONVERTERS = {
    "SN": syncsn.convert_switchnorm,
    "SyncSN": syncsn.convert_sync_switchnorm,
    "SyncSSN": lambda m: syncsn.convert_sync_switchnorm(m, sparse=True),
    "SyncBN": syncsn.convert_sync_batchnorm,
}
MMSEG_NORM = {"SyncSN": "SyncSN", "SyncSSN": "SyncSSN", "SyncBN": "syncsn.SyncBN"}
HEAD_CHANNELS = 16


def no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return model


def build(name: str, norm: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The converted model and the shape of one input sample."""
    if name == "deeplabv3_head":  # torchvision's ASPP: its image pooling branch is 1x1
        model = segmentation.deeplabv3.DeepLabHead(HEAD_CHANNELS, 3)
        return CONVERTERS[norm](no_dropout(model)), (HEAD_CHANNELS, 8, 8)
    if name in ("efficientnet_b0", "regnety_002"):
        return CONVERTERS[norm](timm.create_model(name, num_classes=3)), (3, 32, 32)
    head = {
        "FCNHead": dict(num_convs=2),
        "ASPPHead": dict(dilations=(1, 2, 3, 4)),  # dilation 1 and the 1x1 image pooling
        "PSPHead": dict(pool_scales=(1, 2, 3, 6)),  # pool scale 1: a 1x1 map
    }[name]
    cfg = dict(
        type=name,
        in_channels=HEAD_CHANNELS,
        channels=8,
        num_classes=3,
        dropout_ratio=0.0,
        norm_cfg=dict(type=MMSEG_NORM[norm], requires_grad=True),
        **head,
    )
    return MODELS.build(cfg), (HEAD_CHANNELS, 8, 8)


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, 3, 8, 8) logits of a head, (N, 3) of a classifier; through DDP when wrapped."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return model([x]) if type(inner).__module__.startswith("mmseg") else model(x)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = output(model, x)
    return F.cross_entropy(out, y if out.dim() == 4 else y[:, 0, 0])


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._NormBase) or "BatchNorm" in type(m).__name__


def ddp_case(rank: int, name: str, norm: str, steps: int = 2) -> dict:
    """Train on this rank's half under DDP; rank 0 also trains the local reference on the
    whole batch and checks a state-dict round trip. Returns the numbers to compare."""
    torch.manual_seed(0)
    model, sample = build(name, norm)
    model = model.double()
    world = dist.get_world_size()
    reference = syncsn.revert_sync(copy.deepcopy(model)) if rank == 0 else None
    census = sorted({type(m).__name__ for m in model.modules() if is_norm(m)})
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(2 * world, *sample, generator=g, dtype=torch.float64) * 2 + 0.5,
            torch.randint(0, 3, (2 * world, 8, 8), generator=g),
        )
        for _ in range(steps)
    ]
    losses = []
    for x, y in data:
        part = slice(2 * rank, 2 * rank + 2)
        loss = loss_of(ddp, x[part], y[part])
        opt.zero_grad()
        loss.backward()
        opt.step()
        both = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
        dist.all_gather(both, loss.detach())
        losses.append(sum(float(t) for t in both) / world)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    rank0 = flat.clone()
    dist.broadcast(rank0, 0)
    result = {"losses": losses, "rank_gap": float((flat - rank0).abs().max()), "census": census}
    if rank != 0:
        return result

    assert reference is not None
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    ref_losses = []
    for x, y in data:
        loss = loss_of(reference.train(), x, y)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        ref_losses.append(float(loss))
    result["reference_losses"] = ref_losses
    pairs = zip(model.parameters(), reference.parameters(), strict=True)
    result["param_gap"] = max(float((p - q).abs().max()) for p, q in pairs)
    # The trained state dict, loaded strictly into a freshly built model, computes the same.
    torch.manual_seed(5)
    fresh = build(name, norm)[0].double()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        x = data[0][0]
        result["round_trip_equal"] = torch.equal(output(fresh.eval(), x), output(model.eval(), x))
        # and revert_sync gives a local model that computes what the synchronized one does
        local = syncsn.revert_sync(copy.deepcopy(model)).eval()
        result["revert_gap"] = float((output(local, x) - output(model, x)).abs().max())
    return result


@pytest.fixture(scope="module")
def pair():
    w = DistWorld(2)
    yield w
    w.close()


DDP_CASES = [
    ("deeplabv3_head", "SyncSN", "SyncSwitchNorm2d"),
    ("deeplabv3_head", "SyncBN", "SyncBatchNorm"),
    ("efficientnet_b0", "SyncSSN", "SyncSparseSwitchNormAct2d"),
    ("regnety_002", "SyncSN", "SyncSwitchNormAct2d"),
    ("FCNHead", "SyncBN", "SyncBatchNorm"),
    ("ASPPHead", "SyncSN", "SyncSwitchNorm2d"),
    ("PSPHead", "SyncSSN", "SyncSparseSwitchNorm2d"),
]


@pytest.mark.parametrize("name,norm,layer", DDP_CASES, ids=[f"{n}-{c}" for n, c, _ in DDP_CASES])
def test_ddp_training_matches_one_process(pair, name, norm, layer):
    results = pair.run(ddp_case, name, norm, timeout=240)
    main = results[0]
    assert main["census"] == [layer]  # every norm layer of the model, and only this class
    assert all(r["rank_gap"] == 0.0 for r in results)  # DDP replicas stay identical
    assert all(torch.isfinite(torch.tensor(main["losses"])))
    torch.testing.assert_close(main["losses"], main["reference_losses"], rtol=1e-10, atol=0)
    assert main["param_gap"] < 1e-9
    assert main["round_trip_equal"]
    assert main["revert_gap"] < 1e-10


# --- the verified-models script ------------------------------------------------------------


def test_convert_zoo_quick_runs_and_checks(tmp_path):
    out = tmp_path / "zoo.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "convert_zoo.py"),
            "--quick",
            "--clients",
            "timm",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| timm | regnety_002 | SyncSSN |" in proc.stdout
    assert "[zoo] 1/1" in proc.stdout  # progress
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["ok"] and set(row["checks"].values()) == {"ok"}
    model = timm.create_model("regnety_002")
    norm_act = sum(type(m).__name__ == "BatchNormAct2d" for m in model.modules())
    assert row["converted"] == {"SyncSparseSwitchNormAct2d": norm_act}
    assert row["left_alone"] == {} and row["warnings"] == []
    assert row["details"]["rank_param_gap"] == 0.0
    assert row["details"]["param_gap"] < 1e-7
    assert report["versions"]["timm"] == timm.__version__
