"""The web page at /, driven in headless Chromium as a person would use it: a chat that streams, and the live
pipeline view beside it. Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them) and selenium;
skips without them. The screenshot lands in $SERVE_TEST_ARTIFACTS (default tests/artifacts/web.png)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import TINY_NAME
from tests.server import Server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("SERVE_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
QUESTION = "Tell me about queues."
PIPELINE_ORDER = ["api", "tokenizer", "scheduler", "worker-0", "detokenizer", "launcher"]


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path given too, selenium-manager never runs
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, message: str, timeout: float = 15.0):
    """Until condition(driver) is truthy (checked every 0.1 s); its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message)


def js(driver, expression: str):
    return driver.execute_script(f"return {expression};")


def last_answer(driver) -> dict | None:
    """The last assistant message: text, chunks it arrived in, whether done, how it finished, response id."""
    return js(driver, """(() => {
        const els = document.querySelectorAll("#transcript .msg.assistant");
        const el = els[els.length - 1];
        return el && {text: el.querySelector(".text").textContent, chunks: Number(el.dataset.chunks),
                      done: el.dataset.done === "1", finish: el.dataset.finish, id: el.dataset.id || null};
    })()""")


def finished_answer(driver) -> dict | None:
    answer = last_answer(driver)
    return answer if answer and answer["done"] else None


def auth_message(driver) -> str | None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "auth-msg")
    return box.text if box.is_displayed() else None


def processes_shown(driver) -> list[tuple[str, int | None, str]]:
    return js(driver, """[...document.querySelectorAll("#processes tbody tr")].map(
        tr => [tr.id.slice(5), tr.dataset.pid ? Number(tr.dataset.pid) : null, tr.dataset.state])""")


def say(driver, text: str, max_tokens: int) -> dict:
    """Type a message and send it; the new (empty) assistant message is then in the transcript."""
    from selenium.webdriver.common.by import By

    before = js(driver, 'document.querySelectorAll("#transcript .msg").length')
    for field, value in [("max-tokens", max_tokens), ("temperature", 0)]:
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))
    driver.find_element(By.ID, "prompt").send_keys(text)
    driver.find_element(By.ID, "send").click()
    wait(driver, lambda d: js(d, 'document.querySelectorAll("#transcript .msg").length') == before + 2,
         "the message and an answer did not appear in the transcript")


def logged_prompt_tokens(server, rid: str) -> int:
    pattern = rf"request {re.escape(rid)}: (\d+) prompt \+ \d+ completion tokens"
    return int(re.search(pattern, server.read_log()).group(1))


def test_chat_streams_and_the_pipeline_view_follows(browser, tiny_server):
    from PIL import Image
    from selenium.webdriver.common.by import By

    banner = dict(re.findall(r"serve:(\S+)\s+pid (\d+)", tiny_server.read_log()))
    pids = {name: int(pid) for name, pid in banner.items()}
    assert sorted(pids) == sorted(PIPELINE_ORDER) and pids["launcher"] == tiny_server.proc.pid, banner
    browser.get(f"{tiny_server.url}/")

    # The pipeline view: every process in pipeline order, with the pids the banner printed.
    wait(browser, lambda d: [[n, pid] for n, pid, _ in processes_shown(d)] == [[n, pids[n]] for n in PIPELINE_ORDER],
         f"the pipeline view never showed {pids}")
    assert js(browser, '[...document.querySelectorAll("#model option")].map(o => o.value)') == [TINY_NAME]
    total_before = float(wait(browser, lambda d: js(d, 'document.getElementById("tokens-total").dataset.value'),
                              "no token count shown"))

    # Two turns: the answer streams in token by token, and the second turn carries the first. (The tiny model's
    # greedy answer to some prompts is bytes that only make UTF-8 at the end, hence this prompt.)
    say(browser, QUESTION, max_tokens=24)
    first = wait(browser, finished_answer, "the first answer never finished")
    assert first["finish"] == "length" and first["chunks"] > 10 and first["text"], first
    reference = tiny_server.client().chat.completions.create(
        model=TINY_NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0)
    assert first["text"] == reference.choices[0].message.content  # chunks joined in order, none lost
    assert re.fullmatch(r"\d+ ms|[\d.]+ s", browser.find_element(By.ID, "ttft").text)
    assert float(browser.find_element(By.ID, "answer-tps").text) > 0

    say(browser, "And again?", max_tokens=8)
    second = wait(browser, finished_answer, "the second answer never finished")
    assert second["finish"] == "length" and second["text"], second
    conversation = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first["text"]},
                    {"role": "user", "content": "And again?"}]
    expected = tiny_server.http().post("/tokenize", json={"model": TINY_NAME, "messages": conversation}).json()["count"]
    wait(browser, lambda d: second["id"] in tiny_server.read_log(), "the second request was not logged", timeout=5)
    assert logged_prompt_tokens(tiny_server, second["id"]) == expected

    # The view follows: the token counter reaches the server's count, the chart saw tokens/s, the stamp moves.
    generated = httpx.get(f"{tiny_server.url}/pipeline").json()["tokens"]["generation"]
    assert generated >= total_before + 24 + 8
    wait(browser, lambda d: float(js(d, 'document.getElementById("tokens-total").dataset.value')) == generated,
         f"the token counter never reached {generated}")
    assert float(js(browser, 'document.getElementById("tokens-chart").dataset.peak')) > 0
    stamp, polls = browser.find_element(By.ID, "updated").text, int(js(browser, '$("pipeline").dataset.polls'))
    assert re.fullmatch(r"updated \d\d:\d\d:\d\d", stamp)
    wait(browser, lambda d: d.find_element(By.ID, "updated").text != stamp
         and int(js(d, '$("pipeline").dataset.polls')) > polls, "the pipeline view stopped refreshing", timeout=5)
    hops = js(browser, '[...document.querySelectorAll("#hops tbody tr")].map(tr => [...tr.cells].map(c => c.textContent))')
    assert [h[0] for h in hops] == ["api->tokenizer", "tokenizer->scheduler", "scheduler->workers", "rank0->scheduler",
                                    "scheduler->detokenizer", "detokenizer->api"]
    assert all(re.fullmatch(r"[\d.]+ (µs|ms|s)", h[3]) for h in hops), hops  # every hop carried messages: a p50

    # A frozen stage is highlighted; a request stuck behind it shows as in flight, and Stop ends it.
    detokenizer = pids["detokenizer"]
    os.kill(detokenizer, signal.SIGSTOP)
    try:
        say(browser, "Are you there?", max_tokens=8)
        wait(browser, lambda d: js(d, """(() => { const tr = document.getElementById("proc-detokenizer");
                return tr.dataset.state === "stopped" && tr.classList.contains("bad")
                    && tr.querySelector(".state.bad") !== null && $("q-in-flight").textContent === "1"; })()"""),
             "the stopped detokenizer and the request in flight did not show")
        browser.find_element(By.ID, "stop").click()
        stopped = wait(browser, finished_answer, "Stop did not end the answer")
        assert stopped["finish"] == "stopped" and browser.find_element(By.ID, "send").is_enabled(), stopped
    finally:
        os.kill(detokenizer, signal.SIGCONT)
    wait(browser, lambda d: js(d, """document.getElementById("proc-detokenizer").dataset.state !== "stopped"
            && $("q-in-flight").textContent === "0" && $("q-running").textContent === "0" """),
         "the view did not come back to an idle, healthy pipeline")

    # Nothing but this server was ever asked for (no CDN, no fonts), and the page logged no error.
    requests = [json.loads(e["message"])["message"]["params"]["request"]["url"] for e in browser.get_log("performance")
                if '"Network.requestWillBeSent"' in e["message"]]
    paths = {urlparse(u).path for u in requests}
    assert {"/", "/v1/models", "/pipeline", "/v1/chat/completions"} <= paths, requests
    outside = [u for u in requests if urlparse(u).scheme != "data" and urlparse(u).netloc != f"127.0.0.1:{tiny_server.port}"]
    assert not outside, outside
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "web.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as image:
        assert image.size[0] >= 1000 and image.size[1] >= 700, image.size
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # text, tables, colours: not a blank page


def test_json_mode_answers_with_json_that_fits_the_schema(browser, tiny_server):
    from selenium.webdriver.common.by import By

    browser.get(f"{tiny_server.url}/")
    wait(browser, lambda d: js(d, '$("model").value') == TINY_NAME, "the model list never loaded")
    assert not browser.find_element(By.ID, "json-schema").is_displayed()
    browser.find_element(By.ID, "json-mode").click()
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "count"], "additionalProperties": False}
    box = browser.find_element(By.ID, "json-schema")
    assert box.is_displayed()
    box.send_keys(json.dumps(schema))
    say(browser, "Yes or no?", max_tokens=60)
    answer = wait(browser, finished_answer, "the JSON answer never finished")
    value = json.loads(answer["text"])
    assert answer["finish"] == "stop" and value["answer"] in ("yes", "no") and 0 <= value["count"] <= 9, answer
    # A schema that does not parse is said so, and nothing is sent.
    box.clear()
    box.send_keys("{not json")
    say(browser, "Again?", max_tokens=10)
    wait(browser, lambda d: "schema does not parse" in js(d, '[...document.querySelectorAll("#transcript .msg.error")].map(e => e.textContent).join(" ")'),
         "a bad schema was not called out")


def test_the_page_asks_for_the_api_key_and_keeps_it(browser, tiny_model):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with Server("--model", str(tiny_model), "--served-name", TINY_NAME, "--dtype", "float32",
                "--api-key", "sesame") as server:
        browser.get(f"{server.url}/")
        message = wait(browser, auth_message, "no message about the missing API key")
        assert "401" in message and "--api-key" in message and js(browser, '$("pipeline").dataset.polls') == "0"

        key = browser.find_element(By.ID, "api-key")
        key.send_keys("wrong" + Keys.TAB)
        wait(browser, lambda d: "refused" in (auth_message(d) or ""), "a wrong key was not called out")
        key.clear()
        key.send_keys("sesame" + Keys.TAB)
        wait(browser, lambda d: auth_message(d) is None
             and int(js(d, '$("pipeline").dataset.polls')) > 0
             and js(d, '$("model").value') == TINY_NAME, "the right key did not open the page")

        browser.refresh()  # the key is remembered
        wait(browser, lambda d: int(js(d, '$("pipeline").dataset.polls')) > 0, "the stored key was not used")
        assert browser.find_element(By.ID, "api-key").get_attribute("value") == "sesame"
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
        assert not errors, errors  # the 401s above are logged as failed loads; nothing else may be
