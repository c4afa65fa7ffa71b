"""Imports run one way with no circle (docs/architecture.md): the repository's graph, and the check itself."""

from __future__ import annotations

from tests.import_graph import check, cycles, imports, layer_violations


def test_the_repository_has_no_import_circle_and_imports_only_downwards():
    facts, problems = check()
    assert problems == [], "\n".join(problems)
    assert any("import circles: " in f for f in facts)


def test_the_check_sees_circles_through_functions_and_imports_that_go_up(tmp_path):
    (tmp_path / "errors.py").write_text("def f():\n    from marl.cli import main\n")
    (tmp_path / "cli.py").write_text("from marl import errors\n")
    found = imports({"marl.errors": tmp_path / "errors.py", "marl.cli": tmp_path / "cli.py"})
    up = [i for i in found if i.importer == "marl.errors"]
    assert len(up) == 1 and up[0].imported == "marl.cli" and up[0].in_function and up[0].line == 2
    assert cycles(found) == [["marl.cli", "marl.errors"]]
    assert [i.importer for i, _ in layer_violations(found)] == ["marl.errors"]
