"""Tiny models of the three families the fast profiler must handle exactly."""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2))
        self.linear = nn.Linear(16, classes)

    def forward(self, x):
        x = self.layer1(torch.relu(self.bn(self.stem(x))))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class TinyDenseNet(nn.Module):
    """Each layer's output is concatenated to everything before it."""

    def __init__(self, classes: int = 5, growth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.dense = nn.ModuleList(
            nn.Conv2d(6 + i * growth, growth, 3, padding=1) for i in range(3)
        )
        self.transition = nn.Conv2d(6 + 3 * growth, 8, 1)
        self.classifier = nn.Linear(8, classes)

    def forward(self, x):
        features = [self.stem(x)]
        for conv in self.dense:
            features.append(torch.relu(conv(torch.cat(features, 1))))
        x = torch.relu(self.transition(torch.cat(features, 1)))
        return self.classifier(x.mean(dim=(2, 3)))


class TinyMLP(nn.Module):
    """A hidden value with several consumers and a skip connection."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 32)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1)))
        a = torch.relu(self.fc2(h))
        b = torch.relu(self.fc3(h)) + a
        return self.head(torch.cat([a, b], dim=1))


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and non-trivial batch-norm statistics, eval mode."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()
