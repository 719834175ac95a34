"""Benchmark: the dashboard's job page with 10,000 metric points, from navigation to the loss chart drawn in Chromium.

Fills a job store (SQLite, as `tunesmith server` makes it) with one running job as the worker would have left it:
10,000 train steps (loss, learning rate, grad norm, tokens/s), an eval every 100 steps, one metrics event per step
and a checkpoint every 1,000. Serves the dashboard router on a loopback port (uvicorn, in this process) and opens
the job page in headless Chromium (Playwright, the system's /usr/bin/chromium), each time in a fresh browser context
(empty cache). Per run it records:

- goto → drawn: from ``page.goto`` (Python's clock) to the end of uPlot's first draw (the page's clock, the same
  machine's epoch time), the measure the target is about;
- wall: Python's clock from ``page.goto`` until Playwright sees the chart's draw marker (adds its own latency);
- drawn: the page's own ``performance.now()`` at the end of uPlot's first draw (measured from navigation start);
- api: when the job's JSON finished arriving (Resource Timing ``responseEnd``), so drawn − api is the chart's part.

Also times the JSON endpoint alone (urllib, no browser). Median of ``--runs`` (5).

Usage: PYTHONPATH=src python bench/dashboard_render.py [--points 10000] [--runs 5]
Writes bench/results/dashboard_render.json and bench/results/dashboard_render.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TARGET_S = 1.0


def fill(store, points: int) -> str:
    """One running job with ``points`` train steps; bulk inserts of the rows ``upsert_metric`` / ``add_event``
    would write one by one (10,000 single-row transactions take minutes on a shared disk, and are not measured)."""
    from sqlalchemy import insert

    from tunesmith.server.db import EventRow, MetricRow, new_id, now

    job = store.create_job(owner="local", model="local:smollm2-135m-instruct", training_file="file-bench",
                           validation_file=None, method={"type": "supervised"},
                           hyperparameters={"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1.0},
                           suffix="bench", seed=0, metadata=None)
    store.update_job(job.id, status="running")
    t = now()
    train = [{"job_id": job.id, "kind": "train", "step": s, "created_at": t,
              "values": {"loss": 2.5 * (1 + 0.05 * ((s * 7919) % 13) / 13) / (1 + s / 2000), "learning_rate": 1e-4,
                         "grad_norm": 1.0, "tokens_per_s": 150.0}} for s in range(1, points + 1)]
    evals = [{"job_id": job.id, "kind": "eval", "step": s, "created_at": t,
              "values": {"eval_loss": 2.6 / (1 + s / 2000), "eval_token_accuracy": 0.5}}
             for s in range(100, points + 1, 100)]
    events = [{"id": new_id("ft-event-"), "job_id": job.id, "seq": s, "created_at": t, "level": "info",
               "type": "metrics", "message": f"Step {s}/{points}: training loss={r['values']['loss']:.2f}",
               "data": {"step": s, "train_loss": r["values"]["loss"]}} for s, r in enumerate(train, start=1)]
    with store.engine.begin() as conn:
        conn.execute(insert(MetricRow), train + evals)
        conn.execute(insert(EventRow), events)
    for s in range(1000, points + 1, 1000):
        store.add_checkpoint(job.id, step_number=s, metrics={"step": s}, path=f"jobs/{job.id}/ckpt-{s}",
                             fine_tuned_model_checkpoint=f"ft:local:smollm2-135m-instruct:bench:{job.id}:ckpt-step-{s}")
    return job.id


def serve(app):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from fastapi import FastAPI
    from playwright.sync_api import sync_playwright

    from tunesmith.server import dashboard
    from tunesmith.server.db import connect

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        store = connect(f"sqlite:///{data_dir / 'tunesmith.db'}")
        store.upgrade()
        job_id = fill(store, args.points)
        app = FastAPI()
        app.include_router(dashboard.router(store=store, data_dir=data_dir, owner=lambda: None))
        server, url = serve(app)
        api_url = f"{url}/dashboard/api/jobs/{job_id}"

        api_s, api_bytes = [], 0
        for _ in range(args.runs):
            t0 = time.perf_counter()
            with urllib.request.urlopen(api_url) as response:
                api_bytes = len(response.read())
            api_s.append(time.perf_counter() - t0)

        runs = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            for tab in ("new", "open") * args.runs:
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                page = context.new_page()
                if tab == "open":
                    # a tab already showing this server (its renderer process running), with nothing cached: the
                    # JSON list of jobs loads no script, style or chart data
                    page.goto(f"{url}/dashboard/api/jobs")
                started = time.time()
                t0 = time.perf_counter()
                page.goto(f"{url}/jobs/{job_id}", wait_until="commit")
                page.wait_for_selector("#loss-chart[data-first-drawn-ms]", timeout=30_000)
                wall = time.perf_counter() - t0
                before_navigation = page.evaluate("performance.timeOrigin") / 1000 - started
                chart = page.locator("#loss-chart")
                # the page's clock, not Playwright's: how long after goto the draw ended, without the time Playwright
                # takes to notice it (a few hundred ms on two busy cores)
                goto_to_drawn = float(chart.get_attribute("data-first-drawn-epoch-ms")) / 1000 - started
                drawn = float(chart.get_attribute("data-first-drawn-ms")) / 1000
                points = int(chart.get_attribute("data-train-points"))
                assert points == args.points, f"the chart drew {points} train points, not {args.points}"
                api_end = page.evaluate("""(path) => performance.getEntriesByType("resource")
                    .find((e) => new URL(e.name).pathname === path).responseEnd""",
                                        f"/dashboard/api/jobs/{job_id}") / 1000
                runs.append({"tab": tab, "goto_to_drawn_s": round(goto_to_drawn, 4), "wall_s": round(wall, 4),
                             "before_navigation_s": round(before_navigation, 4), "drawn_s": round(drawn, 4),
                             "api_done_s": round(api_end, 4), "chart_s": round(drawn - api_end, 4),
                             "train_points": points, "eval_points": int(chart.get_attribute("data-eval-points"))})
                context.close()
            browser.close()
        server.should_exit = True
        store.close()

    keys = ("goto_to_drawn_s", "wall_s", "before_navigation_s", "drawn_s", "api_done_s", "chart_s")
    median = {tab: {k: round(statistics.median(r[k] for r in runs if r["tab"] == tab), 4) for k in keys}
              for tab in ("new", "open")}
    result = {"command": "PYTHONPATH=src python bench/dashboard_render.py" + (
                  f" --points {args.points}" if args.points != 10_000 else "") + (
                  f" --runs {args.runs}" if args.runs != 5 else ""),
              "points": args.points, "runs": runs, "median": median, "target_s": TARGET_S,
              "meets_target": {tab: m["goto_to_drawn_s"] <= TARGET_S for tab, m in median.items()},
              "api_alone_s": {"median": round(statistics.median(api_s), 4), "all": [round(x, 4) for x in api_s],
                              "bytes": api_bytes},
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_start": [round(x, 2) for x in load_start],
                          "load_end": [round(x, 2) for x in os.getloadavg()]},
              "chromium": Path("/usr/bin/chromium").exists()}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "dashboard_render.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "dashboard_render.md").write_text(markdown(result))
    json.dump(median, sys.stdout)
    print()


def markdown(r: dict) -> str:
    new, tab = r["median"]["new"], r["median"]["open"]
    ms = lambda x: f"{x * 1000:.0f} ms"  # noqa: E731
    lines = ["# dashboard render benchmark", "", f"Command: `{r['command']}`", "",
             f"Machine: {r['machine']['cpus']}-core CPU VM shared with other jobs, Python {r['machine']['python']}; "
             f"load average at start {r['machine']['load_start']}, at end {r['machine']['load_end']}. Headless "
             "Chromium (system package) through Playwright, a fresh browser context (empty cache) per run; the "
             "dashboard router served by uvicorn in the benchmark's process on loopback; SQLite job store.", "",
             f"A running job with {r['points']:,} train steps, {r['runs'][0]['eval_points']} eval points, one metrics "
             "event per step and a checkpoint every 1,000 steps. Two cases, alternating: the page opened in a new "
             "browser context (Chromium also starts a renderer process for it), and in a context whose tab already "
             "shows this server (the jobs JSON; nothing cached).", "",
             f"| measure (median of {len(r['runs']) // 2} each) | new context | tab already open |", "|---|---|---|",
             f"| **`page.goto` → loss chart drawn** (target ≤ {r['target_s']:.0f} s) | "
             f"**{ms(new['goto_to_drawn_s'])}** | **{ms(tab['goto_to_drawn_s'])}** |",
             f"| `page.goto` → Playwright sees the chart drawn | {ms(new['wall_s'])} | {ms(tab['wall_s'])} |",
             f"|   before navigation starts | {ms(new['before_navigation_s'])} | "
             f"{ms(tab['before_navigation_s'])} |",
             f"| page's own clock at the first draw (from navigation start) | {ms(new['drawn_s'])} | "
             f"{ms(tab['drawn_s'])} |",
             f"|   of which the job's JSON had arrived at | {ms(new['api_done_s'])} | {ms(tab['api_done_s'])} |",
             f"|   uPlot's part (JSON arrived → drawn) | {ms(new['chart_s'])} | {ms(tab['chart_s'])} |",
             f"| JSON endpoint alone (urllib, {r['api_alone_s']['bytes'] / 1024:.0f} KiB) | "
             f"{ms(r['api_alone_s']['median'])} | |", "",
             "Runs (case: goto → drawn / Playwright wall / JSON arrived, ms): " + "; ".join(
                 f"{x['tab']}: {x['goto_to_drawn_s'] * 1000:.0f} / {x['wall_s'] * 1000:.0f} / "
                 f"{x['api_done_s'] * 1000:.0f}"
                 for x in r["runs"]) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
