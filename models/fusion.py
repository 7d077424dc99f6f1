"""The fusion head: labels an incident from any non-empty subset of text, image and audio evidence.

Late fusion. Each *input* has an expert MLP giving label logits; a hotline call feeds two
inputs (the Whisper embedding, and its transcript through the text expert, which is shared
with citizen reports). Several events of one input are averaged; the present inputs'
logits are summed with learned weights. A missing modality simply contributes nothing, so
every subset is well defined, and the per-modality share of the decision is readable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from streams.schemas import Modality
from streams.taxonomy import label_names

ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts"
HEAD_FILE = "fusion_head.safetensors"
META_FILE = "fusion_head.json"

# Input name -> expert name. The transcript shares the text expert: both are vectors of the
# text encoder. A head built with a "transcript" width also has an own residual transcript
# expert (FusionHead._transcript_logits).
INPUT_EXPERT = {"text": "text", "image": "image", "audio": "audio", "transcript": "text"}
INPUTS = tuple(INPUT_EXPERT)
# Input name -> the event modality it comes from: a call gives its embedding and transcript.
INPUT_MODALITY = {"text": "text", "image": "image", "audio": "audio", "transcript": "audio"}


class FusionHead(nn.Module):
    """Per-input experts, masked mean over events, weighted sum over inputs."""

    temperature: torch.Tensor
    prompts: torch.Tensor

    def __init__(
        self, dims: dict[str, int], n_labels: int, hidden: int = 256, dropout: float = 0.2
    ):
        super().__init__()
        self.dims = dims
        self.experts = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.Dropout(dropout / 2),
                    nn.Linear(d, hidden),
                    nn.GELU(),
                    nn.Dropout(dropout),
                    nn.Linear(hidden, n_labels),
                )
                for name, d in dims.items()
            }
        )
        if "transcript" in self.experts:  # a residual: it starts as the text expert alone
            expert = self.experts["transcript"]
            assert isinstance(expert, nn.Sequential)
            last = expert[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.input_weight = nn.Parameter(torch.ones(len(INPUTS)))
        self.bias = nn.Parameter(torch.zeros(n_labels))
        # Set by calibration (temperature scaling); 1.0 until then.
        self.register_buffer("temperature", torch.ones(()))
        # Zero-shot prior for MiniLM inputs: similarity to each label's description
        # (configs/labels.json), embedded at training time. It generalises across crisis
        # events better than a head trained on a few events alone (see the model card).
        self.register_buffer("prompts", torch.zeros(n_labels, dims["text"]))
        self.zero_shot_weight = nn.Parameter(torch.tensor(10.0))

    def input_logits(
        self, x: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Per input: (B, L) mean expert logits over its present events (zeros when absent)."""
        out = {}
        for name in INPUTS:
            if name not in x:
                continue
            if name == "transcript" and "transcript" in self.experts:
                logits = self._transcript_logits(x[name])
            else:
                logits = self.experts[INPUT_EXPERT[name]](x[name])  # (B, K, L)
            if INPUT_EXPERT[name] == "text":
                logits = logits + self.zero_shot_weight * (x[name] @ self.prompts.T)
            m = mask[name].unsqueeze(-1).to(logits.dtype)
            out[name] = (logits * m).sum(1) / m.sum(1).clamp(min=1.0)
        return out

    def experts_of(self, name: str) -> tuple[str, ...]:
        """The experts whose weights an input's logits depend on: its shared expert, and for a
        transcript the own one when the head has it."""
        own = (name,) if name == "transcript" and name in self.experts else ()
        return (INPUT_EXPERT[name], *own)

    def _transcript_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The text expert's reading of a transcript plus the own transcript expert's
        correction. The text expert is used with detached weights here: Whisper decodings
        of unseen voices are noisier than reports, and training on them pulled the text
        expert's reading of reports down (docs/crossfit.md, second study)."""
        text = self.experts["text"]
        if torch.is_grad_enabled():
            frozen = {k: v.detach() for k, v in text.named_parameters()}
            shared = torch.func.functional_call(text, frozen, (x,))
        else:  # serving: nothing to hold, and the plain call is cheaper
            shared = text(x)
        return shared + self.experts["transcript"](x)

    def forward(self, x: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]) -> torch.Tensor:
        """Uncalibrated fused logits (B, L). x[name]: (B, K, d); mask[name]: (B, K) bool."""
        per_input = self.input_logits(x, mask)
        total = self.bias.expand(next(iter(mask.values())).shape[0], -1)
        for i, name in enumerate(INPUTS):
            if name in per_input:
                present = mask[name].any(1, keepdim=True).to(total.dtype)
                total = total + present * self.input_weight[i] * per_input[name]
        return total


@dataclass
class Evidence:
    """One embedded event as the head sees it."""

    modality: Modality
    vector: np.ndarray
    text_vector: np.ndarray | None = None  # the transcript's MiniLM vector, for calls


@dataclass
class Prediction:
    """A fused, calibrated verdict."""

    label: str
    confidence: float
    probs: dict[str, float]
    contributions: dict[str, float]
    modalities: list[Modality]


class FusionModel:
    """The trained head plus its metadata; the only thing services need for labelling."""

    def __init__(self, head: FusionHead, meta: dict[str, object]) -> None:
        self.head = head.eval()
        self.meta = meta
        self.labels = label_names()
        if list(meta["labels"]) != self.labels:  # type: ignore[call-overload]
            raise ValueError(
                "fusion head was trained on another label set than configs/labels.json"
            )
        self.version = str(meta["version"])
        # Encoder version per modality the head was trained on (None for older heads); read
        # once here because the fusion door checks it for every embedding.
        data = meta.get("data")
        found = data.get("encoders") if isinstance(data, dict) else None
        self.encoders: dict[str, str] | None = (
            {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else None
        )

    @classmethod
    def load(cls, folder: Path = ARTIFACT_DIR) -> FusionModel:
        """Load ``fusion_head.safetensors`` + ``fusion_head.json`` (no pickle)."""
        meta = json.loads((folder / META_FILE).read_text())
        head = FusionHead(meta["dims"], len(meta["labels"]), meta["hidden"])
        head.load_state_dict(load_file(str(folder / HEAD_FILE)), strict=True)
        return cls(head, meta)

    @staticmethod
    def batch_inputs(
        evidence: list[Evidence],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Stack one incident's evidence into the (1, K, d) tensors the head takes."""
        groups: dict[str, list[np.ndarray]] = {}
        for ev in evidence:
            groups.setdefault(ev.modality, []).append(ev.vector)
            if ev.modality == "audio" and ev.text_vector is not None:
                groups.setdefault("transcript", []).append(ev.text_vector)
        x = {k: torch.from_numpy(np.stack(v)).float().unsqueeze(0) for k, v in groups.items()}
        mask = {k: torch.ones(1, len(v), dtype=torch.bool) for k, v in groups.items()}
        return x, mask

    @torch.inference_mode()
    def _probs(self, evidence: list[Evidence]) -> np.ndarray:
        x, mask = self.batch_inputs(evidence)
        logits = self.head(x, mask) / self.head.temperature
        return torch.softmax(logits, -1)[0].numpy()

    def predict(self, evidence: list[Evidence], explain: bool = True) -> Prediction:
        """Label an incident from its evidence (any non-empty subset of modalities).

        ``explain=False`` leaves ``contributions`` empty and skips their leave-one-out
        passes (one per modality): fusion asks for them only when it emits an alert."""
        if not evidence:
            raise ValueError("no evidence")
        probs = self._probs(evidence)
        top = int(probs.argmax())
        pred = Prediction(
            label=self.labels[top],
            confidence=float(probs[top]),
            probs={name: float(p) for name, p in zip(self.labels, probs, strict=True)},
            contributions={},
            modalities=sorted({ev.modality for ev in evidence}),
        )
        return self.explain(evidence, pred) if explain else pred

    def explain(self, evidence: list[Evidence], pred: Prediction) -> Prediction:
        """``pred`` with its per-modality contributions filled in."""
        top = self.labels.index(pred.label)
        for m in pred.modalities:
            rest = [ev for ev in evidence if ev.modality != m]
            # Leave-one-out: how much this modality moved the winning label's probability.
            pred.contributions[m] = float(
                pred.confidence - (self._probs(rest)[top] if rest else 0.0)
            )
        return pred
