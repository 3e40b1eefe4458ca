"""scripts/config_reference.py --check: the CI check that docs/config_reference.md is what the config models generate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "config_reference.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("config_reference_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_passes_on_the_generated_page_and_fails_in_one_line_on_a_stale_one(tmp_path, monkeypatch, capsys):
    cr = _load_script()
    page = cr.render()
    assert "| `trainer.algo.name` |" in page and "| `env.kwargs.dataset.name` |" in page
    ref = tmp_path / "docs" / "config_reference.md"
    ref.parent.mkdir()
    monkeypatch.setattr(cr, "REFERENCE", ref)
    ref.write_text(page, encoding="utf-8")
    assert cr.main(["--check"]) == 0
    assert capsys.readouterr().err == ""
    ref.write_text(page.replace("| `trainer.algo.name` |", "| `trainer.algo.nome` |"), encoding="utf-8")
    assert cr.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of date" in err and "config_reference.py" in err
    ref.unlink()  # a missing page is stale too
    assert cr.main(["--check"]) == 1


def test_printing_writes_exactly_the_rendered_page(capsys):
    cr = _load_script()
    assert cr.main([]) == 0
    assert capsys.readouterr().out == cr.render()
