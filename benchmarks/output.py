"""The benchmarks' results files: JSON and CSV writers, the output folder and the optional PNG plot.

Values are written as measured; a value that was not measured is ``None`` (JSON ``null``, an empty CSV
cell) or the :data:`NOT_MEASURED` string where a field needs a reason.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from env import results_folder

NOT_MEASURED = "not measured"


def clean(value: Any) -> Any:
    """Make ``value`` JSON-safe: non-finite floats become None, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(obj), indent=2, sort_keys=False) + "\n")
    return path


def write_csv(path: Path, rows: Iterable[dict[str, Any]], fields: Sequence[str]) -> Path:
    """Write ``rows`` with the columns ``fields``; None is written as an empty cell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return path


def default_out_dir(env: dict[str, Any], out: str | None) -> Path:
    """``--out`` when given (created), else ``benchmarks/results/<device>-<date>/``."""
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return results_folder(env)


def matplotlib_pyplot() -> Any | None:
    """``matplotlib.pyplot`` with the Agg backend, or None (with a printed note) when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the PNG plot (CSV/JSON are written)")
        return None
    return plt
