"""Specification of the console's routes over HTTP: who may read and do what, and bad input.

Every refused request must leave the store as it was; every action, refused or done, is in the
audit log with its user.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import httpx
import pytest

from node.core.logging import uid_key
from tests.node.web.conftest import (
    ARTERIAL,
    OTHER_SERIES,
    OTHER_STUDY_UID,
    PORTAL,
    STUDY_UID,
    Console,
    csrf_of,
    make_console,
)

# -- without a login -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/studies", "/studies/abc", "/models", "/audit-log"])
def test_pages_send_a_visitor_without_login_to_the_login_page(console: Console, path: str) -> None:
    answer = console.client().get(path)
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/login?next={path}"


@pytest.mark.parametrize("path", ["/api/studies", "/api/overview", "/api/me", "/api/audit-log"])
def test_the_api_answers_401_without_a_login(console: Console, path: str) -> None:
    answer = console.client().get(path)
    assert answer.status_code == 401
    assert answer.json()["error"] == "not_logged_in"
    assert "WWW-Authenticate" in answer.headers


def test_an_action_without_a_login_changes_nothing(console: Console) -> None:
    jobs = console.store.list_jobs(100)
    answer = console.client().post(f"/studies/{console.key}/reprocess", data={})
    assert answer.status_code == 303 and answer.headers["location"].startswith("/login")
    assert console.store.list_jobs(100) == jobs


# -- logging in ------------------------------------------------------------------------------


def test_a_login_sets_an_http_only_strict_cookie_and_lands_on_the_page_asked_for(
    tmp_path: Path,
) -> None:
    for console in make_console(tmp_path, secure_cookies=True):
        client = console.client()
        form = client.get("/login?next=/studies")
        # httpx keeps Secure cookies from plain http to itself, as it should; a browser on
        # loopback sends them (tests/node/web/test_browser.py).
        csrf_cookie = form.cookies["mvi_csrf"]
        answer = client.post(
            "/login",
            data={
                "username": "vera",
                "password": "viewer-password-1",
                "csrf_token": csrf_of(form),
                "next": "/studies",
            },
            headers={"Cookie": f"mvi_csrf={csrf_cookie}"},
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/studies"
        cookie = answer.headers["set-cookie"].lower()
        assert "mvi_session=" in cookie
        assert "httponly" in cookie and "samesite=strict" in cookie and "secure" in cookie


def test_login_never_redirects_off_the_site(console: Console) -> None:
    client = console.client()
    token = csrf_of(client.get("/login"))
    answer = client.post(
        "/login",
        data={
            "username": "vera",
            "password": "viewer-password-1",
            "csrf_token": token,
            "next": "//evil.example/",
        },
    )
    assert answer.headers["location"] == "/"


def test_a_wrong_password_is_refused_and_logged_without_the_password(
    console: Console, capsys: pytest.CaptureFixture[str]
) -> None:
    client = console.client()
    answer = console.try_login(client, "vera", "not-her-password")
    assert answer.status_code == 401
    assert "wrong user name or password" in answer.text
    assert "mvi_session" not in answer.headers.get("set-cookie", "")
    assert client.get("/api/me").status_code == 401
    entry = console.store.accounts().audit_entries(1)[0]
    assert (entry.action, entry.target, entry.outcome) == ("login", "vera", "failed")
    logged = capsys.readouterr()
    # The console's own lines (a traceback elsewhere in the output may quote this test).
    lines = [line for line in (logged.out + logged.err).splitlines() if "console" in line]
    assert any("console login failed" in line for line in lines)
    assert not any("not-her-password" in line for line in lines)
    assert "not-her-password" not in str(entry)


def test_an_unknown_user_gets_the_same_answer_as_a_wrong_password(console: Console) -> None:
    answer = console.try_login(console.client(), "nobody", "whatever-password")
    assert answer.status_code == 401 and "wrong user name or password" in answer.text


def test_failed_logins_are_rate_limited_per_user_name(console: Console) -> None:
    limit = console.settings.web.login_attempts
    for _ in range(limit):
        assert console.try_login(console.client(), "otto", "guess").status_code == 401
    # Now even the right password waits: the limit is on the name, from any address.
    blocked = console.try_login(console.client(), "otto", "operator-password-1")
    assert blocked.status_code == 429
    assert int(blocked.headers["retry-after"]) > 0
    assert console.store.accounts().audit_entries(1)[0].outcome == "rate_limited"
    # Another account is not locked by otto's failures.
    assert console.try_login(console.client(), "vera", "viewer-password-1").status_code == 303


def test_a_login_without_or_with_a_forged_csrf_token_is_refused(console: Console) -> None:
    client = console.client()
    client.get("/login")
    for token in ("", "0" * 64):
        answer = client.post(
            "/login",
            data={"username": "vera", "password": "viewer-password-1", "csrf_token": token},
        )
        assert answer.status_code == 403
        assert "security token" in answer.text


def test_logout_ends_the_login(console: Console) -> None:
    client = console.login("vera")
    token = csrf_of(client.get("/"))
    assert client.post("/logout", data={"csrf_token": token}).status_code == 303
    assert client.get("/api/me").status_code == 401


# -- reading ---------------------------------------------------------------------------------


def test_the_overview_shows_checks_counts_outbox_and_throughput(console: Console) -> None:
    client = console.login("vera")
    data = client.get("/api/overview").json()
    assert {c["name"] for c in data["checks"]} >= {"store", "disk"}
    assert data["jobs"]["queued"] == 1
    assert data["outbox"]["by_state"] == {"failed": 1, "sent": 1}
    assert data["outbox"]["waiting"] == 1
    assert data["last_24h"] == {"results": 1, "by_status": {"needs_review": 1}}
    page = client.get("/")
    assert page.status_code == 200 and 'id="outbox-waiting">1<' in page.text
    # The live part is what htmx fetches every few seconds.
    live = client.get("/", headers={"HX-Request": "true"})
    assert live.status_code == 200 and "<html" not in live.text and "outbox-waiting" in live.text


def test_a_study_page_shows_series_checks_jobs_deliveries_and_the_viewer_link(
    console: Console,
) -> None:
    client = console.login("otto")
    data = client.get(f"/api/studies/{console.key}").json()
    assert [s["number"] for s in data["series"]] == [3, 5]
    assert {s["series_uid"]: s["use"] for s in data["series"]} == {
        ARTERIAL: "arterial",
        PORTAL: "portal venous",
    }
    gate = data["result"]["gates"][1]
    assert gate["passed"] is False and gate["figures"] == {"tumor_components": 5}
    assert data["result"]["mvi_probability"] is None
    assert [j["state"] for j in data["jobs"]] == ["queued", "needs_review"]
    assert {o["state"]: o["last_status"] for o in data["outbox"]} == {
        "failed": "0xA700 Out of resources",
        "sent": "0x0000",
    }
    assert data["viewer_url"].endswith(f"StudyInstanceUIDs={data['study_uid']}")
    page = client.get(f"/studies/{console.key}").text
    assert "FAILED: 5 tumor components (at most 3)" in page
    assert 'id="viewer-link"' in page
    assert uid_key(ARTERIAL) in page


def test_identifiers_only_for_the_roles_allowed_to_see_them(console: Console) -> None:
    as_viewer = console.login("vera").get("/api/studies").json()
    as_operator = console.login("otto").get("/api/studies").json()
    assert "patient_name" not in as_viewer[0]
    assert as_operator[0]["patient_name"] == "Doe^Jane"
    assert "Doe^Jane" not in console.login("vera").get(f"/studies/{console.key}").text
    assert "Doe^Jane" in console.login("otto").get(f"/studies/{console.key}").text


def test_studies_filter_by_state_reason_and_date(console: Console) -> None:
    client = console.login("vera")
    keys = lambda query: [s["study_key"] for s in client.get(f"/api/studies?{query}").json()]  # noqa: E731
    assert set(keys("")) == {console.key, console.other_key}
    assert keys("state=queued") == [console.key]
    assert keys("state=receiving") == [console.other_key]
    console.store.set_study_state(OTHER_STUDY_UID, "needs_review", "no arterial series found")
    assert keys("reason=ARTERIAL+series") == [console.other_key]
    assert keys("state=needs_review&reason=portal") == []
    assert keys("since=2000-01-01") and keys("until=2000-01-01") == []
    bad = client.get("/api/studies?state=lost")
    assert bad.status_code == 400 and "state 'lost'" in bad.json()["detail"]
    assert client.get("/api/studies?since=yesterday").status_code == 400


def test_an_unknown_study_key_is_a_404_page_and_a_404_json(console: Console) -> None:
    client = console.login("vera")
    page = client.get("/studies/0123456789abcdef")
    assert page.status_code == 404 and "no study" in page.text
    assert client.get("/api/studies/0123456789abcdef").json()["error"] == "not_found"
    # A UID is not a key: URLs carry keys only.
    assert client.get(f"/api/studies/{OTHER_SERIES[:-2]}").status_code == 404


def test_pages_forbid_framing_caching_and_foreign_scripts(console: Console) -> None:
    answer = console.login("vera").get("/")
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["cache-control"] == "no-store"
    assert "script-src 'self'" in answer.headers["content-security-policy"]


def test_the_audit_log_is_for_admins_only(console: Console) -> None:
    assert console.login("otto").get("/audit-log").status_code == 403
    assert console.login("otto").get("/api/audit-log").status_code == 403
    entries = console.login("ada").get("/api/audit-log").json()
    assert any(e["action"] == "forbidden" and e["user"] == "otto" for e in entries)


def test_reports_are_listed_and_served_but_nothing_outside_their_folder(
    console: Console,
) -> None:
    folder = console.settings.node.data_dir / "reports" / "2026-q4"
    folder.mkdir(parents=True)
    (folder / "report.html").write_text("<h1>audit</h1>")
    (console.settings.node.data_dir / "secret.txt").write_text("no")
    client = console.login("vera")
    assert [r["name"] for r in client.get("/api/reports").json()] == ["2026-q4"]
    assert client.get("/reports/2026-q4/report.html").text == "<h1>audit</h1>"
    for path in ("/reports/2026-q4/..%2Fsecret.txt", "/reports/..%2F/secret.txt"):
        assert client.get(path).status_code == 404


# -- actions ---------------------------------------------------------------------------------


def post(client: httpx.Client, console: Console, action: str, **data: object) -> httpx.Response:
    token = csrf_of(client.get(f"/studies/{console.key}"))
    return client.post(f"/studies/{console.key}/{action}", data={"csrf_token": token, **data})


def test_an_operator_reprocesses_with_the_series_chosen(console: Console) -> None:
    client = console.login("otto")
    answer = post(client, console, "reprocess", arterial=PORTAL, portal_venous=ARTERIAL)
    assert answer.status_code == 303
    newest = console.store.list_jobs(1)[0]
    assert newest.pairing == {"forced": True, "arterial": PORTAL, "portal_venous": ARTERIAL}
    assert "job 3 queued with the chosen series" in client.get(answer.headers["location"]).text
    entry = console.store.accounts().audit_entries(1)[0]
    assert (entry.user_name, entry.action, entry.outcome) == ("otto", "reprocess", "ok")
    assert entry.target == console.key


def test_a_viewer_may_not_reprocess(console: Console) -> None:
    jobs = console.store.list_jobs(100)
    client = console.login("vera")
    token = csrf_of(client.get(f"/studies/{console.key}"))
    answer = client.post(f"/studies/{console.key}/reprocess", data={"csrf_token": token})
    assert answer.status_code == 403 and "operator role" in answer.text
    assert console.store.list_jobs(100) == jobs
    entry = console.store.accounts().audit_entries(1)[0]
    assert (entry.user_name, entry.action, entry.outcome) == ("vera", "forbidden", "refused")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ({"arterial": OTHER_SERIES, "portal_venous": PORTAL}, "is not a CT series of study"),
        ({"arterial": ARTERIAL, "portal_venous": ARTERIAL}, "are the same"),
        ({"arterial": ARTERIAL}, "choose both"),
    ],
)
def test_a_reprocess_with_wrong_series_is_refused_and_changes_nothing(
    console: Console, data: dict[str, str], why: str
) -> None:
    jobs = console.store.list_jobs(100)
    answer = post(console.login("otto"), console, "reprocess", **data)
    assert answer.status_code == 400 and why in answer.text
    assert console.store.list_jobs(100) == jobs
    assert console.store.accounts().audit_entries(1)[0].outcome == "refused"


def test_a_post_without_or_with_a_forged_csrf_token_changes_nothing(console: Console) -> None:
    jobs = console.store.list_jobs(100)
    client = console.login("otto")
    for data in ({}, {"csrf_token": "f" * 64}):
        answer = client.post(f"/studies/{console.key}/reprocess", data=data)
        assert answer.status_code == 403
    # Another user's token does not fit this login either.
    other = console.login("ada")
    token = csrf_of(other.get("/"))
    answer = client.post(f"/studies/{console.key}/reprocess", data={"csrf_token": token})
    assert answer.status_code == 403
    assert console.store.list_jobs(100) == jobs


def test_a_form_from_another_site_is_refused(console: Console) -> None:
    client = console.login("otto")
    token = csrf_of(client.get("/"))
    answer = client.post(
        f"/studies/{console.key}/reprocess",
        data={"csrf_token": token},
        headers={"Origin": "https://evil.example"},
    )
    assert answer.status_code == 403 and "another site" in answer.text


def test_an_action_on_an_unknown_study_is_a_404(console: Console) -> None:
    client = console.login("otto")
    token = csrf_of(client.get("/"))
    answer = client.post("/studies/0123456789abcdef/reprocess", data={"csrf_token": token})
    assert answer.status_code == 404


def test_an_operator_cancels_a_queued_job_of_the_study_only(console: Console) -> None:
    client = console.login("otto")
    finished = next(j for j in console.store.list_jobs(100) if j.state == "needs_review")
    assert post(client, console, "cancel", job_id=finished.id).status_code == 409
    assert post(client, console, "cancel", job_id="x").status_code == 400
    assert post(client, console, "cancel", job_id=99999).status_code == 400
    assert post(client, console, "cancel", job_id=console.queued_job).status_code == 303
    states = {j.id: j.state for j in console.store.list_jobs(100)}
    assert states[console.queued_job] == "cancelled" and states[finished.id] == "needs_review"


def test_an_operator_retries_the_failed_deliveries_of_the_study(console: Console) -> None:
    client = console.login("otto")
    # A delivered item is not a failed one: refused, nothing queued.
    refused = post(client, console, "retry", outbox_id=console.sent_item)
    assert refused.status_code == 400
    states = {o.id: o.state for o in console.store.list_outbox(include_sent=True)}
    assert states[console.failed_item] == "failed"
    assert post(client, console, "retry").status_code == 303
    states = {o.id: o.state for o in console.store.list_outbox(include_sent=True)}
    assert states == {console.failed_item: "pending", console.sent_item: "sent"}
    assert post(client, console, "retry").status_code == 409  # nothing failed any more


def test_an_action_asked_for_as_json_answers_json(console: Console) -> None:
    client = console.login("otto")
    token = csrf_of(client.get("/"))
    answer = client.post(
        f"/studies/{console.key}/reprocess",
        headers={"Accept": "application/json", "X-CSRF-Token": token},
    )
    assert answer.status_code == 200 and answer.json()["ok"] is True
    bad = client.post(
        f"/studies/{console.key}/reprocess",
        data={"arterial": OTHER_SERIES, "portal_venous": PORTAL},
        headers={"Accept": "application/json", "X-CSRF-Token": token},
    )
    assert bad.status_code == 400 and bad.json()["error"] == "bad_series"


# -- single sign-on --------------------------------------------------------------------------


def test_a_trusted_proxy_names_the_user_in_its_header(tmp_path: Path) -> None:
    for console in make_console(
        tmp_path, trusted_user_header="X-Remote-User", trusted_proxies=["127.0.0.0/8"]
    ):
        client = console.client()
        me = client.get("/api/me", headers={"X-Remote-User": "otto"})
        assert me.json() == {"name": "otto", "role": "operator", "via": "header"}
        unknown = client.get("/api/me", headers={"X-Remote-User": "mallory"})
        assert unknown.status_code == 403 and unknown.json()["error"] == "unknown_account"
        # Forms still need their token under single sign-on.
        page = client.get(f"/studies/{console.key}", headers={"X-Remote-User": "otto"})
        refused = client.post(
            f"/studies/{console.key}/reprocess", headers={"X-Remote-User": "otto"}
        )
        assert refused.status_code == 403
        done = client.post(
            f"/studies/{console.key}/reprocess",
            data={"csrf_token": csrf_of(page)},
            headers={"X-Remote-User": "otto"},
        )
        assert done.status_code == 303


def test_the_header_is_ignored_from_an_address_that_is_not_a_trusted_proxy(
    tmp_path: Path,
) -> None:
    for console in make_console(
        tmp_path, trusted_user_header="X-Remote-User", trusted_proxies=["10.9.8.7"]
    ):
        answer = console.client().get("/api/me", headers={"X-Remote-User": "ada"})
        assert answer.status_code == 401


# -- hostile and broken input ----------------------------------------------------------------


def test_hostile_values_get_a_clear_answer_not_a_500(console: Console) -> None:
    client = console.login("otto")
    token = csrf_of(client.get("/"))
    for job in ("²", "9" * 5000):
        assert post(client, console, "cancel", job_id=job).status_code == 400
        assert post(client, console, "retry", outbox_id=job).status_code == 400
    assert client.get("/api/studies?until=9999-12-31").status_code == 200
    assert client.get(f"/api/studies/{'a' * 300}").status_code == 404
    assert client.get("/studies/%00").status_code == 404
    long_key = client.post(f"/studies/{'a' * 300}/reprocess", data={"csrf_token": token})
    assert long_key.status_code == 404
    viewer = console.login("vera")
    refused = viewer.post(f"/studies/{'a' * 300}/reprocess", data={"csrf_token": token})
    assert refused.status_code == 403
    stranger = console.client()
    login_token = csrf_of(stranger.get("/login"))
    for name in ("a\x00b", "x" * 5000):
        answer = stranger.post(
            "/login", data={"username": name, "password": "pw", "csrf_token": login_token}
        )
        assert answer.status_code == 401
    huge = stranger.post("/login", data={"csrf_token": login_token, "username": "x" * 100_000})
    assert huge.status_code == 400


def test_a_broken_sr_or_sc_file_is_shown_as_such(console: Console) -> None:
    from node.jobs.runner import results_folder

    stored = console.store.latest_result(STUDY_UID)
    assert stored is not None
    job = stored.job_id
    # The recorded result names objects whose files are broken.
    result = stored.result.model_copy(update={"outputs": {"sr": "sr.dcm", "sc": "sc.dcm"}})
    console.store.record_result(job, STUDY_UID, result, attempt=stored.attempt)
    folder = results_folder(console.settings, STUDY_UID, job, stored.attempt)
    folder.mkdir(parents=True)
    (folder / "sr.dcm").write_bytes(b"not DICOM at all")
    (folder / "sc.dcm").write_bytes(b"")
    client = console.login("vera")
    page = client.get(f"/studies/{console.key}")
    assert page.status_code == 200 and "SR not readable" in page.text
    assert client.get(f"/studies/{console.key}/sc.png").status_code == 404


def test_an_unreachable_or_strange_healthz_is_a_failed_check(tmp_path: Path) -> None:
    import http.server
    import threading

    class NotJson(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"<html>nope</html>")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotJson)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for console in make_console(tmp_path, enabled=True):
            settings = console.settings.model_copy(
                update={
                    "metrics": console.settings.metrics.model_copy(
                        update={"port": server.server_port}
                    )
                }
            )
            from node.web import views

            checks = views._run_health(settings)
            (receiver,) = [c for c in checks if c["name"] == "receiver"]
            assert receiver["ok"] is False
    finally:
        server.shutdown()


def test_a_polling_panel_does_not_keep_a_login_alive_and_is_sent_to_the_login_page(
    console: Console,
) -> None:
    client = console.login("vera")
    poll = {"HX-Request": "true", "HX-Current-URL": f"{console.url}/requery"}

    def last_seen() -> str:
        with sqlite3.connect(console.store.url.removeprefix("sqlite:///")) as db:
            return str(db.execute("SELECT last_seen_at FROM web_sessions").fetchone()[0])

    seen = last_seen()
    assert client.get("/requery", headers=poll).status_code == 200
    assert last_seen() == seen, "a poll restarted the idle clock"
    assert client.get("/requery").status_code == 200
    assert last_seen() > seen, "the user's own request did"
    # Every login is over (an expiry sweep with no idle time left).
    over = dt.timedelta(0)
    assert console.store.accounts().session_user("-", idle=over, lifetime=over) is None
    expired = client.get("/requery", headers=poll)
    assert expired.status_code == 401
    assert expired.headers["hx-redirect"] == "/login?next=/requery"


def test_an_action_posted_after_the_login_ended_returns_to_its_study(console: Console) -> None:
    answer = console.client().post(f"/studies/{console.key}/cancel", data={})
    assert answer.headers["location"] == f"/login?next=/studies/{console.key}"


def test_the_reprocess_form_lets_the_node_choose_unless_the_operator_picks(
    console: Console,
) -> None:
    page = console.login("otto").get(f"/studies/{console.key}").text
    form = page.split('id="reprocess"', 1)[1].split("</form>", 1)[0]
    assert " selected" not in form
    assert "used as arterial now" in form and "used as portal venous now" in form


def test_a_done_message_is_one_of_the_node_s_own(console: Console) -> None:
    client = console.login("vera")
    forged = client.get(f"/studies/{console.key}?done=Call+1-800-SCAM&n=1").text
    assert "1-800-SCAM" not in forged
    assert "job 7 cancelled" in client.get(f"/studies/{console.key}?done=cancel&n=7").text


def test_behind_a_trusted_proxy_the_forwarded_host_is_this_site(tmp_path: Path) -> None:
    for console in make_console(
        tmp_path, trusted_user_header="X-Remote-User", trusted_proxies=["127.0.0.1"]
    ):
        client = console.client()
        headers = {"X-Remote-User": "otto", "X-Forwarded-Host": "mvi.hospital.example"}
        page = client.get(f"/studies/{console.key}", headers=headers)
        answer = client.post(
            f"/studies/{console.key}/reprocess",
            data={"csrf_token": csrf_of(page)},
            headers={**headers, "Origin": "https://mvi.hospital.example"},
        )
        assert answer.status_code == 303
        foreign = client.post(
            f"/studies/{console.key}/reprocess",
            data={"csrf_token": csrf_of(page)},
            headers={**headers, "Origin": "https://evil.example"},
        )
        assert foreign.status_code == 403
