"""The console in a real browser: Debian's chromium, driven by playwright, against a real node.

A node (`mvi-node serve`, console on) receives a phantom study from DCMTK's storescu and scores
it; accounts are made with `mvi-node users add`, the password on standard input. Then, as a
radiologist and an operator would: a visitor is sent to the login page, the operator logs in,
finds the scored study, opens it, sees its Secondary Capture and reprocesses it with the series
swapped; a viewer does not get the form, and the node refuses the action when a viewer's page
posts it anyway.

With ``MVI_SCREENSHOTS=DIR`` the test writes the screenshots in docs/ to DIR.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import require_tool
from tests.nodeproc import (
    NodeProcess,
    dcmtk_env,
    mvi_node_script,
    running_node,
    storescu_command,
    wait_for,
)
from tests.orthanc import free_port

PASSWORDS = {"otto": "operator-password-1", "vera": "viewer-password-1"}


@pytest.fixture(scope="module")
def scored(
    cohort_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[NodeProcess, str]]:
    """A node with its console, which has scored one study: (node, study key)."""
    from node.core.logging import study_key

    folder = cohort_factory(seed=95, seg=True, masks=True) / "study_0001"
    study_uid = str(
        pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    )
    workdir = tmp_path_factory.mktemp("console-node")
    web = {
        "enabled": True,
        "port": free_port(),
        "viewer_url": "https://ohif.example.org/viewer?StudyInstanceUIDs={study_uid}",
    }
    # Metrics on: the overview shows the receiving process's own checks from its /healthz.
    extra = {"web": web, "metrics": {"port": free_port()}}
    with running_node(workdir, extra=extra) as node:
        for name, role in (("otto", "operator"), ("vera", "viewer")):
            added = subprocess.run(
                [mvi_node_script(), "users", "add", name, "--role", role],
                input=PASSWORDS[name] + "\n",
                env={**os.environ, "MVI_CONFIG": str(node.config_path)},
                capture_output=True,
                text=True,
                check=False,
            )
            assert added.returncode == 0, added.stderr
        sent = subprocess.run(
            storescu_command(node.port, folder),
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        assert sent.returncode == 0, sent.stderr
        store = node.store()

        def done() -> bool:
            row = store.study(study_uid)
            return row is not None and row.state == "done"

        wait_for(done, timeout=180)
        latest = store.latest_result(study_uid)
        assert latest is not None and latest.result.mvi_probability is not None
        yield node, study_key(study_uid)
        store.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    chromium = require_tool("chromium", "chromium")
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


def console_url(node: NodeProcess) -> str:
    return f"http://127.0.0.1:{node.settings.web.port}"


def log_in(page: Any, name: str) -> None:
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORDS[name])
    page.click("button[type=submit]")


def screenshot(page: Any, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("MVI_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)


def test_an_operator_logs_in_opens_a_scored_study_and_reprocesses_it(
    scored: tuple[NodeProcess, str], browser: Any, tmp_path: Path
) -> None:
    node, key = scored
    url = console_url(node)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()

    # Not logged in: the login page, which returns to the page asked for.
    page.goto(f"{url}/studies")
    assert page.url == f"{url}/login?next=/studies"
    screenshot(page, "console-login.png", tmp_path)
    log_in(page, "otto")
    page.wait_for_url(f"{url}/studies")
    cookie = next(c for c in context.cookies() if c["name"] == "mvi_session")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    row = page.locator("#studies tr", has_text=key)
    assert "done" in row.inner_text() and "%" in row.inner_text()

    page.goto(f"{url}/")
    assert page.locator("#whoami").inner_text() == "otto (operator)"
    assert page.locator("#results-24h").inner_text() == "1"
    checks = page.locator("table.checks").inner_text()
    assert "ae\tok" in checks and "store\tok" in checks
    screenshot(page, "console-overview.png", tmp_path)

    page.goto(f"{url}/studies")
    page.click(f"text={key}")
    page.wait_for_url(f"{url}/studies/{key}")
    assert page.locator("#result-status").inner_text() == "scored"
    assert page.locator("#mvi-probability").inner_text().endswith("%")
    image = page.locator("#sc-image")
    image.wait_for()
    page.wait_for_function("document.querySelector('#sc-image').complete")
    assert page.evaluate("document.querySelector('#sc-image').naturalWidth") > 100
    assert "Probability of microvascular invasion" in page.locator("#sr-tree").inner_text()
    assert (
        page.locator("#viewer-link")
        .get_attribute("href", timeout=1000)
        .startswith("https://ohif.example.org/viewer?StudyInstanceUIDs=")
    )
    screenshot(page, "console-study.png", tmp_path)

    # Reprocess with the two phases swapped, chosen from the study's own series.
    # Untouched, the form lets the node choose; the series used now are marked in it.
    assert page.locator("select[name=arterial]").input_value() == ""
    arterial = page.locator(
        "select[name=arterial] option", has_text="used as arterial now"
    ).get_attribute("value")
    portal_venous = page.locator(
        "select[name=portal_venous] option", has_text="used as portal venous now"
    ).get_attribute("value")
    assert arterial and portal_venous and arterial != portal_venous
    page.select_option("select[name=arterial]", portal_venous)
    page.select_option("select[name=portal_venous]", arterial)
    page.click("#reprocess button[type=submit]")
    page.wait_for_url(f"{url}/studies/{key}?done=*")
    assert "queued with the chosen series" in page.locator("#message").inner_text()
    store = node.store()
    job = store.list_jobs(1)[0]
    assert job.pairing == {"forced": True, "arterial": portal_venous, "portal_venous": arterial}
    store.close()
    context.close()


def test_a_viewer_reads_but_may_not_act(scored: tuple[NodeProcess, str], browser: Any) -> None:
    node, key = scored
    url = console_url(node)
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{url}/login")
    log_in(page, "vera")
    page.wait_for_url(f"{url}/")
    page.goto(f"{url}/studies/{key}")
    assert page.locator("#sc-image").count() == 1
    assert page.locator("#reprocess").count() == 0
    store = node.store()
    jobs = store.list_jobs(100)
    # The page's own token, posted anyway (a hand-made request): the node refuses it.
    status = page.evaluate(
        """async (key) => {
            const token = document.querySelector('input[name=csrf_token]').value;
            const body = new URLSearchParams({csrf_token: token});
            const answer = await fetch(`/studies/${key}/reprocess`, {method: 'POST', body});
            return answer.status;
        }""",
        key,
    )
    assert status == 403
    assert store.list_jobs(100) == jobs
    store.close()
    context.close()


def test_a_visitor_is_sent_to_the_login_page(scored: tuple[NodeProcess, str], browser: Any) -> None:
    node, key = scored
    url = console_url(node)
    page = browser.new_page()
    page.goto(f"{url}/studies/{key}")
    assert page.url.startswith(f"{url}/login?next=")
    assert page.locator("input[name=password]").count() == 1
    page.close()
