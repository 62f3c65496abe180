"""DeepLabV3 (ASPP head) on a dilated ResNet, with a pluggable normalization layer.

Every normalization layer in the network is built by a ``norm_layer(num_channels)`` factory,
so the same architecture runs with BatchNorm, SyncBatchNorm, GroupNorm or any of the
Switchable Normalization layers. ``base_width`` scales every channel count (64 is the
standard ResNet; 16 trains on a laptop CPU in minutes).

Shapes: input (N, 3, H, W) -> logits (N, num_classes, H, W). The backbone runs at stride
``output_stride`` (8 or 16): the last one or two stages replace their stride by dilation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

NormFactory = Callable[[int], nn.Module]

# (block type, blocks per stage) of the standard ResNets.
_ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
BACKBONES = tuple(_ARCHS)


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        cin: int,
        width: int,
        stride: int,
        dilation: int,
        downsample: nn.Module | None,
        norm_layer: NormFactory,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride, dilation)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, 1, dilation)
        self.bn2 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        cin: int,
        width: int,
        stride: int,
        dilation: int,
        downsample: nn.Module | None,
        norm_layer: NormFactory,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class DilatedResNet(nn.Module):
    """ResNet trunk whose last stages trade stride for dilation.

    Input (N, 3, H, W) -> features (N, out_channels, H/os, W/os), os = ``output_stride``.
    """

    def __init__(
        self,
        arch: str,
        norm_layer: NormFactory,
        output_stride: int = 8,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if arch not in _ARCHS:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {arch!r}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        kind, layers = _ARCHS[arch]
        block = BasicBlock if kind == "basic" else Bottleneck
        # Stages 3 and 4 (OS 8) or only stage 4 (OS 16) keep the resolution and dilate.
        dilate = (False, True, True) if output_stride == 8 else (False, False, True)

        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        self._cin, self._dilation = base_width, 1
        self.layer1 = self._stage(block, base_width, layers[0], 1, False, norm_layer)
        self.layer2 = self._stage(block, base_width * 2, layers[1], 2, dilate[0], norm_layer)
        self.layer3 = self._stage(block, base_width * 4, layers[2], 2, dilate[1], norm_layer)
        self.layer4 = self._stage(block, base_width * 8, layers[3], 2, dilate[2], norm_layer)
        self.out_channels = self._cin

    def _stage(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        width: int,
        blocks: int,
        stride: int,
        dilate: bool,
        norm_layer: NormFactory,
    ) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._cin != width * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._cin, width * block.expansion, 1, stride=stride, bias=False),
                norm_layer(width * block.expansion),
            )
        # As in DeepLab: the first block of a dilated stage still uses the previous
        # dilation, so the receptive field grows smoothly.
        mods = [block(self._cin, width, stride, previous_dilation, downsample, norm_layer)]
        self._cin = width * block.expansion
        for _ in range(1, blocks):
            mods.append(block(self._cin, width, 1, self._dilation, None, norm_layer))
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three dilated 3x3 branches and an
    image-pooling branch, concatenated and projected to ``out_channels``.

    (N, cin, h, w) -> (N, out_channels, h, w).
    """

    def __init__(
        self,
        cin: int,
        out_channels: int,
        rates: Sequence[int],
        norm_layer: NormFactory,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()

        def branch(conv: nn.Conv2d) -> nn.Sequential:
            return nn.Sequential(conv, norm_layer(out_channels), nn.ReLU(inplace=True))

        self.branches = nn.ModuleList(
            [branch(nn.Conv2d(cin, out_channels, 1, bias=False))]
            + [branch(_conv3x3(cin, out_channels, 1, r)) for r in rates]
        )
        # The pooled branch works on a 1x1 map, one pooled vector per image: batch
        # statistics over two such vectors per device are noise (and Switchable Norm's IN
        # scope over one pixel, mean = x and variance 0, carries no information), so this
        # branch has a bias and no normalization.
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(cin, out_channels, 1, bias=True),
            nn.ReLU(inplace=True),
        )
        self.project = nn.Sequential(
            nn.Conv2d(out_channels * (len(rates) + 2), out_channels, 1, bias=False),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, x.shape[-2], x.shape[-1]))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3(nn.Module):
    """DeepLabV3: dilated ResNet backbone, ASPP head, bilinear upsampling to the input size.

    Args:
        num_classes: number of output classes.
        norm_layer: ``norm_layer(num_channels) -> nn.Module`` used for every normalization.
        backbone: one of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``.
        output_stride: 8 or 16; the ASPP rates are (12, 24, 36) or (6, 12, 18).
        base_width: channels of the first stage (64 in the standard ResNet).

    Shapes: (N, 3, H, W) -> (N, num_classes, H, W).
    """

    def __init__(
        self,
        num_classes: int,
        norm_layer: NormFactory,
        backbone: str = "resnet50",
        output_stride: int = 8,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        self.backbone = DilatedResNet(backbone, norm_layer, output_stride, base_width)
        head_channels = base_width * 4  # 256 for the standard width
        rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)
        self.aspp = ASPP(self.backbone.out_channels, head_channels, rates, norm_layer)
        self.head = nn.Sequential(
            _conv3x3(head_channels, head_channels),
            norm_layer(head_channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Normalization layers keep their own initialisation (weight 1, bias 0, uniform
        # switches): overriding it here would change what a given norm layer means.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = self.head(self.aspp(self.backbone(x)))
        logits = self.classifier(feats)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
