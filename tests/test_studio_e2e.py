"""`specialize studio` in a real browser: Debian's chromium, driven by Selenium through chromedriver.

One walk through the life cycle, as a new user would take it: open the printed URL with its
token, lint a data file, launch a tiny run from the form and watch its loss curve grow, look at
a finished run's curves and scorecard, and chat with it beside its base and with RAG.

Skipped only when chromium or chromedriver is not installed and SPECIALIZE_REQUIRE_BROWSER is
not 1 (CI installs both and sets it, so there a missing browser is an error). Screenshots go
to $SPECIALIZE_STUDIO_SCREENSHOTS when set (the README's come from `docs/studio/`):

    SPECIALIZE_STUDIO_SCREENSHOTS=docs/studio .venv/bin/pytest tests/test_studio_e2e.py
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import QA8, serving, write_jsonl

from specialize.config import CompareConfig, StudioConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# CI (.ci/run) installs both and sets SPECIALIZE_REQUIRE_BROWSER=1: there a missing browser fails the
# run instead of quietly skipping the only test that drives the studio for real.
if os.environ.get("SPECIALIZE_REQUIRE_BROWSER") == "1" and not (CHROMIUM and CHROMEDRIVER):
    raise RuntimeError("SPECIALIZE_REQUIRE_BROWSER=1 but chromium or chromedriver is not installed")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver")
TOKEN = "e2e-token-0123456789"
QA = [json.loads(line) for line in QA8.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama, qa8_run) -> Path:
    """A folder as a user has it: a base model, data, documents, and one finished, compared run."""
    from specialize.evaluate.compare import compare

    root = tmp_path_factory.mktemp("studio") / "project"
    shutil.copytree(tiny_llama, root / "models" / "tiny")
    (root / "data").mkdir()
    shutil.copy(QA8, root / "data" / "qa.jsonl")
    write_jsonl(root / "data" / "eval.jsonl", [
        {"question": "Which gas do plants take in?", "answer": "Plants take in carbon dioxide."},
        {"question": "What is frozen water called?", "answer": "Frozen water is called ice."}])
    write_jsonl(root / "docs.jsonl", [{"text": q["answer"], "source": f"fact-{i}"} for i, q in enumerate(QA)])
    shutil.copytree(qa8_run, root / "runs" / "qa8")  # a finished run
    compare(CompareConfig(model=str(root / "runs" / "qa8"), data=[str(root / "data" / "qa.jsonl")],
                          docs=str(root / "docs.jsonl"), max_new_tokens=24, out=root / "runs" / "qa8" / "compare"),
            progress=False)
    # As a user's project holds it: the run's recorded base is the model inside the workspace (the
    # studio loads nothing from outside it). After compare, which resolved the base from the original.
    for name in ("train_summary.json", "config.yaml"):
        path = root / "runs" / "qa8" / name
        path.write_text(path.read_text(encoding="utf-8").replace(str(tiny_llama), "models/tiny"), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def studio(workspace, monkeypatch):
    from specialize.studio.app import create_app

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training child: a tiny model gains nothing from more

    app = create_app(StudioConfig(workspace=workspace), TOKEN)
    try:
        with serving(app) as url:
            yield url
    finally:
        app.state.queue.close(stop_running=True, timeout=30)  # never leave a training process behind


def shoot(driver, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("SPECIALIZE_STUDIO_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / f"{name}.png"))


def wait(driver, condition, timeout: float = 60, what: str = ""):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page redraws tables and charts as data arrives: an element read mid-redraw is looked up again.
    return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
                         ).until(lambda d: condition(d), message=what)


def by(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def all_by(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def click(driver, selector: str) -> None:
    """Click, looking the element up again if the page redrew it in between."""
    wait(driver, lambda d: by(d, selector).click() or True, what=f"click {selector}")


def points(driver, series: str) -> int:
    """Points on the loss chart's `series` (read in one script: the chart is redrawn while we look)."""
    return driver.execute_script("const p = document.querySelector(`#loss-chart path[data-name='${arguments[0]}']`);"
                                 "return p ? +p.dataset.points : 0;", series)


def test_the_life_cycle_in_the_browser(browser, studio, workspace, tmp_path):
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(f"{studio}/")
    wait(d, lambda d: "missing or wrong token" in d.page_source, what="refused without the token")
    d.get(f"{studio}/?token={TOKEN}")  # the URL the studio prints
    wait(d, lambda d: d.current_url == f"{studio}/#data", what="signed in, token gone from the address")

    # Data: pick the file, lint it: trained text marked, the verdict shown.
    wait(d, lambda d: len(Select(by(d, "#files")).options) >= 2, what="file list")
    Select(by(d, "#files")).select_by_value("data/qa.jsonl")
    by(d, "#lint").click()
    verdict = wait(d, lambda d: all_by(d, "#lint-verdict"), what="lint result")[0]
    assert verdict.text == "OK: 8 training examples, 0 warning(s)"
    trained = [m.text for m in all_by(d, "pre.marked mark.trained")]
    assert trained[0] == QA[0]["answer"] + "<|endoftext|>"
    shoot(d, "lint", tmp_path)

    # Train: the form from FinetuneConfig; launch a tiny run and watch its loss curve grow.
    by(d, '#tabs button[data-tab="train"]').click()
    wait(d, lambda d: by(d, "#train-form details summary").is_displayed(), what="the form")
    by(d, "#train-form details summary").click()  # open the training loop's other settings
    for field, value in (("base", "models/tiny"), ("data", "data/qa.jsonl"), ("out", "runs/new"),
                         ("max_steps", "1500"), ("learning_rate", "0.005"), ("eval_every", "500"),
                         ("save_every", "5000"), ("eval_data", "data/eval.jsonl")):
        box = by(d, f"#f-{field}")
        box.clear()
        box.send_keys(value)
    by(d, "#f-micro_batch_size").clear()
    by(d, "#f-micro_batch_size").send_keys("2")
    assert by(d, "#train-command").text == ("specialize finetune --out runs/new --max-steps 1500 --learning-rate 0.005 "
                                            "--micro-batch-size 2 --eval-every 500 --save-every 5000 --base models/tiny "
                                            "--data data/qa.jsonl --eval-data data/eval.jsonl")
    shoot(d, "train", tmp_path)
    by(d, "#launch").click()
    wait(d, lambda d: by(d, "#run-title").text == "runs/new", what="the new run opened")
    seen: list[int] = []
    # 1,500 steps (~9 s on an idle 2-core CPU; 150 took 0.9 s, under the page's 1 s poll, so a fast
    # machine could show the run only before and after): the page must show the curve part-way.

    def grown(d) -> bool:
        n = points(d, "loss")
        if 0 < n < 1500 and not any(0 < s < 1500 for s in seen):
            shoot(d, "training", tmp_path)  # mid-run: the curve as it grows
        seen.append(n)
        return n == 1500
    wait(d, grown, timeout=240, what="all 1,500 steps on the loss curve")
    assert any(0 < n < 1500 for n in seen), sorted(set(seen))  # the page showed it part-way: it grew as it ran
    wait(d, lambda d: "finished" in by(d, "#run-progress").text, timeout=60, what="run finished")
    assert points(d, "eval loss") == 3
    summary = json.loads((workspace / "runs" / "new" / "train_summary.json").read_text())
    assert summary["steps"] == 1500

    # Runs: both runs, read from their folders; the compared one shows its recommendation.
    by(d, "#refresh-runs").click()
    wait(d, lambda d: {r.get_attribute("data-run") for r in all_by(d, "tr.run")} == {"runs/qa8", "runs/new"},
         what="both runs listed")
    click(d, 'tr.run[data-run="runs/qa8"]')
    wait(d, lambda d: points(d, "loss") == 150, what="the finished run's curve")
    click(d, 'tr.run[data-run="runs/new"]')
    wait(d, lambda d: points(d, "eval loss") == 3, what="the new run's curves")
    shoot(d, "runs", tmp_path)

    # Compare: the scorecard and recommendation of the finished run, and compare's own report.
    by(d, '#tabs button[data-tab="compare"]').click()
    Select(by(d, "#compare-run")).select_by_value("runs/qa8")
    recommendation = wait(d, lambda d: all_by(d, "#recommendation"), what="scorecard")[0]
    card = json.loads((workspace / "runs" / "qa8" / "compare" / "scorecard.json").read_text())
    assert recommendation.text.startswith(f"Recommendation: {card['recommendation']['system']}")
    assert len(all_by(d, "#scorecard-table tbody tr")) == len(card["systems"])
    wait(d, lambda d: by(d, "#report").is_displayed(), what="report shown")
    shoot(d, "compare", tmp_path)

    # Playground: the finished run, its base and the run with RAG, answers streamed in.
    by(d, '#tabs button[data-tab="playground"]').click()
    Select(by(d, "#chat-run")).select_by_value("runs/qa8")
    by(d, "#chat-with-base").click()
    by(d, "#chat-with-rag").click()
    by(d, "#chat-docs").send_keys("docs.jsonl")
    by(d, "#chat-max").clear()
    by(d, "#chat-max").send_keys("24")
    by(d, "#chat-input").send_keys(QA[0]["question"])
    by(d, "#chat-send").click()
    wait(d, lambda d: len(all_by(d, ".bubble.assistant.done, .bubble.error")) == 3, timeout=120, what="3 answers")
    assert not all_by(d, ".bubble.error"), [e.text for e in all_by(d, ".bubble.error")]
    answer = by(d, "#answers-run .bubble.assistant.done .answer").text
    assert answer == QA[0]["answer"]  # the run learned QA8 word for word
    assert "passage(s) retrieved" in by(d, "#answers-rag details.passages summary").text
    shoot(d, "playground", tmp_path)

    # Export: a standalone folder checked against the run, and the commands to serve it elsewhere.
    by(d, '#tabs button[data-tab="export"]').click()
    Select(by(d, "#export-run")).select_by_value("runs/qa8")
    by(d, "#export-out").send_keys("exports/qa8")
    by(d, "#export-start").click()
    done = wait(d, lambda d: all_by(d, "#export-done"), timeout=180, what="export finished")[0]
    assert done.text.startswith("exports/qa8: ") and "parity 8/8 identical" in done.text
    commands = [p.text for p in all_by(d, "#export-commands .command pre")]
    assert "vllm serve exports/qa8" in commands
    assert "ollama create qa8 -f exports/qa8/Modelfile && ollama run qa8" in commands
    assert (workspace / "exports" / "qa8" / "config.json").is_file()
    shoot(d, "export", tmp_path)
