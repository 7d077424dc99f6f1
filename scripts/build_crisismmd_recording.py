"""Build a CrisisMMD dev recording for ``cityfuse evaluate DIR --task crisismmd-...``.

Every dev tweet of the task becomes one ``city.reports.text`` event whose truth holds
``crisismmd_informative`` or ``crisismmd_humanitarian`` (humanitarian already merged to the
paper's 5 classes). Data a script rebuilds: do not commit the output. Usage:

    python scripts/build_crisismmd_recording.py --task humanitarian [--out out/crisismmd-humanitarian-dev] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

from models.crisismmd import TASKS, load_split, truth_key
from streams import topics
from streams.recording import Manifest, RecordedEvent

BASE_TS = datetime(2026, 11, 29, 8, 0, 0, tzinfo=UTC)


def build(task: str, out: Path, split: str = "dev", limit: int | None = None) -> int:
    """Write the recording; returns the number of events."""
    df = load_split(task, split)
    if limit:
        df = df.head(limit)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    events = []
    for i, row in enumerate(df.iter_rows(named=True)):
        t = 0.05 * i
        message = {
            "schema_version": 1,
            "event_id": f"crisismmd-{task}-{split}-{row['key']}",
            "ts": (BASE_TS + timedelta(seconds=t)).isoformat().replace("+00:00", "Z"),
            "text": row["text"],
            "source": "crisismmd",
            "incident_id": f"crisismmd-{row['key']}",  # one tweet = one incident
        }
        truth = {truth_key(task): row["label"], "event": row["event"]}
        events.append(RecordedEvent(t=round(t, 2), topic=topics.TEXT, message=message, truth=truth))
    manifest = Manifest(
        name=f"crisismmd-{task}-{split}",
        description=f"CrisisMMD {task} {split} split, text only, one event per tweet.",
        tasks=[f"crisismmd-{task}"],
        provenance=[
            {
                "built_by": "scripts/build_crisismmd_recording.py",
                "from": f"shared/data/text/crisismmd/task_{task}_text_img_agreed_lab_{split}.tsv",
                "origin": "firojalam/multimodal_social_media@8862149a (CrisisMMD agreed labels)",
            }
        ],
    )
    (out / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    with (out / "events.jsonl").open("w") as f:
        for e in events:
            f.write(json.dumps(e.model_dump(exclude_none=True), ensure_ascii=False) + "\n")
    return len(events)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", choices=TASKS, required=True)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None, help="Only the first N tweets.")
    args = ap.parse_args()
    out = args.out or Path("out") / f"crisismmd-{args.task}-dev"
    n = build(args.task, out, limit=args.limit)
    print(f"wrote {out}: {n} text events")


if __name__ == "__main__":
    main()
