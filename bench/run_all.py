"""Run the benchmarks under bench/ in turn (``./hatchw run bench:all [NAME ...] [--quick]``).

Every ``bench_*.py`` runs by default; leading names pick some (``floor`` runs bench_floor.py).
Everything from the first option on (``--quick``, ``--sizes 1,1000``) goes to each script.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    first_option = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    names, options = argv[:first_option], argv[first_option:]
    scripts = sorted(HERE.glob("bench_*.py"))
    if names:
        known = {s.stem.removeprefix("bench_"): s for s in scripts}
        unknown = [n for n in names if n not in known]
        if unknown:
            print(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}", file=sys.stderr)
            return 2
        scripts = [known[n] for n in names]
    failed = 0
    for script in scripts:
        print(f"\n## {script.name}\n", flush=True)
        failed += subprocess.run([sys.executable, str(script), *options], check=False).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
