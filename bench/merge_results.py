"""Fold the lanes' result tars that device_run.py left in $OUT into bench/results/.

  python bench/merge_results.py /work/.device/.../files  # the folder the device tool fetched

Appends each lane's summary.json rows and ceilings to bench/results/, skipping rows already
there (same runId and case), and copies the raw logs, the profiled cases' compact traces and
the lanes' logs (call-<runId>_lane-*.log).
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def merge_rows(name: str, rows: list[dict]) -> list[dict]:
    """Append the rows not there yet; returns them."""
    path = RESULTS / name
    existing = json.loads(path.read_text()) if path.exists() else []
    seen = {(r.get("runId") or r.get("time"), r.get("case")) for r in existing}
    new = [r for r in rows if (r.get("runId") or r.get("time"), r.get("case")) not in seen]
    path.write_text(json.dumps(existing + new, indent=1) + "\n")
    return new


def main() -> int:
    fetched = Path(sys.argv[1])
    (RESULTS / "raw").mkdir(parents=True, exist_ok=True)
    run_ids = []
    for tar_path in sorted(fetched.rglob("results.tar.gz")):
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(tar_path) as tar:
            tar.extractall(tmp, filter="data")
            lane = Path(tmp) / "results"
            for name in ("summary.json", "ceilings.json"):
                if (lane / name).exists():
                    added = merge_rows(name, json.loads((lane / name).read_text()))
                    print(f"{tar_path.parent.name}: {len(added)} new rows in {name}")
                    run_ids += [r["runId"] for r in added if "runId" in r]
            for kept in [*(lane / "raw").glob("*.log"), *(lane / "raw").glob("*.trace.json.gz")]:
                shutil.copy(kept, RESULTS / "raw" / kept.name)
    # The lanes' own logs (GPU test results, skipped cases), named after the call's first new
    # run (a warm machine's lanes also carry the earlier calls' results; those are not new).
    call = min(run_ids, default="unknown")
    for log in sorted(fetched.glob("lane-*.log")):
        shutil.copy(log, RESULTS / "raw" / f"call-{call}_{log.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
