"""Write the JSON Schema of every topic's message to docs/schemas/<name>.v<version>.json.

The alert schema is the public contract of ``city.alerts``; a test fails when the committed
files drift from the pydantic models. Usage: ``python scripts/export_schemas.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from streams.schemas import SCHEMA_VERSION
from streams.serde import TOPIC_MODELS

OUT = Path(__file__).resolve().parent.parent / "docs" / "schemas"


def schemas() -> dict[str, str]:
    """File name -> JSON text for every topic model."""
    out = {}
    for topic, model in TOPIC_MODELS.items():
        schema = model.model_json_schema()
        schema["$id"] = (
            f"https://cityfuse.example/schemas/{model.__name__.lower()}.v{SCHEMA_VERSION}.json"
        )
        schema["description"] = f"{model.__doc__.strip() if model.__doc__ else ''} Topic: {topic}."
        out[f"{model.__name__.lower()}.v{SCHEMA_VERSION}.json"] = (
            json.dumps(schema, indent=2) + "\n"
        )
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in schemas().items():
        (OUT / name).write_text(text)
        print(f"wrote docs/schemas/{name}")


if __name__ == "__main__":
    main()
