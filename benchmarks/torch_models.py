"""PyTorch twins of medjax's benchmarked models (same layers, shapes and training-mode ops).

They exist only for the side-by-side benchmarks in this folder; medjax itself never imports torch.
"""

import torch
from torch import nn


class PaperCNN(nn.Module):
    """medjax.models.paper_cnn.PaperCNN: [conv3x3 -> BN -> ReLU -> max-pool 2] * k, dropout, dense head."""

    def __init__(
        self, num_classes, features=(16, 32, 64, 128), dense_features=128, dropout_rate=0.3, size=64
    ):
        super().__init__()
        layers, in_ch = [], 1
        for width in features:
            layers += [
                nn.Conv2d(in_ch, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width, momentum=0.1, eps=1e-5),  # torch momentum = 1 - flax momentum.
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_ch = width
        side = size // 2 ** len(features)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout_rate),
            nn.Linear(in_ch * side * side, dense_features),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout_rate),
            nn.Linear(dense_features, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, in_ch, out_ch, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision's resnet18 on 1-channel input; stem 'imagenet' (7x7/2 + max-pool 3/2) or 'small' (3x3/1)."""

    def __init__(self, num_classes, stem="imagenet", width=64):
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(1, width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        elif stem == "small":
            self.stem = nn.Sequential(
                nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            )
        else:
            raise ValueError(f"Unknown stem {stem!r}")
        blocks, in_ch = [], width
        for i in range(4):
            out_ch = width * 2**i
            for j in range(2):
                blocks.append(BasicBlock(in_ch, out_ch, 2 if i > 0 and j == 0 else 1))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
