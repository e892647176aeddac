"""`python -m benchmarks`: the speed and memory harness (tspd.bench), results under benchmarks/results/."""

from pathlib import Path

from tspd.bench import main

if __name__ == "__main__":
    main(results_dir=Path(__file__).parent / "results")
