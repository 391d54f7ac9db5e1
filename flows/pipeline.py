"""The training pipeline as a Prefect flow: ingest -> labels -> train -> evaluate -> register,
each task running its dvc.yaml stage through DVC (unchanged stages are skipped)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

import multitag
from multitag.compute import code_digest
from multitag.config import load_params
from multitag.errors import LineageError
from multitag.layout import PIPELINE, Layout
from multitag.lineage import record_store
from tasks.dvc import push
from tasks.stages import stage_task


def run_name(kind: str):
    """A flow's run name: ``<kind>-<workspace folder>-<local time>``."""
    def name() -> str:
        workdir = Path(flow_run.parameters.get("workdir", ".")).resolve().name
        return f"{kind}-{workdir}-{datetime.now():%Y%m%d-%H%M%S}"
    return name


def describe_run(name: str, **tags: str) -> None:
    """Name this flow run after what it did and tag it (``data:3f2a1c``, ``model:v7``), so the runs
    list in the UI reads without opening each run."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        client.update_flow_run(flow_run.id, name=name,
                               tags=sorted({*run.tags, *(f"{key}:{value}" for key, value in tags.items())}))


def check_code(ws: Layout) -> None:
    """Refuse a workspace whose multitag code differs from the multitag running (a flow-run pod's
    image, built from another commit than the one its pull step cloned): DVC would record the
    workspace's code as what made the outputs while other code made them."""
    mine, theirs = Path(multitag.__file__).parent, Path(ws.root) / "multitag"
    if not theirs.is_dir() or theirs.resolve() == mine.resolve() or code_digest(theirs) == code_digest():
        return
    raise LineageError(f"the workspace's multitag code (code {code_digest(theirs)}, {theirs}) differs from the "
                       f"multitag that runs it ({multitag.__version__}, code {code_digest()}, {mine}): build the "
                       "image from the workspace's commit (infra/Dockerfile), or install this checkout "
                       "(pip install -e .)")


@flow(name="training-pipeline", flow_run_name=run_name("train"))
def training_pipeline(workdir: str = ".") -> dict:
    """Run every stage in the DVC workspace ``workdir``, then push to the DVC remote if one is set;
    returns a summary of the run."""
    ws = Layout(workdir)
    check_code(ws)
    record_store(ws, load_params(ws.params))  # $MULTITAG_STORE_URI, where DVC sees it
    out = {name: stage_task(name)(name, workdir) for name in PIPELINE}
    data, vocab, fit, metrics, reg = (out[name] for name in ("ingest", "labels", "train", "evaluate", "register"))
    pushed = push(workdir)
    t = metrics["test"]
    summary = {
        "splits": data["splits"], "rejected": data["rejected"], "labels": vocab["labels"],
        "test_map": t["map"], "micro_f1": t["micro_f1"], "macro_f1": t["macro_f1"],
        "hamming_loss": t["hamming_loss"], "subset_accuracy": t["subset_accuracy"],
        "epochs": fit["epochs_run"], "version": reg["version"], "new_version": reg["created"],
        "champion": reg["champion"], "reason": reg["reason"], "store": reg["store"],
        "previous_champion": reg["previous_champion"], "champion_map": reg["champion_map"],
        "compared_map": reg["compared_map"],
        "dvc_remote": pushed["remote"] if pushed["pushed"] else None,
        "stages_run": [name for name in PIPELINE if out[name]["ran"]],
    }
    create_markdown_artifact(key="pipeline-summary", markdown="```\n" + summary_table(summary) + "\n```",
                             description="training pipeline result")
    data_version = data["data_version"][:6]
    describe_run(f"pipeline {Path(ws.root).resolve().name} data {data_version} v{reg['version']}"
                 + (" champion" if reg["champion"] else ""), data=data_version, model=f"v{reg['version']}")
    return summary


def summary_table(s: dict, seconds: float | None = None) -> str:
    """The short table printed at the end of `multitag run` / `make demo`."""
    sp = s["splits"]
    rows = [
        ("images (train/val/test)", f"{sp['train']} / {sp['val']} / {sp['test']}"),
        ("rejected records", s["rejected"]),
        ("labels", s["labels"]),
        ("test mAP", f"{s['test_map']:.4f}"),
        ("micro-F1", f"{s['micro_f1']:.4f}"),
        ("macro-F1", f"{s['macro_f1']:.4f}"),
        ("Hamming loss", f"{s['hamming_loss']:.4f}"),
        ("subset accuracy", f"{s['subset_accuracy']:.4f}"),
        ("registered version", f"v{s['version']}" + ("" if s["new_version"] else " (already registered)")),
        ("champion", f"{'yes' if s['champion'] else 'no'} ({s['reason']})"),
        ("artifact store", s["store"]),
        ("pushed to DVC remote", s["dvc_remote"] or "no (no default remote)"),
        ("stages run", ", ".join(s["stages_run"]) or "none (all up to date)"),
    ]
    if seconds is not None:
        rows.append(("wall time", f"{seconds:.0f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
