"""param_groups: the switch logits of SN / SSN layers in their own optimizer group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from syncsn.optim import param_groups


class FakeSwitchNorm(nn.Module):
    """Stands in for an SN / SSN layer: affine parameters plus the two switch logits."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = FakeSwitchNorm(4)
        self.block = nn.Sequential(nn.Linear(4, 4), FakeSwitchNorm(4))
        self.frozen = nn.Linear(4, 2)
        self.frozen.requires_grad_(False)
        # Shared with the block's linear layer: must be listed once.
        self.tied = self.block[0]
        # Ends with the name but is not it: stays in the default group.
        self.my_mean_weight = nn.Parameter(torch.zeros(2))


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_groups_split_switch_logits_from_the_rest():
    net = TinyNet()
    groups = param_groups(net, lr=0.1, weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["default", "switch"]
    default, switch = groups
    norms = (net.norm, net.block[1])
    assert ids(switch["params"]) == ids(
        [p for norm in norms for p in (norm.mean_weight, norm.var_weight)]
    )
    expected_default = [
        p
        for name, p in net.named_parameters()
        if p.requires_grad and name.rsplit(".", 1)[-1] not in ("mean_weight", "var_weight")
    ]
    assert ids(default["params"]) == ids(expected_default)
    assert len(default["params"]) == len(expected_default)  # the shared layer counted once
    assert id(net.my_mean_weight) in ids(default["params"])
    assert not ids(net.frozen.parameters()) & (ids(default["params"]) | ids(switch["params"]))
    assert default["lr"] == 0.1 and default["weight_decay"] == 1e-4
    assert switch["lr"] == pytest.approx(0.01) and switch["weight_decay"] == 0.0


def test_sn_convention_and_optimizer_applies_the_groups():
    net = TinyNet()
    groups = param_groups(
        net, lr=0.5, weight_decay=0.1, switch_lr_scale=1.0, switch_weight_decay=0.1
    )
    assert groups[1]["lr"] == 0.5 and groups[1]["weight_decay"] == 0.1

    net = TinyNet()
    opt = torch.optim.SGD(param_groups(net, lr=0.5, weight_decay=0.1), lr=123.0)
    for p in net.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    before_switch = net.norm.mean_weight.detach().clone()
    before_bias = net.norm.bias.detach().clone()
    opt.step()
    # SGD: p -= lr * (grad + wd * p); switch group: lr 0.05, no decay.
    torch.testing.assert_close(net.norm.mean_weight.detach(), before_switch - 0.05)
    torch.testing.assert_close(net.norm.bias.detach(), before_bias - 0.5 * (1 + 0.1 * before_bias))


def test_empty_groups_are_dropped():
    plain = nn.Linear(3, 3)
    groups = param_groups(plain, lr=1.0, weight_decay=0.0)
    assert [g["name"] for g in groups] == ["default"]
    only_switch = FakeSwitchNorm(2)
    only_switch.weight.requires_grad_(False)
    only_switch.bias.requires_grad_(False)
    assert [g["name"] for g in param_groups(only_switch, 1.0, 0.0)] == ["switch"]


def test_bad_arguments_are_rejected():
    net = TinyNet()
    with pytest.raises(TypeError, match="nn.Module"):
        param_groups([net.norm.weight], 0.1, 0.0)
    with pytest.raises(ValueError, match="lr must be finite and >= 0, got -0.1"):
        param_groups(net, -0.1, 0.0)
    with pytest.raises(ValueError, match="switch_lr_scale"):
        param_groups(net, 0.1, 0.0, switch_lr_scale=float("nan"))
    with pytest.raises(ValueError, match="switch_weight_decay"):
        param_groups(net, 0.1, 0.0, switch_weight_decay=-1.0)
    with pytest.raises(TypeError, match="weight_decay must be a number"):
        param_groups(net, 0.1, None)
