"""CrisisMMD dev scores of a candidate text artifact, without touching the shipped task heads.

Trains both task heads (the grid of ``models.crisismmd``, chosen on dev) on the vectors of
``--artifact`` and prints their dev accuracy and macro-F1. Used to measure what a text
fine-tuning recipe does to the CrisisMMD benchmark before it is proposed as the default.
Usage:

    python scripts/crisismmd_dev.py --artifact out/text/text_bitfit-mt500.safetensors [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from models import crisismmd
from models.text import FINETUNED_E5, TextEncoder
from streams.console import console


def main() -> None:
    """Parse the arguments, train both heads in a temporary folder, print a line per task."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--artifact", type=Path, required=True, help="a text_*.safetensors file")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not args.artifact.is_file():
        raise SystemExit(f"crisismmd_dev: no such artifact: {args.artifact}")
    torch.set_num_threads(args.threads)
    # An absolute path survives models/artifacts / path (pathlib keeps the right-hand root).
    encoder = TextEncoder(FINETUNED_E5, artifact=str(args.artifact.resolve()))
    with tempfile.TemporaryDirectory() as tmp:
        for task in crisismmd.TASKS:
            meta = crisismmd.train_task(task, encoder, Path(tmp))
            dev = meta["dev"]
            console.print(
                f"{encoder.version} {task}: dev accuracy {dev['accuracy']['value']:.3f}, "
                f"macro-F1 {dev['macro_f1']['value']:.3f} ({meta['kind']}, {meta['config']})"
            )


if __name__ == "__main__":
    main()
