"""dvc.yaml tells the truth: each stage declares exactly the outputs multitag/layout.py says it writes
and depends on exactly the package modules its code imports; the project's modules import each other
without cycles."""

import ast
from pathlib import Path

import yaml

from multitag.layout import PIPELINE, STAGE_MODULES, STAGE_OUTPUTS
from tests.conftest import ROOT

PACKAGES = ("multitag", "tasks", "flows")


def _module_file(name: str) -> Path | None:
    path = ROOT / (name.replace(".", "/") + ".py")
    return path if path.exists() else None


def imports_of(module: str) -> set[str]:
    """The project modules ``module`` imports, at the top or inside functions."""
    tree = ast.parse(_module_file(module).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES and _module_file(n)}
    return found - {module}


def code_deps(module: str) -> set[str]:
    """Every package file that running ``module`` may execute (its imports, transitively)."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imports_of(m)
    return {m.replace(".", "/") + ".py" for m in seen}


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def test_dvc_yaml_declares_exactly_what_each_stage_writes():
    stages = _stages()
    assert set(stages) == set(STAGE_OUTPUTS) == {"sample", *PIPELINE}
    for name, declared in STAGE_OUTPUTS.items():
        written = {kind: _paths(stages[name].get(kind)) for kind in ("outs", "metrics", "plots") if stages[name].get(kind)}
        assert written == declared, name


def test_every_stage_depends_on_exactly_the_code_it_runs():
    for name, stage in _stages().items():
        declared = {d for d in _paths(stage["deps"]) if d.startswith("multitag/")}
        needed = code_deps(STAGE_MODULES[name])
        assert declared == needed, (f"dvc.yaml stage {name!r}: code deps should be {sorted(needed)}; "
                                    f"missing {sorted(needed - declared)}, not run {sorted(declared - needed)} "
                                    "(`python -m tests.test_layout` rewrites them)")


def test_no_import_cycles_among_the_project_modules():
    modules = _project_modules()
    graph = {m: imports_of(m) for m in modules}
    state: dict[str, str] = {}

    def visit(m, path):
        state[m] = "open"
        for n in graph.get(m, ()):
            assert state.get(n) != "open", "import cycle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = "done"

    for m in modules:
        if m not in state:
            visit(m, [])


def _project_modules() -> list[str]:
    return [".".join(p.relative_to(ROOT).with_suffix("").parts) for pkg in PACKAGES
            for p in (ROOT / pkg).glob("*.py") if p.name != "__init__.py"]


# The library modules that run the train stage's function: the review trains its fold models, and tune
# its trials, with the train stage's own training (the same recipe the pipeline trains).
RUNS_ANOTHER_STAGE = {"multitag.review": {"multitag.train"}, "multitag.tune": {"multitag.train"}}
THIN_WRAPPERS = ("multitag.cli", "tasks.", "flows.")  # they call the stages, as dvc.yaml does


def test_no_library_module_reaches_up_into_a_stage_module_for_a_helper():
    """Shared helpers live below the stages (images, formats, layout, dataset ...), so editing a stage
    never reruns another stage through a helper it happened to hold."""
    stages = set(STAGE_MODULES.values())
    for m in _project_modules():
        if m.startswith(THIN_WRAPPERS):
            continue
        reached = imports_of(m) & stages - RUNS_ANOTHER_STAGE.get(m, set())
        assert not reached, f"{m} imports the stage module(s) {sorted(reached)}: move what it needs below the stages"


def test_no_stage_runs_retrain_or_flow_code():
    """The retrain flow's steps and the Prefect wrappers are in no stage's code deps: rewording a retrain
    commit message, or changing how a batch is taken in, reruns no stage."""
    for name, module in STAGE_MODULES.items():
        deps = code_deps(module)
        assert not {d for d in deps if d.startswith(("flows/", "tasks/"))}, name
        assert not deps & {"multitag/rawdata.py", "multitag/inbox.py", "multitag/drift.py", "multitag/cli.py"}, name


def _function_lengths(path: Path) -> dict[str, int]:
    return {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_commands_and_the_ingest_stage_are_short_functions():
    """A command parses its options and calls the library; ingest() calls one function per phase."""
    long = {name: n for name, n in _function_lengths(ROOT / "multitag/cli.py").items() if n >= 40}
    assert not long, f"multitag/cli.py functions of 40 lines or more: {long}"
    assert _function_lengths(ROOT / "multitag/ingest.py")["ingest"] < 40


def write_code_deps(path: Path = ROOT / "dvc.yaml") -> None:
    """Rewrite each stage's `multitag/...` deps in dvc.yaml to the computed ones (comments and the
    other lines kept)."""
    lines, out, stage = path.read_text().splitlines(), [], None
    for line in lines:
        if line.startswith("  ") and not line.startswith("   ") and line.strip().endswith(":"):
            stage = line.strip()[:-1]
        if line.strip().startswith("- multitag/"):
            if not out[-1].strip().startswith("- multitag/"):
                out += [f"      - {dep}" for dep in sorted(code_deps(STAGE_MODULES[stage]))]
            continue
        out.append(line)
    path.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    write_code_deps()
