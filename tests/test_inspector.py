"""The inspector page in a real browser (Debian's headless Chromium, driven by Selenium):
it loads, a user lookup renders the user's recommendations as the API answers them, an
item lookup its attributes and similar items; its data calls need the admin token."""

import json
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from service.testing.redis_servers import free_port
from tests.test_end_to_end import BIN, wait_ready

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
TOKEN = "inspector-admin-token-for-tests"
SCREENSHOT = os.environ.get("RECSYS_INSPECTOR_SCREENSHOT")  # docs/inspector.png is made so

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (scripts/test.sh installs them)",
)


@pytest.fixture(scope="module")
def inspector(artifact_root):
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "recsys"), "serve", "--artifacts", str(artifact_root), "--host", "127.0.0.1"]
        + ["--port", str(port), "--grpc-port", "0"],
        env=dict(os.environ, RECSYS_ADMIN_TOKEN=TOKEN, RECSYS_INSPECTOR="true"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        process.stdout.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1200,1400",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_the_data_calls_need_the_token(inspector):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{inspector}/inspector/api/user/1", timeout=10)
    assert refused.value.code == 401
    refused.value.close()
    with urllib.request.urlopen(f"{inspector}/inspector", timeout=10) as page:
        assert b"recsys inspector" in page.read()  # the page itself holds no data


def test_a_user_lookup_renders_their_recommendations_and_an_item_lookup_its_details(
    inspector, browser, known_user, bundle
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{inspector}/inspector")
    assert browser.title == "recsys inspector"
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "user-id").send_keys(str(known_user))
    browser.find_element(By.ID, "user-lookup").click()
    wait = WebDriverWait(browser, 15)
    table = wait.until(shown.presence_of_element_located((By.ID, "recommendations")))
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    shown_ids = [int(row.find_elements(By.TAG_NAME, "td")[1].text) for row in rows]
    answer = post(f"{inspector}/v1/recommend", {"user_id": known_user, "k": 10})
    assert shown_ids == [item["item_id"] for item in answer["items"]]
    sources = {row.find_elements(By.TAG_NAME, "td")[4].text for row in rows}
    assert sources <= {"two_tower", "knn_embed", "item_to_item", "popular"} and sources
    recent = browser.find_element(By.ID, "recent").find_elements(By.CSS_SELECTOR, "tbody tr")
    assert int(recent[0].text) == int(bundle.histories.get(known_user)[-1])
    assert bundle.version in browser.find_element(By.ID, "info").text
    if SCREENSHOT:
        browser.save_screenshot(SCREENSHOT)

    item = shown_ids[0]
    browser.find_element(By.ID, "item-id").send_keys(str(item))
    browser.find_element(By.ID, "item-lookup").click()
    similar = wait.until(shown.presence_of_element_located((By.ID, "similar")))
    similar_ids = [
        int(row.find_elements(By.TAG_NAME, "td")[0].text)
        for row in similar.find_elements(By.CSS_SELECTOR, "tbody tr")
    ]
    expected = post(f"{inspector}/v1/similar-items", {"item_id": item, "k": 10})
    assert similar_ids == [i["item_id"] for i in expected["items"]]
    attributes = browser.find_element(By.ID, "attributes").text
    assert "category" in attributes and "shown" in browser.find_element(By.ID, "item").text
