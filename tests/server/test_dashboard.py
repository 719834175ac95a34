"""The dashboard in a real browser (Playwright driving the system Chromium) and its downloads over HTTP.

The job store is filled directly through the store's own methods (no training): what the worker would have written
for a job — metrics, events, checkpoints, an eval stage's records and the artefacts — so each test is fast and
knows exactly what the page must show.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tunesmith.records import EvalOutputs, StageRecord
from tunesmith.server.api import create_app
from tunesmith.server.db import Job, Store, connect
from tunesmith.server.settings import ServerSettings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
HOSTILE = '<img src=x onerror="document.body.dataset.pwned=1">'


# --- the store, filled as a worker would fill it ------------------------------------------------------------------

@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    opened = connect(f"sqlite:///{data_dir / 'tunesmith.db'}")
    opened.upgrade()
    yield opened
    opened.close()


def new_job(store: Store, *, owner: str = "local", suffix: str | None = None) -> Job:
    return store.create_job(owner=owner, model="local:demo", training_file="file-abc", validation_file=None,
                            method={"type": "supervised"}, hyperparameters={"n_epochs": 3, "batch_size": 2,
                                                                            "learning_rate_multiplier": 1.0},
                            suffix=suffix, seed=7, metadata=None)


def log_steps(store: Store, job: Job, steps: range, eval_every: int = 10) -> None:
    for step in steps:
        store.upsert_metric(job.id, kind="train", step=step, values={"loss": 3.0 / step, "learning_rate": 1e-4})
        if step % eval_every == 0:
            store.upsert_metric(job.id, kind="eval", step=step, values={"eval_loss": 3.5 / step})


def finished_job(store: Store, data_dir: Path, *, suffix: str | None = None) -> Job:
    """A succeeded job with 30 steps, 3 evals, 2 checkpoints, events, an eval stage and its three artefacts."""
    job = new_job(store, suffix=suffix)
    store.update_job(job.id, status="running")
    store.add_event(job.id, level="info", message="Fine-tuning job started")
    log_steps(store, job, range(1, 31))
    for step in (15, 30):
        store.add_checkpoint(job.id, step_number=step, metrics={"step": step, "train_loss": 3.0 / step},
                             fine_tuned_model_checkpoint=f"ft:local:demo::{job.id}:ckpt-step-{step}",
                             path=f"jobs/{job.id}/train/checkpoints/step-{step}")
        store.add_event(job.id, level="info", message=f"Checkpoint created at step {step}")
    job_dir = data_dir / job.out_dir
    adapter = job_dir / "train" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 40)
    (job_dir / "export").mkdir()
    (job_dir / "export" / "model-f16.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    (job_dir / "report").mkdir()
    (job_dir / "report" / "report.html").write_text("<!doctype html><title>report</title>")
    write_eval_stages(job_dir)
    return store.update_job(job.id, status="succeeded", fine_tuned_model=f"ft:local:demo:{suffix or ''}:{job.id}",
                            finished_at=int(time.time()), trained_tokens=1234,
                            artefacts={"adapter": f"{job.out_dir}/train/adapter",
                                       "gguf": [f"{job.out_dir}/export/model-f16.gguf"],
                                       "report": f"{job.out_dir}/report/report.html"})


def write_eval_stages(job_dir: Path) -> None:
    """The baseline and eval stages' records as ``tunesmith run`` writes them: 4 examples; the tuned model fixes
    lines 1 and 2 and breaks line 4."""
    right = {"base": [False, False, True, True], "tuned": [True, True, True, False]}
    for stage, label in (("baseline", "base"), ("eval", "tuned")):
        folder = job_dir / stage
        folder.mkdir(parents=True)
        mean = sum(right[label]) / 4
        (folder / "metrics.json").write_text(json.dumps({"examples": 4, "models": [
            {"label": label, "metrics": {"exact_match": {"mean": mean, "ci_low": mean - 0.25,
                                                         "ci_high": min(1.0, mean + 0.25)}}}]}))
        rows = [{"line": i + 1, "input": f"question {i + 1} {HOSTILE}", "expected": f"answer {i + 1}",
                 "prediction": f"{label} says {i + 1}", "verdicts": {"exact_match": {"correct": ok}}}
                for i, ok in enumerate(right[label])]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        StageRecord(stage=stage, key="k", status="done", seconds=1.0, summary=f"{label} scored", finished=0.0,
                    outputs=EvalOutputs(eval_dir=str(folder), result={})).write(folder)


# --- the server -----------------------------------------------------------------------------------------------------

def dashboard_app(store: Store, data_dir: Path, *, require_keys: bool = False) -> FastAPI:
    """The server's own app (``create_app``: its auth, its error envelope), over the test's store."""
    return create_app(ServerSettings(data_dir=data_dir, require_keys=require_keys), store)


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the dashboard server did not start in 10 s"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    opened.on("requestfailed", lambda req: errors.append(f"{req.url}: {req.failure}"))
    yield opened
    context.close()
    assert errors == [], f"the page raised or failed to load something: {errors}"


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("TUNESMITH_TEST_ARTEFACTS"):
        target = Path(os.environ["TUNESMITH_TEST_ARTEFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / name)
    return shot


# --- in the browser -------------------------------------------------------------------------------------------------

def test_jobs_list_shows_every_job_with_status_and_escapes_user_text(store, data_dir, page, tmp_path):
    done = finished_job(store, data_dir, suffix="s1")
    queued = new_job(store)
    store.update_job(queued.id, status="queued", fine_tuned_model=HOSTILE)  # user text, e.g. a suffix, never markup
    with serving(dashboard_app(store, data_dir)) as url:
        page.goto(url + "/")
        page.wait_for_selector("body[data-loaded=true]")
        rows = page.locator("#jobs tbody tr")
        assert rows.count() == 2
        assert rows.nth(0).get_attribute("data-job") == queued.id  # newest first
        assert page.locator(f"tr[data-job='{done.id}'] .status").inner_text() == "succeeded"
        assert page.locator(f"tr[data-job='{done.id}']").inner_text().count(f"ft:local:demo:s1:{done.id}") == 1
        assert page.locator(f"tr[data-job='{queued.id}'] .status").inner_text() == "queued"
        assert HOSTILE in page.locator(f"tr[data-job='{queued.id}']").inner_text()
        assert page.locator("#jobs img").count() == 0 and page.evaluate("document.body.dataset.pwned") is None
        save_screenshot(page, tmp_path, "dashboard-jobs.png")
        page.click(f"a[href='/jobs/{done.id}']")
        page.wait_for_selector("#loss-chart canvas")
        assert page.url == f"{url}/jobs/{done.id}"


def test_job_page_draws_the_loss_curves_and_shows_events_checkpoints_flips_and_downloads(store, data_dir, page,
                                                                                           tmp_path):
    job = finished_job(store, data_dir)
    with serving(dashboard_app(store, data_dir)) as url:
        page.goto(f"{url}/jobs/{job.id}")
        page.wait_for_selector("#loss-chart[data-first-drawn-ms]")
        chart = page.locator("#loss-chart")
        assert (chart.get_attribute("data-train-points"), chart.get_attribute("data-eval-points")) == ("30", "3")
        assert page.locator("#loss-chart canvas").count() == 1
        assert page.locator(".u-legend").inner_text().count("train loss") == 1
        assert page.locator("#events li").all_inner_texts()[0].endswith("Checkpoint created at step 30")
        assert page.locator("#events li").count() == 3
        assert [r.split("\t")[0] for r in page.locator("#checkpoints tbody tr").all_inner_texts()] == ["30", "15"]
        metrics = page.locator("#eval-metrics tbody tr").all_inner_texts()
        assert metrics == ["exact_match\t0.500 [0.250, 0.750]\t0.750 [0.500, 1.000]\t+0.250"]
        assert "2 wrong → right, 1 right → wrong (of 4)" in page.locator("#flips-title").inner_text()
        flips = page.locator(".flip").all_inner_texts()
        assert len(flips) == 3 and "question 1 " + HOSTILE in flips[0] and "tuned says 1" in flips[0]
        assert page.evaluate("document.body.dataset.pwned") is None
        downloads = page.locator("#artefacts a")
        assert [downloads.nth(i).get_attribute("href") for i in range(downloads.count())] == [
            f"/dashboard/jobs/{job.id}/download/{kind}" for kind in ("adapter", "gguf-1", "report")]
        with page.expect_download() as download:
            downloads.nth(1).click()
        assert download.value.suggested_filename == f"{job.id}-model-f16.gguf"
        shot = save_screenshot(page, tmp_path, "dashboard-job.png")
    assert shot.is_file()


def test_job_page_follows_a_running_job_as_steps_are_logged(store, data_dir, page):
    job = new_job(store)
    store.update_job(job.id, status="running")
    log_steps(store, job, range(1, 6))
    with serving(dashboard_app(store, data_dir)) as url:
        page.goto(f"{url}/jobs/{job.id}")
        page.wait_for_selector("#loss-chart[data-train-points='5']")
        log_steps(store, job, range(6, 13))  # the worker goes on; the page polls every 2 s
        page.wait_for_selector("#loss-chart[data-train-points='12']", timeout=8000)
        assert page.locator("#loss-chart").get_attribute("data-eval-points") == "1"
        store.update_job(job.id, status="succeeded")
        page.wait_for_selector(".card .status.succeeded", timeout=8000)


def test_with_keys_the_page_asks_for_one_and_shows_only_that_keys_jobs(store, data_dir, page):
    (key_a, secret_a), (key_b, _) = store.create_api_key(name="a"), store.create_api_key(name="b")
    mine, theirs = new_job(store, owner=key_a.id), new_job(store, owner=key_b.id)
    with serving(dashboard_app(store, data_dir, require_keys=True)) as url:
        page.goto(url + "/")
        page.wait_for_selector("#key-form:not([hidden])")
        assert page.locator("#jobs tbody tr").count() == 0
        page.fill("#key-form input", secret_a)
        page.click("#key-form button")
        page.wait_for_selector("body[data-loaded=true]")
        assert [page.locator("#jobs tbody tr").nth(0).get_attribute("data-job")] == [mine.id]
        assert page.locator("#jobs tbody tr").count() == 1
        page.goto(f"{url}/jobs/{theirs.id}")
        page.wait_for_selector("#error:not([hidden])")
        assert f"No fine-tuning job '{theirs.id}'" in page.locator("#error").inner_text()
        assert httpx.get(f"{url}/dashboard/api/jobs").status_code == 401  # the data needs the key, not the page
        download = httpx.get(f"{url}/dashboard/jobs/{mine.id}/download/report")
        assert download.status_code == 401 and download.json()["error"]["code"] == "missing_api_key"


# --- over HTTP ------------------------------------------------------------------------------------------------------

def test_downloads_are_served_by_kind_from_the_jobs_folder_only(store, data_dir):
    job = finished_job(store, data_dir)
    client = TestClient(dashboard_app(store, data_dir))
    base = f"/dashboard/jobs/{job.id}/download"
    archive = zipfile.ZipFile(io.BytesIO(client.get(f"{base}/adapter").content))
    assert archive.testzip() is None
    assert sorted(archive.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert archive.read("adapter_model.safetensors") == bytes(range(256)) * 40
    gguf = client.get(f"{base}/gguf-1")
    assert gguf.content.startswith(b"GGUF") and f'{job.id}-model-f16.gguf' in gguf.headers["content-disposition"]
    assert client.get(f"{base}/report").text.startswith("<!doctype html>")
    assert client.get(f"{base}/merged").status_code == 404  # not produced
    assert client.get(f"{base}/gguf-2").status_code == 404  # one GGUF was exported
    assert client.get(f"{base}/config.yaml").status_code == 404  # not an artefact
    # a record pointing outside the job's folder (the database was edited) serves nothing
    store.update_job(job.id, artefacts={"adapter": "tunesmith.db", "gguf": ["../outside.gguf"],
                                        "report": f"{job.out_dir}/report/report.html"})
    (data_dir.parent / "outside.gguf").write_bytes(b"GGUF")
    assert client.get(f"{base}/adapter").status_code == 404
    assert client.get(f"{base}/gguf-1").status_code == 404
    view = client.get(f"/dashboard/api/jobs/{job.id}").json()
    assert [a["href"].rsplit("/", 1)[1] for a in view["artefacts"]] == ["report"]


def test_static_files_are_a_fixed_list_and_pages_forbid_other_origins(store, data_dir):
    client = TestClient(dashboard_app(store, data_dir))
    assert client.get("/dashboard/static/vendor/uplot/uPlot.iife.min.js").text.startswith("/*! https://github.com/")
    assert client.get("/dashboard/static/..%2Fdashboard.py").status_code == 404
    assert client.get("/dashboard/static/index.html").status_code == 404
    page = client.get("/")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert "<script src=\"/dashboard/static/dashboard.js\"></script>" in page.text
