"""The quality guard of a speed run: served-path macro-F1 against the fp32 reference, and WER.

The same events are labelled by the fusion head twice, once from the naive fp32 outputs
(the reference) and once from the served outputs; the served path may lose at most
``MAX_LOST_POINTS`` of macro-F1. Whisper's word error rate is reported per voice, for
the reference transcripts and the served ones.
"""

from __future__ import annotations

from typing import Any

from benchmarks.encoders import Output, Run
from benchmarks.samples import Sample
from benchmarks.wer import wer
from models import metrics
from models.fusion import Evidence, FusionModel
from streams.schemas import Modality

MAX_LOST_POINTS = 1.0


def _labels(fusion: FusionModel, modality: Modality, outputs: list[Output | None]) -> list[str]:
    return [
        fusion.predict([Evidence(modality, o.vector, o.text_vector)]).label
        if o is not None
        else "rejected"
        for o in outputs
    ]


def f1_guard(
    fusion: FusionModel, modality: Modality, samples: list[Sample], ref: Run, srv: Run
) -> dict[str, Any]:
    """Macro-F1 (x100) of each event alone, reference vs served, and their agreement."""
    truth = [s.label for s in samples]
    r = _labels(fusion, modality, ref.outputs)
    s = _labels(fusion, modality, srv.outputs)
    ref_f1 = 100 * metrics.macro_f1(truth, r)
    srv_f1 = 100 * metrics.macro_f1(truth, s)
    return {
        "n": len(samples),
        "reference_macro_f1": ref_f1,
        "served_macro_f1": srv_f1,
        "lost_points": ref_f1 - srv_f1,
        "label_agreement": metrics.accuracy(r, s),
        "ok": ref_f1 - srv_f1 <= MAX_LOST_POINTS,
    }


def wer_per_voice(samples: list[Sample], ref: Run, srv: Run) -> dict[str, dict[str, Any]]:
    """Per voice: clips, reference WER (naive ``transcribe``) and served WER."""
    out: dict[str, dict[str, Any]] = {}
    for voice in sorted({s.group for s in samples}):
        idx = [i for i, s in enumerate(samples) if s.group == voice]

        def pairs(run: Run, idx: list[int] = idx) -> list[tuple[str, str]]:
            hyps = [run.outputs[i] for i in idx]
            return [
                (samples[i].transcript or "", (h.transcript or "") if h is not None else "")
                for i, h in zip(idx, hyps, strict=True)
            ]

        out[voice] = {
            "n": len(idx),
            "reference_wer": wer(pairs(ref)),
            "served_wer": wer(pairs(srv)),
        }
    return out
