"""The feedback page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

`prefopt annotate` runs in a subprocess exactly as a user starts it. The browser labels ten pairs (buttons and the
a / b keys), the server is killed and restarted, the page must resume at 10 of N with the same annotator, and the
file must hold those ten labels as whole JSON lines that load_preferences reads. Then a tie and a skip (key and
button) go to the side file, and typing an annotator id that contains "b" must not label anything.

`make install` installs chromium where it is missing (as root, via apt-get); without it this test is skipped.
ANNOTATE_SCREENSHOT=path.png keeps a screenshot of the page to look at.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from prefopt.annotate.items import load_pair_file, order
from prefopt.data.loaders import load_preferences
from prefopt.data.spec import DatasetSpec

REPO = Path(__file__).resolve().parents[1]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (requirements/cpu.txt)")
pytestmark = [
    # find_spec, not an import: gradio takes seconds to import and only the server needs it
    pytest.mark.skipif(importlib.util.find_spec("gradio") is None,
                       reason="the page needs the `annotate` extra (gradio)"),
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                       reason="no chromium / chromedriver on PATH: `make install` (as root) or "
                              "`apt-get install chromium chromium-driver`"),
]

N = 14


def write_pairs(path: Path) -> Path:
    with open(path, "w") as f:
        for i in range(N):
            digits = [(7 * i + 3 * k) % 10 for k in range(5)]
            prompt = f"{i + 1}. Sort the digits {' '.join(map(str, digits))}"
            f.write(json.dumps({"prompt_id": f"p{i}", "prompt": prompt,
                                "chosen": " ".join(map(str, sorted(digits))),
                                "rejected": " ".join(map(str, sorted(digits, reverse=True)))}) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(pairs: Path, out: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [PY, "-m", "prefopt", "annotate", "--pairs", str(pairs), "--out", str(out), "--host", "127.0.0.1",
           "--port", str(port), "--annotator", "alice"]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120  # gradio starts slowly on a loaded 2-core machine
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"the server did not answer on {url}:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(90)
    yield driver
    driver.quit()


def test_label_ten_restart_resume(tmp_path, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    pairs_file, out = write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "labels" / "prefs.jsonl"
    pairs = load_pair_file(pairs_file)[0]
    wait = WebDriverWait(browser, 45, poll_frequency=0.05)  # generous: a loaded 2-core machine

    def progress_is(k: int):
        try:
            wait.until(lambda d: d.find_element(By.ID, "progress").text.strip() == f"{k} of {N} labelled")
        except Exception:
            raise AssertionError(f"progress never showed {k} of {N}: "
                                 f"{browser.find_element(By.ID, 'progress').text!r}") from None

    def on_screen() -> tuple[str, str, str]:
        value = lambda eid: browser.find_element(By.CSS_SELECTOR, f"#{eid} textarea").get_attribute("value")
        return value("prompt"), value("answer-a"), value("answer-b")

    def press(key: str):
        browser.execute_script("document.activeElement && document.activeElement.blur()")  # keys go to the page
        ActionChains(browser).send_keys(key).perform()

    proc, url = start_server(pairs_file, out, tmp_path / "server1.log")
    try:
        browser.get(url)
        progress_is(0)
        assert browser.find_element(By.CSS_SELECTOR, "#annotator textarea, #annotator input").get_attribute(
            "value") == "alice"
        # ten labels: buttons and keys, A and B mixed
        actions = [("click", "btn-a"), ("key", "b"), ("click", "btn-b"), ("key", "a"), ("key", "a"),
                   ("click", "btn-a"), ("key", "b"), ("click", "btn-b"), ("click", "btn-a"), ("key", "b")]
        expected = []
        for k, (how, what) in enumerate(actions):
            prompt, a, b = on_screen()
            assert prompt == pairs[k].prompt  # pairs come in file order
            assert (a, b) == tuple(pairs[k].answers[i] for i in order(pairs[k].pair_id, 0))  # the seeded order
            if how == "click":
                browser.find_element(By.ID, what).click()
            else:
                press(what)
            letter = what[-1].upper()
            expected.append((prompt, a if letter == "A" else b, b if letter == "A" else a, letter))
            progress_is(k + 1)
        # the file is complete as soon as the page moved on: read it before the server stops
        lines = out.read_bytes().split(b"\n")
        assert lines[-1] == b"" and len(lines) == 11
        rows = [json.loads(line) for line in lines[:-1]]
    finally:
        stop_server(proc)

    assert [(r["prompt"], r["chosen"], r["rejected"], r["label"]) for r in rows] == expected
    assert {r["annotator"] for r in rows} == {"alice"}
    assert [r["pair_id"] for r in rows] == [p.pair_id for p in pairs[:10]]
    loaded = load_preferences(DatasetSpec(path=str(out))).rows
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in loaded] == [e[:3] for e in expected]

    # restart: the page resumes where alice stopped, with the same A/B order as before
    proc, url = start_server(pairs_file, out, tmp_path / "server2.log")
    try:
        browser.get(url)
        progress_is(10)
        prompt, a, b = on_screen()
        assert prompt == pairs[10].prompt
        assert (a, b) == tuple(pairs[10].answers[i] for i in order(pairs[10].pair_id, 0))
        press("t")
        progress_is(11)
        browser.find_element(By.ID, "btn-skip").click()
        progress_is(12)
        if os.environ.get("ANNOTATE_SCREENSHOT"):
            browser.save_screenshot(os.environ["ANNOTATE_SCREENSHOT"])
        assert browser.get_screenshot_as_png().startswith(b"\x89PNG")
        # typing an id with an "b" in it is typing, not a label; a new annotator starts at 0
        field = browser.find_element(By.CSS_SELECTOR, "#annotator textarea, #annotator input")
        field.clear()
        field.send_keys("bob", Keys.ENTER)
        progress_is(0)
        assert on_screen()[0] == pairs[0].prompt
    finally:
        stop_server(proc)

    assert len(out.read_text().splitlines()) == 10
    side = [json.loads(line) for line in (tmp_path / "labels" / "prefs.ties_skips.jsonl").read_text().splitlines()]
    assert [(r["label"], r["pair_id"], r["annotator"]) for r in side] == [
        ("tie", pairs[10].pair_id, "alice"), ("skip", pairs[11].pair_id, "alice")]
