"""The MLflow UI, seen: headless Chromium (Debian's, driven through Playwright's Python client) opens the
real MLflow UI of the session's tiny sweep and finds, as text on screen, the sweep run, its trials (child
runs, expanded under it), the soup runs, and every checkpoint (LoggedModel) on the experiment's Models tab
and on its trial's run page. Full-page screenshots land in test-artifacts/mlflow-ui-*.png.

Install the browser with .ci/browser.sh (Debian's chromium package); Playwright's own browser downloads are
never used. Without /usr/bin/chromium these tests skip, and under CI=true they fail.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.conftest import in_ci, require_service

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("ICH_CHROMIUM", "/usr/bin/chromium")
NO_BROWSER = f"{CHROMIUM} not found: install Debian's chromium with .ci/browser.sh"
# Checked at collection too, so that a machine without the browser skips before the session's sweep runs
# (never under CI=true: there the fixture below fails instead).
pytestmark = [pytest.mark.integration, pytest.mark.browser,
              pytest.mark.skipif(not in_ci() and not Path(shutil.which(CHROMIUM) or CHROMIUM).is_file(),
                                 reason=NO_BROWSER)]
# Headless, no sandbox (containers), and no background traffic: without the last five Chromium keeps
# dialling Google services, which on a closed network means retries and stalls.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000  # the UI loads its data asynchronously, on a machine busy with Ray and other tests
VIEWPORT = {"width": 1920, "height": 1080}
# MLflow 3 opens experiments in its GenAI layout (traces overview) with its assistant panel open. A user
# switches to "Model training" and closes the panel once; the UI keeps both choices in localStorage.
UI_PREFERENCES = """
try {
  localStorage.setItem("mlflow.workflowType_v1", JSON.stringify("machine_learning"));
  localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
  localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
} catch (e) {}
"""


# ------------------------------------------------------------------------------------------------ fixtures

def _chromium_or_skip() -> str:
    path = shutil.which(CHROMIUM) or CHROMIUM
    if not Path(path).is_file():
        require_service(NO_BROWSER)
    try:
        subprocess.run([path, "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        require_service(f"{path} does not run ({e}): reinstall it with .ci/browser.sh")
    if importlib.util.find_spec("playwright") is None:
        require_service("the playwright Python package is missing: pip install -e '.[dev]'")
    return path


@pytest.fixture(scope="module")
def chromium() -> str:
    """The browser's path; skips before the (minutes-long) sweep fixture runs when there is none."""
    return _chromium_or_skip()


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    for old in ARTIFACTS.glob("mlflow-ui-*.png"):  # trial ids change every session: no stale screenshots
        old.unlink()

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def recorded(chromium, tiny_sweep, mlflow_server) -> dict:
    """What the UI should show, read from MLflow: the sweep run, its trial and soup runs, and the checkpoint
    names of each trial. Soups are built here (across runs, greedy) if no other module built them yet."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment_id = tiny_sweep["experiment_id"]
    soup_filter = "tags.`ich.kind` = 'soup'"
    if not client.search_runs([experiment_id], filter_string=soup_filter):
        from soups.orchestrate import SoupOptions, run_soups
        run_soups(SoupOptions(experiment=tiny_sweep["experiment"], scope="across", recipe="greedy", n_resamples=200))

    sweep_run = client.get_run(tiny_sweep["parent_run_id"])
    children = client.search_runs([experiment_id], max_results=1000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{sweep_run.info.run_id}'")
    trials = {r.info.run_id: r.info.run_name for r in children if r.data.tags.get("ich.kind") == "trial"}
    soups = sorted({r.info.run_name for r in children if r.data.tags.get("ich.kind") == "soup"})
    checkpoints: dict[str, list[str]] = {run_id: [] for run_id in trials}
    logged: dict[str, int] = {run_id: 0 for run_id in trials}  # every LoggedModel of the run (output or input)
    models = client.search_logged_models([experiment_id], max_results=1000)
    for model in models:
        if model.source_run_id in checkpoints:
            logged[model.source_run_id] += 1
            if model.tags.get("ich.kind") == "checkpoint":
                checkpoints[model.source_run_id].append(model.name)
    for run_id in trials:  # the run page counts its input models too: the shared init (lineage)
        logged[run_id] += len(client.get_run(run_id).inputs.model_inputs or [])
    assert len(trials) == 4 and soups, (trials, soups)
    assert all(checkpoints.values()), f"a trial without checkpoints: {checkpoints}"
    n_runs = len(client.search_runs([experiment_id], max_results=1000))
    return {"uri": mlflow_server.rstrip("/"), "experiment_id": experiment_id, "n_runs": n_runs,
            "n_models": len(models), "sweep": sweep_run.info.run_name, "sweep_run_id": sweep_run.info.run_id,
            "trials": trials, "soups": soups,
            "checkpoints": {run_id: sorted(names) for run_id, names in checkpoints.items()}, "logged": logged}


@pytest.fixture
def page(browser, recorded):
    host = urlparse(recorded["uri"]).hostname
    context = browser.new_context(viewport=VIEWPORT)
    context.add_init_script(UI_PREFERENCES)
    # Only the MLflow server on loopback: anything else (fonts, telemetry) is refused at once, not left to
    # time out on the closed network.
    context.route(lambda url: urlparse(url).hostname not in (host, "127.0.0.1", "localhost"),
                  lambda route: route.abort())
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    try:
        yield pg
    finally:
        context.close()


# ------------------------------------------------------------------------------------------------- helpers

def _open(page, recorded, route: str) -> None:
    # The UI polls the server (the runs table refreshes itself), so "network idle" may never come: wait for
    # the page's own elements instead.
    page.goto(f"{recorded['uri']}/#/experiments/{recorded['experiment_id']}/{route}", wait_until="domcontentloaded",
              timeout=TIMEOUT_MS)


def _fit_rows(page, n_rows: int) -> None:
    """Make the window tall enough for every row: the UI's tables (ag-grid) only render the rows in view."""
    page.set_viewport_size({"width": VIEWPORT["width"], "height": max(VIEWPORT["height"], 400 + 45 * n_rows)})


def _close_assistant(page) -> None:
    """Close the assistant panel if the UI opened it anyway (it narrows the table)."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count() and close.first.is_visible():
        close.first.click()


def _screenshot(page, name: str, show=None) -> Path:
    """Full-page PNG; `show` (a locator) is scrolled into view first, for content below the fold of the
    UI's own scrolling panel (the PNG only holds what that panel shows)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"mlflow-ui-{name}.png"
    if show is not None:
        show.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)  # let the last rows paint
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def _expect_texts(page, texts, scope=None) -> None:
    from playwright.sync_api import expect

    where = scope if scope is not None else page
    for text in texts:
        expect(where.get_by_text(text, exact=True).first, f"{text!r} on {page.url}").to_be_visible(timeout=TIMEOUT_MS)


def _rows(page) -> str:
    return "\n".join(page.locator('[role="row"]').all_inner_texts())


# --------------------------------------------------------------------------------------------------- tests

def test_runs_page_shows_the_sweep_its_trials_and_the_soups(page, recorded):
    """The experiment's Runs page: the sweep run on top, its trials and soups as child runs once expanded."""
    from playwright.sync_api import expect

    _fit_rows(page, recorded["n_runs"])
    _open(page, recorded, "runs")
    _close_assistant(page)
    sweep_row = page.locator('[role="row"]').filter(has_text=recorded["sweep"])
    expect(sweep_row.first).to_be_visible(timeout=TIMEOUT_MS)
    children = list(recorded["trials"].values()) + recorded["soups"]
    # Child runs come collapsed under their parent (a search filter keeps them so): expand it with the button
    # in front of its name.
    expand = 'button[data-component-id*="runnamecellrenderer"], [col-id*="Run Name"] button'
    sweep_row.first.locator(expand).first.click()
    _expect_texts(page, [recorded["sweep"], *children])
    rows = _rows(page)
    for name in [recorded["sweep"], *children]:
        assert name in rows, f"run {name!r} not in the runs table:\n{rows}"
    # The Models column names a checkpoint of each trial (the latest, then "+N" for the others).
    for names in recorded["checkpoints"].values():
        one_of = re.compile("^(" + "|".join(map(re.escape, names)) + ")$")
        expect(page.get_by_text(one_of).first, f"a checkpoint of {names}").to_be_visible(timeout=TIMEOUT_MS)
    _screenshot(page, "runs")


def test_models_tab_lists_every_checkpoint_and_soup(page, recorded):
    """The experiment's Models tab lists the LoggedModels: each epoch's checkpoint of each trial, the soups,
    and, as each checkpoint's source run, its trial."""
    from playwright.sync_api import expect

    _fit_rows(page, recorded["n_models"])
    _open(page, recorded, "models")
    _close_assistant(page)
    expect(page.get_by_role("heading", name="Models", exact=True)).to_be_visible(timeout=TIMEOUT_MS)
    checkpoints = [name for names in recorded["checkpoints"].values() for name in names]
    _expect_texts(page, checkpoints + recorded["soups"] + list(recorded["trials"].values()))
    rows = _rows(page).splitlines()
    missing = [name for name in checkpoints if name not in rows]
    assert not missing, f"checkpoints {missing} not in the Models table:\n" + "\n".join(rows)
    _screenshot(page, "models")


def test_each_trial_run_page_lists_its_checkpoints(page, recorded):
    """Each trial's run page names the run and, under "Logged models (N)", lists the checkpoints it logged,
    one per epoch it trained."""
    from playwright.sync_api import expect

    for run_id, run_name in sorted(recorded["trials"].items(), key=lambda kv: kv[1]):
        _open(page, recorded, f"runs/{run_id}")
        _close_assistant(page)
        expect(page.get_by_text(run_name, exact=True).first).to_be_visible(timeout=TIMEOUT_MS)
        heading = page.get_by_text(f"Logged models ({recorded['logged'][run_id]})", exact=True).first
        expect(heading).to_be_visible(timeout=TIMEOUT_MS)
        _expect_texts(page, recorded["checkpoints"][run_id])
        _screenshot(page, f"trial-{run_name}", show=heading)


def test_a_registered_soup_shows_its_data_ingredients_and_model_card(page, recorded):
    """Lineage (issue 24 item 1) as a user clicks through it: the registered soup's run page names the dataset
    splits it was evaluated on; its version page shows the model card, whose ingredient links are the
    checkpoints' model ids."""
    from mlflow import MlflowClient
    from playwright.sync_api import expect

    client = MlflowClient(recorded["uri"])
    version = client.get_model_version_by_alias("tiny-sweep-soup", "champion")
    fp12 = version.tags["ich.dataset_fingerprint"][:12]
    run = client.get_run(version.run_id)
    _open(page, recorded, f"runs/{version.run_id}")
    _close_assistant(page)
    expect(page.get_by_text(run.info.run_name, exact=True).first).to_be_visible(timeout=TIMEOUT_MS)
    datasets = [f"val@{fp12}", f"test@{fp12}"]
    expect(page.get_by_text(re.compile("|".join(map(re.escape, datasets)))).first,
           f"a dataset of {datasets} on the soup's run page").to_be_visible(timeout=TIMEOUT_MS)
    _screenshot(page, "soup-lineage")

    page.goto(f"{recorded['uri']}/#/models/tiny-sweep-soup/versions/{version.version}",
              wait_until="domcontentloaded", timeout=TIMEOUT_MS)
    _close_assistant(page)
    accepted = [m.model_id for m in (run.inputs.model_inputs or [])] or \
        [line.split("](")[0].lstrip("| [") for line in version.description.splitlines() if "](#/experiments" in line]
    assert accepted, version.description
    _expect_texts(page, ["Ingredients", "Limits"])
    expect(page.get_by_text(accepted[0]).first, f"ingredient {accepted[0]} in the model card").to_be_visible(
        timeout=TIMEOUT_MS)
    _screenshot(page, "model-card", show=page.get_by_text("Ingredients", exact=True).first)
