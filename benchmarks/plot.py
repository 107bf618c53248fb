"""Redraw docs/img/*.png from benchmarks/results/*.json (the checkout's recorded numbers).

``structenv bench NAME --out DIR`` already writes ``DIR/NAME.png`` beside the JSON; this
script is for the images in docs/: ``python benchmarks/plot.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from structenv._bench._plots import write_plot

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "img"


def main() -> int:
    for name in ("dispatch", "exec"):
        path = RESULTS / f"{name}.json"
        if path.exists():
            print(write_plot(name, json.loads(path.read_text()), OUT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
