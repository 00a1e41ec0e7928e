"""The house stays in order: the layering in `.importlinter` (docs/design.md "Layers") holds, and no module imports
itself back through others. A change that breaks either fails here, naming the import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold():
    """import-linter's own command on the repo's `.importlinter`: the spine imports downward only, stages and
    libraries never import the spine above the stage runner, no stage imports another, libraries import no stage,
    config modules import no runtime code."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    run = subprocess.run([exe, "--config", str(REPO / ".importlinter")], cwd=REPO, capture_output=True, text=True)
    report = run.stdout[run.stdout.find("Contracts"):]
    assert run.returncode == 0, report
    contracts = (REPO / ".importlinter").read_text().count("[importlinter:contract:")
    assert "BROKEN" not in report and report.count("KEPT") == contracts >= 18, report


def test_every_stage_and_stage_config_is_under_contract():
    """A stage added to `experiment.STAGES` is covered: its package has its own independence contract, it is a
    forbidden import for the libraries, and its config module is a config leaf."""
    from prefopt.experiment import STAGES

    text = (REPO / ".importlinter").read_text()
    for name, (module, _) in STAGES.items():
        package = module.rsplit(".", 1)[0]
        assert package == f"prefopt.{name}", f"stage {name!r} lives in {package}, not a folder named as the stage"
        assert f"[importlinter:contract:stage-{name}]" in text, f"no independence contract for stage {name}"
        assert f"    {package}.config\n" in text, f"{package}.config is not under the config-leaf contract"
        libs = text[text.index("[importlinter:contract:libraries-below-stages]"):]
        libs = libs[libs.index("forbidden_modules"):libs.index("\n\n")]
        assert f"    {package}\n" in libs + "\n", f"libraries may import stage {name}: add it to libraries-below-stages"


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each an import circle."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    sys.setrecursionlimit(10_000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return out


def test_no_import_circles():
    """Every import counts, inside functions too (a late import is still an arrow back up)."""
    import grimp

    graph = grimp.build_graph("prefopt")
    circles = _cycles(graph)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_circle_finder_finds_a_circle():
    """The check above could not pass by finding nothing: on a graph with a known circle it reports it."""
    import grimp

    g = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        g.add_module(m)
    g.add_import(importer="p.a", imported="p.b")
    g.add_import(importer="p.b", imported="p.a")
    g.add_import(importer="p.c", imported="p.a")
    assert _cycles(g) == [["p.a", "p.b"]]
