"""The voting page in a real headless Chromium (Debian's chromium and chromium-driver, which
.ci/run installs): both videos play, votes go through several pairs, the server restarts mid-way,
and the database and the report hold exactly those votes.

Without /usr/bin/chromium the test is skipped, unless KVIDEO_REQUIRE_BROWSER=1 (CI sets it),
where a missing browser is a failure.
"""

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

from kvideo.human_eval import read_votes, win_rates

from test_human_eval import make_folders

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
    if os.environ.get("KVIDEO_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"KVIDEO_REQUIRE_BROWSER=1 but {CHROMIUM} / {DRIVER} are missing "
                           f"(apt-get install chromium chromium-driver)")
    pytest.skip(f"no {CHROMIUM}: apt-get install chromium chromium-driver (CI does)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(a, b, db, port, log):
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "human_eval.py"), "serve", "--a", str(a), "--b", str(b),
                             "--db", str(db), "--port", str(port), "--seed", "0"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not start: {Path(log.name).read_text()}")


def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
                "--window-size=1200,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def wait(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(condition))


PLAYING = ("const v = [document.getElementById('left'), document.getElementById('right')];"
           "return v.every(x => !x.paused && x.readyState >= 2 && x.currentTime > 0.05);")


def vote(driver, answers):
    from selenium.webdriver.common.by import By

    prompt = driver.find_element(By.ID, "prompt").text
    for question, answer in answers.items():
        driver.find_element(By.CSS_SELECTOR, f"input[name='{question}'][value='{answer}']").click()
    driver.find_element(By.ID, "submit").click()
    wait(driver, f"return document.getElementById('prompt').textContent !== {json.dumps(prompt)}"
                 f" || document.getElementById('done').style.display === 'block';")
    return prompt


def test_raters_vote_in_a_real_browser_across_a_restart(tmp_path):
    from selenium.webdriver.common.by import By

    a, b = make_folders(tmp_path, n=4)
    db, port = tmp_path / "votes.sqlite", free_port()
    log = open(tmp_path / "server.log", "w")
    server = start_server(a, b, db, port, log)
    driver = browser()
    answers = [{"temporal": "left", "alignment": "right", "quality": "tie"},
               {"temporal": "right", "alignment": "right", "quality": "left"},
               {"temporal": "tie", "alignment": "left", "quality": "left"},
               {"temporal": "left", "alignment": "tie", "quality": "right"}]
    prompts = []
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element(By.ID, "rater").send_keys("carol")
        driver.find_element(By.ID, "start").click()
        for i in range(2):
            wait(driver, PLAYING)  # both videos decode and play
            if i == 0:
                driver.save_screenshot(str(tmp_path / "page.png"))
            prompts.append(vote(driver, answers[i]))
        server.terminate(), server.wait(timeout=30)  # a restart mid-study
        server = start_server(a, b, db, port, log)
        driver.get(f"http://127.0.0.1:{port}/")  # the cookie keeps the rater
        driver.find_element(By.ID, "rater").send_keys("carol")
        driver.find_element(By.ID, "start").click()
        for i in range(2, 4):
            wait(driver, PLAYING)
            prompts.append(vote(driver, answers[i]))
        wait(driver, "return document.getElementById('done').style.display === 'block';")
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)
    assert (tmp_path / "page.png").read_bytes()[:4] == b"\x89PNG"
    votes = read_votes(db)
    assert [v["prompt"] for v in votes] == prompts and len(set(prompts)) == 4
    assert all(v["rater"] == "carol" for v in votes)
    for v, expected in zip(votes, answers):
        assert {q: v[q] for q in expected} == expected
    rates = win_rates(votes)
    assert all(rates[q]["votes"] == 4 for q in rates)
    from tools import human_eval
    assert human_eval.main(["report", "--db", str(db), "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "win_rates.json").read_text())["votes"] == 4
    if os.environ.get("KVIDEO_SCREENSHOT"):  # docs/human_eval.png is made this way
        shutil.copy(tmp_path / "page.png", os.environ["KVIDEO_SCREENSHOT"])
