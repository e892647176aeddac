"""`python -m benchmarks`: the speed and memory harness (tspd.bench), results under benchmarks/results/."""

import datetime
from pathlib import Path

from tspd.bench import main

if __name__ == "__main__":
    stamp = datetime.date.today().isoformat()
    main(default_out=Path(__file__).parent / "results" / f"cpu-{stamp}.json")
