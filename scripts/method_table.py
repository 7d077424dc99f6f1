"""Regenerate the method table in README.md and models/artifacts/MODEL_CARD.md from the artifacts.

    python scripts/method_table.py

The README section between the method-table markers is replaced; the model card is rebuilt
from ``fusion_head.json`` (which also embeds the method table).
"""

from __future__ import annotations

from models.fusion import ARTIFACT_DIR
from models.method_table import README, update_docs

if __name__ == "__main__":
    update_docs()
    print(f"updated {README.name} and {ARTIFACT_DIR.name}/MODEL_CARD.md")
