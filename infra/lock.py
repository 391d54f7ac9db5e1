"""Write infra/requirements.lock: every package the image installs (the project's dependencies with
the `scale` extra, and setuptools to build it), pinned with the sha256 of the file pip chose, for
`pip install --require-hashes` in infra/Dockerfile. pip's own resolver picks the set (a dry run, no
install): run it on linux x86_64 with Python 3.11, as the image is, after changing pyproject.toml.

    .venv/bin/python infra/lock.py        # make lock
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "infra" / "requirements.lock"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), f"{ROOT}[scale]", "setuptools>=68"], check=True)
        chosen = json.loads(report.read_text())["install"]
    lines = []
    for item in sorted(chosen, key=lambda i: i["metadata"]["name"].lower()):
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        digest = item["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256")
        if name == "multitag":
            continue  # the project itself: copied into the image, installed without dependencies
        if not digest:
            raise SystemExit(f"{name} {version}: pip reported no sha256 for {item['download_info'].get('url')}")
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{digest}")
    LOCK.write_text("# Written by infra/lock.py (make lock) for linux x86_64, Python 3.11: do not edit.\n"
                    + "\n".join(lines) + "\n")
    print(f"{LOCK}: {len(lines)} packages")


if __name__ == "__main__":
    main()
