"""Vision encoder: EfficientNet-Lite0 (ImageNet) in timm's ``tf_efficientnet_lite0``, 1280-d pooled features."""

from __future__ import annotations

from typing import Any

import numpy as np
import timm
import torch
from PIL import Image

from models.weights import EFFNET_LITE0_SHA256, effnet_lite0_file

# The source file uses lukemelas/EfficientNet-PyTorch names. Per block (MBConv with
# expansion / depthwise-separable first block) the layers map onto timm's as follows.
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def rename_lukemelas_to_timm(src: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet state_dict to the names of a timm EfficientNet."""
    # timm nests blocks as blocks.<stage>.<index>; lukemelas numbers them flat.
    flat = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    # Blocks without an expansion conv are depthwise-separable and use other timm names.
    expanding = {int(k.split(".")[1]) for k in src if "._expand_conv." in k}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in src.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n, layer, rest = int(parts[1]), parts[2], parts[3:]
            table = _IR_BLOCK if n in expanding else _DS_BLOCK
            out[".".join([flat[n], table[layer], *rest])] = tensor
        else:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = tensor
    return out


class VisionEncoder:
    """Embeds RGB frames with EfficientNet-Lite0 (global-average-pooled 1280-d, L2-normalised)."""

    name = "efficientnet-lite0"
    dim = 1280
    size = 224

    def __init__(self) -> None:
        self.version = f"effnet-lite0-{EFFNET_LITE0_SHA256[:12]}"
        model: Any = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        src = torch.load(effnet_lite0_file(), map_location="cpu", weights_only=True)
        model.load_state_dict(rename_lukemelas_to_timm(src, model), strict=True)
        self.model: Any = model.eval()
        cfg = model.pretrained_cfg
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Resize (shorter side) and centre-crop to 224, scale to [0,1], normalise."""
        arrs = []
        for img in images:
            w, h = img.size
            scale = self.size / min(w, h)
            img = img.resize(
                (max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                Image.Resampling.BILINEAR,
            )
            w, h = img.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
            arrs.append(np.asarray(img, dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def forward(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """One forward pass: (normalised features (n,1280), ImageNet logits (n,1000))."""
        feats = self.model.forward_head(
            self.model.forward_features(self.preprocess(images)), pre_logits=True
        )
        logits = self.model.classifier(feats)
        return torch.nn.functional.normalize(feats, dim=-1).numpy(), logits.numpy()

    def encode(self, images: list[Image.Image]) -> np.ndarray:
        """(n, 1280) float32 unit vectors for a batch of frames."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.forward(images)[0].astype(np.float32)
