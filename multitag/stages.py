"""One stage by name, run on a workspace: what dvc.yaml's stage command `multitag stage NAME` runs,
and what the pipeline's Prefect tasks run in their own process once DVC decides the stage must run
(tasks/dvc.py)."""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

from multitag.config import load_params
from multitag.layout import STAGE_MODULES, Layout
from multitag.lineage import check_store_env


def run_stage(name: str, workdir: str | Path = "."):
    """Run stage ``name`` on the workspace ``workdir`` from inside it, as DVC starts the stage command
    there: params.yaml's relative paths, and the paths the stage records, are relative to it."""
    with contextlib.chdir(workdir):
        params = load_params("params.yaml")
        check_store_env(params)
        return importlib.import_module(STAGE_MODULES[name]).run(params, Layout("."))
