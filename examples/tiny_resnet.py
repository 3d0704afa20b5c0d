"""A model factory: a small residual network, as you would write your own.

A spec names it as `model.arch: "examples.tiny_resnet:build"`; prunetune calls
`build(num_classes, in_channels, image_size, **model.kwargs)`, and `model.kwargs` (here `width`
and `blocks`) may be searched like any other key.
"""

from torch import nn


class Block(nn.Module):
    """Two 3×3 convolutions with batch norm, added to the input (a 1×1 convolution where the
    width or the resolution changes): the residual add ties the channels of both branches, so
    a structured criterion prunes them together."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int = 16, blocks: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        layers, cin = [], width
        for i in range(blocks):
            cout = width * 2 ** i
            layers.append(Block(cin, cout, stride=1 if i == 0 else 2))
            cin = cout
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))


def build(num_classes: int, in_channels: int, image_size: int, width: int = 16, blocks: int = 2) -> nn.Module:
    if blocks < 1 or 2 ** (blocks - 1) > image_size:
        raise ValueError(f"blocks must be 1 … {image_size.bit_length()} for {image_size} px images (got {blocks})")
    return TinyResNet(num_classes, in_channels, width, blocks)
