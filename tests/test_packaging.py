"""A built wheel carries configs/ and the demo recording, and a non-editable install finds them."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_ships_configs_and_the_demo_recording(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("cityfuse-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for cfg in (REPO / "configs").glob("*.json"):
        assert f"configs/{cfg.name}" in names
    for f in (REPO / "recordings" / "demo").rglob("*"):
        if f.is_file():
            assert f"recordings/{f.relative_to(REPO / 'recordings').as_posix()}" in names
    # Installed from the wheel alone (no source tree on the path), it finds both.
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = (
        "import json, streams.taxonomy as t, streams.recording as r;"
        "print(json.dumps([str(t.CONFIG_DIR), str(r.demo_recording()), len(t.labels())]))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path[:0] = [{str(target)!r}]; {probe}"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    config_dir, demo, n_labels = json.loads(out)
    assert Path(config_dir) == target / "configs"
    assert Path(demo) == target / "recordings" / "demo"
    assert n_labels == len(json.loads((REPO / "configs/labels.json").read_text())["labels"])
