"""docs/evidence.md: every table is what `fedkdlora-evidence` makes of the kept raw results."""

from __future__ import annotations

import json
import shutil

from fedkdlora_tools import evidence


def test_the_evidence_tables_are_regenerated_from_the_kept_results(capsys) -> None:
    assert evidence.main(["--check"]) == 0, capsys.readouterr().err
    studies = [m["study"] for m in evidence.TABLE.finditer(evidence.EVIDENCE_DOC.read_text())]
    assert "sst2-quick" in studies
    for study in studies:  # every table has its study's command and raw files
        assert evidence.Study.load(evidence.EVIDENCE_DIR / study).runs()


def test_a_table_edited_by_hand_is_stale_and_regenerating_restores_it(tmp_path, capsys) -> None:
    kept = sorted((evidence.EVIDENCE_DIR / "sst2-quick" / "runs").glob("*.json"))[:2]
    study = tmp_path / "evidence" / "mini"
    (study / "runs").mkdir(parents=True)
    for path in kept:
        shutil.copy(path, study / "runs")
    meta = {"command": "fedkdlora-compare ...", "target": 0.7, "code": "abc1234", "machine": "test"}
    (study / "study.json").write_text(json.dumps(meta))
    doc = tmp_path / "evidence.md"
    doc.write_text("# t\n\n<!-- table: mini -->\n<!-- end table -->\n\nprose\n")
    args = ["--doc", str(doc), "--evidence-dir", str(tmp_path / "evidence")]
    assert evidence.main([*args, "--check"]) == 1  # the empty table is stale
    assert evidence.main(args) == 0
    generated = doc.read_text()
    assert generated.endswith("<!-- end table -->\n\nprose\n") and "| run | rounds |" in generated
    assert f"2 runs; raw results: `{study}/runs/`. Command (code abc1234, test)" in generated
    assert evidence.main([*args, "--check"]) == 0
    row = next(line for line in generated.splitlines() if line.startswith("| fed"))
    doc.write_text(generated.replace(row, row.replace("0.", "0.9", 1)))
    capsys.readouterr()
    assert evidence.main([*args, "--check"]) == 1
    assert f"stale tables in {doc}: mini" in capsys.readouterr().err
