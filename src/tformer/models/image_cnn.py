"""The vision family's convolutional baseline (`model.architecture = "cnn"`): blocks of two 3 x 3
convolutions, each with batch normalisation and ReLU, then 2 x 2 max pooling (the VGG pattern, Simonyan &
Zisserman 2015, with Ioffe & Szegedy's batch norm); global average pooling, dropout and a linear head. The
ViT's interface (images in, `VisionOutput` out), so the task, trainer, checkpoints and predictor are shared.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tformer.config import VisionConfig
from tformer.models.vit import VisionOutput, check_images


def conv_block(n_in: int, n_out: int) -> nn.Sequential:
    """(B, n_in, H, W) -> (B, n_out, H / 2, W / 2)."""
    layers: list[nn.Module] = []
    for a, b in ((n_in, n_out), (n_out, n_out)):
        layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2))


class ImageCNN(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = c = config
        if c.architecture != "cnn":
            raise ValueError(f"ImageCNN needs architecture 'cnn', got {c.architecture!r}")
        widths = (c.channels, *c.cnn_channels)
        self.blocks = nn.Sequential(*(conv_block(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)))
        self.dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(widths[-1], c.n_classes)

    def forward(self, images: Tensor, *, need_weights: bool = False) -> VisionOutput:
        """images (B, channels, image_size, image_size), normalised -> class logits (B, n_classes). No
        attention weights to return."""
        c = self.config
        if not torch.compiler.is_exporting():
            check_images(images, channels=c.channels, size=c.image_size)
        features = self.blocks(images).mean(dim=(2, 3))  # (B, channels of the last block)
        return VisionOutput(self.head(self.dropout(features)))

    @torch.no_grad()
    def probabilities(self, images: Tensor) -> Tensor:
        return torch.softmax(self.forward(images).logits.float(), dim=-1)
