"""The method table (modality x method): generated from the artifacts' JSON, never by hand.

Sources, whichever exist in ``models/artifacts/``:
- ``{text,vision,speech}_methods.json``: the encoder engineers' fine-tuning rows;
- ``fusion_head.json``: head-only rows (frozen-encoder vectors + the fusion head), test;
- ``fewshot.json``: zero/few-shot rows for a label held out of training, val;
- ``crisismmd_*.json``: the CrisisMMD text task heads, dev.

Each row says which split its figure is on (val / dev / test).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.fusion import ARTIFACT_DIR, HEAD_FILE, META_FILE
from models.weights import REFIT_SUFFIX

METHOD_FILES = ("text_methods.json", "vision_methods.json", "speech_methods.json")
MODALITY_OF = {"text": "text", "vision": "image", "speech": "audio"}
HEADER = (
    "modality",
    "method",
    "split",
    "macro-F1 [95% CI]",
    "trainable params",
    "train time",
    "artifact",
    "inference",
)


def _num(v: Any) -> str:
    if isinstance(v, dict):
        if "value" in v and "lo" in v:
            return f"{v['value']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
        if "value" in v:
            return f"{v['value']:.3f}"
    if isinstance(v, int | float):
        return f"{v:.3f}"
    return str(v) if v is not None else "-"


def _first(row: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if row.get(k) is not None:
            return row[k]
    return None


def _size(row: dict[str, Any]) -> str:
    b = _first(row, "artifact_bytes", "size_bytes")
    if b is not None:
        return f"{float(b) / 1e6:.2f} MB"
    mb = _first(row, "artifact_mb", "size_mb")
    return f"{float(mb):.2f} MB" if mb is not None else str(_first(row, "artifact") or "-")


def _params(row: dict[str, Any]) -> str:
    p = _first(row, "trainable_params", "params")
    return f"{int(p):,}" if isinstance(p, int | float) else str(p or "-")


def _time(row: dict[str, Any]) -> str:
    s = _first(row, "train_seconds", "train_s", "train_time_s")
    return f"{float(s):.0f} s" if isinstance(s, int | float) else str(s or "-")


def _inference(row: dict[str, Any]) -> str:
    ms = _first(row, "inference_ms", "ms_per_item", "inference_ms_per_frame")
    if isinstance(ms, int | float):
        return f"{float(ms):.2f} ms/item"
    if isinstance(row.get("ms_per_batch32"), int | float):
        return f"{float(row['ms_per_batch32']):.0f} ms/32 texts"
    return str(_first(row, "inference") or "-")


def _rows_of(data: Any) -> list[dict[str, Any]]:
    """The row dicts of a methods file: a list, ``rows``, ``methods`` (list or dict), or a
    dict of method -> row."""
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    for key in ("rows", "methods"):
        if data.get(key):
            return _rows_of(data[key])
    return [v for v in data.values() if isinstance(v, dict) and "method" in v]


def _f1(row: dict[str, Any]) -> Any:
    direct = _first(row, "test_macro_f1", "macro_f1", "val_macro_f1")
    if direct is not None:
        return direct
    val = row.get("val")
    if isinstance(val, dict):  # vision: {"val": {"own_classifier": {"macro_f1": ...}}}
        own = val.get("own_classifier", val)
        if isinstance(own, dict):
            return own.get("macro_f1")
    return None


def engineer_rows(folder: Path) -> list[tuple[str, ...]]:
    """Rows from the encoder engineers' ``*_methods.json`` files, whatever their layout."""
    out: list[tuple[str, ...]] = []
    for name in METHOD_FILES:
        path = folder / name
        if not path.exists():
            continue
        default_mod = MODALITY_OF[name.split("_")[0]]
        data = json.loads(path.read_text())
        rows = _rows_of(data)
        test = data.get("test") if isinstance(data, dict) else None
        if isinstance(test, dict) and "macro_f1" in test:  # text: the default, scored once
            rows = [*rows, {**test, "split": "test", "served": True}]
            # Earlier defaults scored on test stay on record (each scored once, when shipped).
            for t in data.get("earlier_tests", []):
                rows.append({**t, "method": f"{t['method']} (earlier default)", "split": "test"})
        elif isinstance(test, dict) and "scores" in test:  # vision: the served artifact
            # encoder_version is "vision_<name>-<hash>"; the name says which artifact it was.
            method = str(test.get("encoder_version", "?")).removeprefix("vision_")
            method = method.rsplit("-", 1)[0]
            own = test["scores"].get("own_classifier", {})
            rows = [*rows, {**own, "method": method, "split": "test", "served": True}]
            for t in data.get("earlier_tests", []):
                earlier = str(t.get("encoder_version", "?")).removeprefix("vision_")
                earlier = earlier.rsplit("-", 1)[0]
                own = t["scores"].get("own_classifier", {})
                rows.append({**own, "method": f"{earlier} (earlier default)", "split": "test"})
        for r in rows:
            split = _first(r, "split", "scored_on") or ("test" if "test_macro_f1" in r else "val")
            method = str(_first(r, "method", "name") or "?")
            if default_mod == "image" and str(r.get("artifact", "")).startswith("vision_"):
                # The artifact names the frame input too (top-px288): rows stay distinct.
                method = Path(str(r["artifact"])).stem.removeprefix("vision_")
                method = method.removesuffix(REFIT_SUFFIX)
            if r.get("fit_on"):  # a refit of a chosen recipe: no val figure of its own
                method += f" refit on {r['fit_on']}"
                split = "-"
            if r.get("default"):
                method += " (default)"
            if r.get("served"):  # the test row of the served artifact (a refit, or the default)
                method += " (served)"
            out.append(
                (
                    str(r.get("modality", default_mod)),
                    method,
                    str(split),
                    _num(_f1(r)),
                    _params(r),
                    _time(r),
                    _size(r),
                    _inference(r),
                )
            )
    return out


def head_rows(folder: Path) -> list[tuple[str, ...]]:
    """Head-only rows: each modality through the shipped fusion head, test groups."""
    path = folder / META_FILE
    if not path.exists():
        return []
    meta = json.loads(path.read_text())
    test = meta.get("test", {})
    size = (folder / HEAD_FILE).stat().st_size if (folder / HEAD_FILE).exists() else None
    row = {
        "trainable_params": meta.get("trainable_params"),
        "train_seconds": meta.get("data", {}).get("train_seconds"),
        "artifact_bytes": size,
        "inference_ms": meta.get("head_ms_per_incident"),
    }
    encoder = meta.get("data", {}).get("text_encoder", "")
    out: list[tuple[str, ...]] = []
    for m in ("text", "image", "audio", "fused_incidents"):
        if m in test:
            method = "fusion head on encoder vectors" + (
                f" (text: {encoder})" if m == "text" else ""
            )
            out.append(
                (
                    m,
                    method,
                    "test",
                    _num(test[m]["macro_f1"]),
                    _params(row),
                    _time(row),
                    _size(row),
                    _inference(row),
                )
            )
    return out


def fewshot_rows(folder: Path) -> list[tuple[str, ...]]:
    """Zero/few-shot rows (``fewshot.json``), on val."""
    path = folder / "fewshot.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    out: list[tuple[str, ...]] = []
    for r in data["rows"]:
        method = f"few-shot k={r['k']} (new label `{data['held_out']}`; its F1 {r['label_f1']:.3f})"
        if data.get("setting"):
            method += "; " + str(data["setting"]).split(":")[0]
        out.append((r["modality"], method, "val", _num(r["macro_f1"]), "0", "-", "-", "-"))
    return out


def task_rows(folder: Path) -> list[tuple[str, ...]]:
    """CrisisMMD task-head rows (``crisismmd_*.json``), on the CrisisMMD dev split."""
    out: list[tuple[str, ...]] = []
    for path in sorted(folder.glob("crisismmd_*.json")):
        meta = json.loads(path.read_text())
        dev = meta["dev"]
        cost = {k: meta.get(k) for k in ("trainable_params", "train_seconds", "artifact_bytes")}
        reads = "the served text vector"
        if adapter := meta.get("encoder"):
            # Both tasks share the adapter; each row carries its whole cost.
            cost = {k: (v or 0) + adapter[k] for k, v in cost.items()}
            cfg = adapter["config"]
            reads = f"the CrisisMMD LoRA adapter (r={cfg['lora_r']}, {cfg['steps']} steps)"
        method = (
            f"{meta['task']} head ({meta['kind']}) on {reads}; "
            f"dev accuracy {dev['accuracy']['value']:.3f}"
        )
        row = ("text", method, "dev", _num(dev["macro_f1"]), _params(cost), _time(cost))
        out.append((*row, _size(cost), "-"))
    return out


def method_table_markdown(folder: Path = ARTIFACT_DIR) -> str:
    """The ``## Method table`` section (markdown)."""
    rows = engineer_rows(folder) + head_rows(folder) + fewshot_rows(folder) + task_rows(folder)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return (
        "## Method table\n\n"
        "Generated by `python scripts/method_table.py` from `models/artifacts/*.json`. The\n"
        "`split` column says where each figure was measured: `test` = the test groups, scored\n"
        "once per artifact; `val` = validation groups (where the encoder methods and the few-shot\n"
        "settings were chosen, so optimistic); `dev` = the CrisisMMD dev split.\n\n"
        + "\n".join(lines)
    )


README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- method-table:begin (generated by scripts/method_table.py) -->"
END = "<!-- method-table:end -->"


def update_docs(folder: Path = ARTIFACT_DIR, readme: Path = README) -> None:
    """Write the method table into the README (between the markers) and rebuild the card."""
    from models.model_card import CARD_FILE, model_card

    table = method_table_markdown(folder).replace("## Method table", "### Method table", 1)
    if readme.exists():
        _between_markers(readme, table)
    meta_path = folder / META_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if "test" in meta:  # written by the three-way trainer
            (folder / CARD_FILE).write_text(model_card(meta), encoding="utf-8")
        elif (folder / CARD_FILE).exists():  # an older head's card: refresh only the table
            _between_markers(folder / CARD_FILE, method_table_markdown(folder), append=True)


def _between_markers(path: Path, table: str, append: bool = False) -> None:
    """Replace the text between the markers (or append them with the table)."""
    text = path.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        path.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}", encoding="utf-8")
    elif append:
        path.write_text(f"{text.rstrip()}\n\n{BEGIN}\n{table}\n{END}\n", encoding="utf-8")
