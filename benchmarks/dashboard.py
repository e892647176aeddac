"""`python -m benchmarks.dashboard RUN_DIR`: time `tspd harvest` on a run, then drive the dashboard
in headless Chromium (Playwright, the system `chromium`) through REPEAT rounds of random example →
token → subcomponent → ablation, and report each interaction's time from the click to the updated
page (median, p90, max). Writes benchmarks/results/dashboard-<run>-<date>.json; with
--screenshots DIR, also the four views as PNGs (docs/dashboard.png is the prompt view).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from tspd.app.harvest import harvest
from tspd.app.server import make_server


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"n": len(values), "median_ms": round(statistics.median(ordered), 1),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 1), "max_ms": round(ordered[-1], 1)}


def drive(url: str, repeat: int, shots: Path | None) -> list[dict]:
    """Run the rounds in a fresh page; returns the page's timing log (window.tspdTimings)."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no system Chromium on PATH: apt-get install -y chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']", timeout=60000)
        if shots:
            page.screenshot(path=str(shots / "overview.png"), full_page=True)
        for i in range(repeat):
            page.click("[data-testid=tab-prompt]")
            n_timings = page.evaluate("window.tspdTimings.length")
            page.click("[data-testid=prompt-sample]")
            page.wait_for_function(f"window.tspdTimings.length > {n_timings}")
            tokens = page.locator("#tokens .tok")
            tokens.nth(-1 - i % tokens.count()).click()  # the last token first: the prediction that matters
            rows = page.locator("#heatmaps th.row")
            if shots and i == 0:
                page.screenshot(path=str(shots / "prompt.png"))
            if rows.count() == 0:
                continue
            rows.nth(i % rows.count()).click()
            page.wait_for_selector(".sub-head h2")
            if shots and i == 0:
                page.screenshot(path=str(shots / "subcomponent.png"), full_page=True)
            page.click("[data-testid=sub-ablate]")
            page.click("[data-testid=tab-ablation]")
            n_timings = page.evaluate("window.tspdTimings.length")
            page.click("[data-testid=ablation-run]")
            page.wait_for_function(f"window.tspdTimings.length > {n_timings}")
            if shots and i == 0:
                page.screenshot(path=str(shots / "ablation.png"), full_page=True)
            page.locator("#ablation-list button").first.click()  # keep one ablation per round
        timings = page.evaluate("window.tspdTimings")
        browser.close()
    return timings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--repeat", type=int, default=20, help="rounds of example/token/subcomponent/ablation")
    parser.add_argument("--no-harvest", action="store_true", help="use the run's existing dashboard.sqlite")
    parser.add_argument("--screenshots", type=Path, default=None, help="folder for PNGs of the four views")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/dashboard-<run>-<date>.json)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    result: dict = {"run": str(run), "date": datetime.date.today().isoformat(), "machine": platform.platform(),
                    "cpus": os.cpu_count(), "torch_threads_serving": 1, "command": "python -m benchmarks.dashboard " + " ".join(argv),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    if not args.no_harvest:
        t0 = time.time()
        summary = harvest(run)
        result["harvest"] = {"seconds": round(time.time() - t0, 2), "n_examples": summary["n_examples"],
                             "torch_threads": torch.get_num_threads()}
        print(f"harvest: {result['harvest']['seconds']} s for {summary['n_examples']} examples")
    torch.set_num_threads(1)  # as `tspd serve` does
    server = make_server(run, port=0)
    server.start_background()
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)
    try:
        timings = drive(server.url, args.repeat, args.screenshots)
    finally:
        server.shutdown()
        server.server_close()
    failed = [t for t in timings if not t.get("ok", True)]
    if failed:  # a fast error answer must not pass for a fast interaction
        raise SystemExit(f"{len(failed)} of {len(timings)} interactions failed (e.g. {failed[0]['action']}); "
                         "see the page's error box (--screenshots) or run the server with --verbose")
    actions = sorted({t["action"] for t in timings})
    result["interactions"] = {a: _stats([t["ms"] for t in timings if t["action"] == a]) for a in actions}
    for a, s in result["interactions"].items():
        print(f"{a:20} n={s['n']:3d} median {s['median_ms']:7.1f} ms  p90 {s['p90_ms']:7.1f}  max {s['max_ms']:7.1f}")
    out = args.out or Path(__file__).parent / "results" / f"dashboard-{run.name}-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")
    return result


if __name__ == "__main__":
    main()
