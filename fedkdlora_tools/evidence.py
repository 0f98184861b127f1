"""`fedkdlora-evidence`: the tables of docs/evidence.md, regenerated from the kept raw results.

Each study is a folder under `docs/evidence/` holding the results JSON files of one
`fedkdlora-compare` invocation (`runs/`, model folders left out) and `study.json`: the
command that produced them, the target, the code version and the machine. In
docs/evidence.md a table stands between `<!-- table: <study> -->` and `<!-- end table -->`;
this command rewrites every such table from its study's files (`--check`: only says
whether they are current), and with `--plots` redraws each study's figures beside it.
No row is written by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from fedkdlora_tools.report import (
    RunResult,
    aggregation_error_table,
    markdown_table,
    run_order,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
EVIDENCE_DIR = REPO / "docs" / "evidence"
EVIDENCE_DOC = REPO / "docs" / "evidence.md"
TABLE = re.compile(r"(<!-- table: (?P<study>[\w.-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.DOTALL)


@dataclass(frozen=True)
class Study:
    """One kept comparison: its results files and how they were produced."""

    folder: Path
    command: str
    target: float | None
    code: str
    machine: str

    @classmethod
    def load(cls, folder: Path) -> Study:
        meta = json.loads((folder / "study.json").read_text())
        return cls(folder, meta["command"], meta.get("target"), meta["code"], meta["machine"])

    def runs(self) -> list[RunResult]:
        return [RunResult.load(path) for path in sorted((self.folder / "runs").glob("*.json"))]

    def table(self) -> str:
        """The comparison table and, under it, where its rows come from."""
        runs = self.runs()
        folder = self.folder.relative_to(REPO) if self.folder.is_relative_to(REPO) else self.folder
        if not runs:
            return f"(no results in {folder}/runs yet)\n"
        source = (
            f"\n{len(runs)} runs; raw results: `{folder}/runs/`. "
            f"Command (code {self.code}, {self.machine}):\n\n    {self.command}\n"
        )
        ordered = sorted(runs, key=run_order)
        errors = aggregation_error_table(ordered)
        if errors:
            errors = (
                "\nAggregation error per round (distance from the exact mean of the updates):\n\n" + errors
            )
        return markdown_table(ordered, self.target, seconds=False) + errors + source


def render(document: str, evidence_dir: Path) -> str:
    """`document` with every table replaced by its study's current table."""

    def replace(match: re.Match) -> str:
        study = Study.load(evidence_dir / match["study"])
        return match.group(1) + study.table() + match.group(4)

    return TABLE.sub(replace, document)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedkdlora-evidence", description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=EVIDENCE_DOC, help="default docs/evidence.md")
    parser.add_argument("--evidence-dir", type=Path, default=EVIDENCE_DIR, help="the studies' folders")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale")
    parser.add_argument("--plots", action="store_true", help="also redraw each study's report and figures")
    args = parser.parse_args(argv)
    try:
        current = args.doc.read_text()
        updated = render(current, args.evidence_dir)
    except (OSError, ValueError, KeyError) as error:
        print(f"fedkdlora-evidence: {error}", file=sys.stderr)
        return 2
    if args.check:
        stale = [m["study"] for m in TABLE.finditer(current) if m.group(0) not in updated]
        if stale:
            print(f"fedkdlora-evidence: stale tables in {args.doc}: {', '.join(stale)}", file=sys.stderr)
            return 1
        print(f"fedkdlora-evidence: {len(TABLE.findall(current))} tables in {args.doc} are current")
        return 0
    args.doc.write_text(updated)
    print(f"fedkdlora-evidence: {len(TABLE.findall(updated))} tables written to {args.doc}")
    if args.plots:
        for match in TABLE.finditer(updated):
            study = Study.load(args.evidence_dir / match["study"])
            for path in write_report(study.runs(), study.folder, study.target):
                print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
