"""`python -m benchmarks`: the speed and memory harness (tspd.bench), results under benchmarks/results/."""

import datetime
from pathlib import Path

from tspd.bench import main

if __name__ == "__main__":
    import sys

    stamp = datetime.date.today().isoformat()
    argv = sys.argv[1:]
    device = next((a.split("=", 1)[1] for a in argv if a.startswith("--device=")), None)
    if device is None and "--device" in argv[:-1]:
        device = argv[argv.index("--device") + 1]
    kind = "gpu" if (device or "cpu").startswith("cuda") else "cpu"
    main(default_out=Path(__file__).parent / "results" / f"{kind}-{stamp}.json")
