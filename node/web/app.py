"""The console's routes: pages (Jinja2, htmx for the live parts) and the same data under /api.

Every route asks :func:`identify` who is calling. Without a login a page answers 303 to
``/login`` and /api answers 401; a role too low for the route answers 403. Every POST carries
a CSRF token (:mod:`node.web.auth`); an action is checked completely (the study, its series,
the job, the outbox rows) before anything changes, and recorded in the audit log whatever its
outcome. Errors answer as a page or as JSON ``{"error": ..., "detail": ...}`` with the HTTP
status that says what kind of error it was; nothing about them is ever a 500 by design.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from node.core.logging import get_logger, study_key, uid_key
from node.core.settings import Settings
from node.store.database import STUDY_STATES, Store
from node.web import auth, views
from node.web.auth import CSRF_COOKIE, SESSION_COOKIE, LoginLimiter, Role, User

log = get_logger("node.web.app")

HERE = Path(__file__).resolve().parent
#: A job or outbox id in a form (ASCII digits: str.isdigit() also takes "²").
NUMBER = re.compile(r"[0-9]{1,18}")
#: Pages carry identifiers and results: nothing outside this origin, no framing, no caching.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
#: An audit report (report.html) has its own inline styles and images.
REPORT_CSP = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"

Handler = Callable[[Request], Response]
AsyncHandler = Callable[[Request], Awaitable[Response]]


class Refused(Exception):
    """An answer other than success: an HTTP status, a short code and a sentence."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


# -- who is calling --------------------------------------------------------------------------


def client_address(request: Request) -> str | None:
    """The caller's address (behind a trusted proxy: the address it forwarded for)."""
    direct = request.client.host if request.client else None
    settings: Settings = request.app.state.settings
    forwarded = request.headers.get("x-forwarded-for")
    if forwarded and auth.from_trusted_proxy(direct, settings.web.trusted_proxies):
        return forwarded.split(",")[-1].strip()[:64] or direct
    return direct


def identify(request: Request) -> User | None:
    """The request's user: single sign-on from a trusted proxy, else the login cookie."""
    settings: Settings = request.app.state.settings
    store: Store = request.app.state.store
    header = settings.web.trusted_user_header
    direct = request.client.host if request.client else None
    if header and auth.from_trusted_proxy(direct, settings.web.trusted_proxies):
        name = request.headers.get(header, "").strip()
        if name:
            account = store.accounts().user(name) if auth.valid_user_name(name) else None
            if account is None:
                raise Refused(403, "unknown_account", f"no local account {name!r} for this node")
            binding = request.cookies.get(CSRF_COOKIE) or ""
            return User(account.name, Role.named(account.role), "header", binding)
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    web = settings.web
    account = store.accounts().session_user(
        auth.token_sha256(token),
        idle=dt.timedelta(minutes=web.session_idle_minutes),
        lifetime=dt.timedelta(hours=web.session_max_hours),
        # A page's own polling (htmx) is not the user at the screen: it must not keep an
        # unattended login alive.
        touch=not request.headers.get("hx-request"),
    )
    if account is None:
        return None
    return User(account.name, Role.named(account.role), "session", token)


#: Form bodies the console takes: a few short fields (Starlette's defaults allow about 1 GB).
FORM_LIMITS = {"max_fields": 50, "max_files": 0, "max_part_size": 16 * 1024}


async def read_form(request: Request) -> FormData | None:
    """The POST body's form within :data:`FORM_LIMITS` (None for other methods)."""
    if request.method != "POST":
        return None
    try:
        return await request.form(**FORM_LIMITS)
    except HTTPException as error:
        raise Refused(error.status_code, "bad_form", str(error.detail)) from None


def page(role: Role = Role.VIEWER) -> Callable[[Handler], AsyncHandler]:
    """A page for ``role`` and above; without a login, 303 to the login page.

    The handler runs in the thread pool: the store, argon2, pydicom and the health probe block,
    and the console is one process serving everyone.
    """

    def wrap(handler: Handler) -> AsyncHandler:
        def guarded(request: Request) -> Response:
            user = identify(request)
            if user is None:
                return _to_login(request)
            _require(user, role, request)
            request.state.user = user
            if request.method == "POST":
                _check_csrf(request, user.csrf_binding)
            return handler(request)

        async def route(request: Request) -> Response:
            try:
                request.state.form = await read_form(request)
                return await run_in_threadpool(guarded, request)
            except Refused as refusal:
                return refused_page(request, refusal)

        return route

    return wrap


def _to_login(request: Request) -> Response:
    """Where a request without a login goes: the login page, then back."""
    if request.method == "POST":
        # The action's URL cannot be fetched back with GET: return to its study.
        key = request.path_params.get("key")
        target = f"/studies/{key}" if key and views.STUDY_KEY.fullmatch(key) else "/"
    else:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.headers.get("hx-request"):
        # A live part's poll: htmx would swap the login page into the panel; send the whole
        # window there instead.
        current = urlsplit(request.headers.get("hx-current-url", "")).path or "/"
        return Response(
            status_code=401, headers={"HX-Redirect": f"/login?next={quote(_next(current))}"}
        )
    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)


def api(role: Role = Role.VIEWER) -> Callable[[Handler], AsyncHandler]:
    """JSON for ``role`` and above; without a login, 401."""

    def wrap(handler: Handler) -> AsyncHandler:
        def guarded(request: Request) -> Response:
            user = identify(request)
            if user is None:
                raise Refused(401, "not_logged_in", "log in at /login first")
            _require(user, role, request)
            request.state.user = user
            return handler(request)

        async def route(request: Request) -> Response:
            try:
                return await run_in_threadpool(guarded, request)
            except Refused as refusal:
                headers = {"WWW-Authenticate": 'Cookie realm="mvi-node", form="/login"'}
                return JSONResponse(
                    {"error": refusal.code, "detail": refusal.detail},
                    status_code=refusal.status,
                    headers=headers if refusal.status == 401 else None,
                )

        return route

    return wrap


def _require(user: User, role: Role, request: Request) -> None:
    if not user.may(role):
        audit(request, user, "forbidden", request.url.path, "refused", {"needs": role.label})
        raise Refused(
            403, "forbidden", f"this needs the {role.label} role; you are {user.role.label}"
        )


def _check_origin(request: Request) -> None:
    """A browser's POST names the page's origin: it must be this site (as the user sees it,
    which behind a trusted proxy is the proxy's forwarded host)."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return
    settings: Settings = request.app.state.settings
    direct = request.client.host if request.client else None
    hosts = {request.headers.get("host", "")}
    if auth.from_trusted_proxy(direct, settings.web.trusted_proxies):
        hosts.add(request.headers.get("x-forwarded-host", "").split(",")[0].strip())
    if urlsplit(origin).netloc not in hosts:
        raise Refused(403, "bad_origin", "the form was sent from another site")


def _check_csrf(request: Request, binding: str) -> None:
    _check_origin(request)
    form: FormData | None = request.state.form
    given = request.headers.get(auth.CSRF_HEADER) or str(
        (form.get(auth.CSRF_FIELD) if form is not None else "") or ""
    )
    if not auth.csrf_valid(binding, given):
        raise Refused(
            403, "bad_csrf_token", "the form's security token is missing or wrong; reload the page"
        )


def audit(
    request: Request,
    user: User | None,
    action: str,
    target: str | None,
    outcome: str,
    detail: dict[str, Any] | None = None,
) -> None:
    """One line of the audit log (and of the node's log, without the detail)."""
    store: Store = request.app.state.store
    client = client_address(request)
    # The column's width: a hostile URL or user name must not turn a refusal into an error.
    target = target[:128] if target else None
    store.accounts().log(
        action,
        outcome,
        user_name=user.name if user else None,
        role=user.role.label if user else None,
        client=client,
        target=target,
        detail=detail,
    )
    log.info(
        "console action",
        action=action,
        outcome=outcome,
        user=user.name if user else None,
        target=target,
        client=client,
    )


# -- rendering -------------------------------------------------------------------------------


def render(
    request: Request, template: str, context: dict[str, Any], status_code: int = 200
) -> Response:
    """A page, with the CSRF token for its forms (setting the CSRF cookie when needed)."""
    user: User | None = getattr(request.state, "user", None)
    binding = user.csrf_binding if user is not None else ""
    new_cookie = None
    if not binding:
        binding = request.cookies.get(CSRF_COOKIE) or ""
        if not binding:
            binding = new_cookie = auth.new_token()
    templates: Jinja2Templates = request.app.state.templates
    response = templates.TemplateResponse(
        request,
        template,
        {"user": user, "csrf_token": auth.csrf_token(binding), "Role": Role, **context},
        status_code=status_code,
    )
    if new_cookie is not None:
        _set_cookie(request, response, CSRF_COOKIE, new_cookie)
    return response


def refused_page(request: Request, refusal: Refused) -> Response:
    """An error as a page."""
    response = render(
        request,
        "error.html",
        {"status": refusal.status, "code": refusal.code, "detail": refusal.detail},
        status_code=refusal.status,
    )
    return response


def _set_cookie(request: Request, response: Response, name: str, value: str) -> None:
    settings: Settings = request.app.state.settings
    response.set_cookie(
        name,
        value,
        httponly=True,
        secure=settings.web.secure_cookies,
        samesite="strict",
        path="/",
    )


def _show_ids(request: Request) -> bool:
    user: User = request.state.user
    settings: Settings = request.app.state.settings
    return user.role.label in settings.web.show_identifiers_to


# -- login -----------------------------------------------------------------------------------


def _next(value: str | None) -> str:
    # Only a path of this site: "//evil.example" or "https://…" would send the user away.
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


def login_form(request: Request) -> Response:
    store: Store = request.app.state.store
    return render(
        request,
        "login.html",
        {
            "next": _next(request.query_params.get("next")),
            "no_accounts": not store.accounts().list_users(),
        },
    )


async def login_form_route(request: Request) -> Response:
    return await run_in_threadpool(login_form, request)


async def login_route(request: Request) -> Response:
    try:
        request.state.form = await read_form(request)
        return await run_in_threadpool(login, request)
    except Refused as refusal:
        return refused_page(request, refusal)


def login(request: Request) -> Response:
    """Check the form's token, the rate limit, then the password; open a login."""
    store: Store = request.app.state.store
    limiter: LoginLimiter = request.app.state.limiter
    form: FormData = request.state.form
    name = str(form.get("username") or "").strip()
    password = str(form.get("password") or "")
    target = _next(str(form.get("next") or "/"))
    client = client_address(request) or "-"
    _check_origin(request)
    if not auth.csrf_valid(request.cookies.get(CSRF_COOKIE), str(form.get(auth.CSRF_FIELD) or "")):
        raise Refused(
            403,
            "bad_csrf_token",
            "the login form's security token is missing or wrong; reload the page",
        )
    keys = auth.login_keys(name, client)
    wait = limiter.retry_after(keys)
    if wait is not None:
        audit(request, None, "login", name[:64] or None, "rate_limited", {"retry_after_s": wait})
        refusal = Refused(429, "too_many_attempts", f"too many failed logins; retry in {wait} s")
        response = refused_page(request, refusal)
        response.headers["Retry-After"] = str(wait)
        return response
    # A name no account can have is checked against no hash (the same time as a wrong one).
    stored = store.accounts().password_hash(name) if auth.valid_user_name(name) else None
    ok, rehash = auth.check_password(stored, password)
    if not ok:
        limiter.failed(keys)
        # The name tried, never the password.
        audit(request, None, "login", name[:64] or None, "failed")
        log.warning("console login failed", user=name[:64], client=client)
        return render(
            request,
            "login.html",
            {"next": target, "error": "wrong user name or password", "username": name[:64]},
            status_code=401,
        )
    limiter.forget(keys[0])
    if rehash is not None:
        store.accounts().set_password_hash(name, rehash)
    token = auth.new_token()
    store.accounts().open_session(auth.token_sha256(token), name, client)
    account = store.accounts().user(name)
    user = User(name, Role.named(account.role if account else "viewer"), "session", token)
    audit(request, user, "login", name, "ok")
    response = RedirectResponse(target, status_code=303)
    _set_cookie(request, response, SESSION_COOKIE, token)
    return response


@page()
def logout(request: Request) -> Response:
    user: User = request.state.user
    store: Store = request.app.state.store
    if user.via == "session":
        store.accounts().close_session(auth.token_sha256(user.csrf_binding))
    audit(request, user, "logout", user.name, "ok")
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# -- pages -----------------------------------------------------------------------------------


@page()
def overview_page(request: Request) -> Response:
    data = views.overview(request.app.state.settings, request.app.state.store)
    template = "overview_live.html" if request.headers.get("hx-request") else "overview.html"
    return render(request, template, {"o": data})


def _study_filters(request: Request) -> dict[str, Any]:
    params = request.query_params
    state = params.get("state") or None
    if state is not None and state not in STUDY_STATES:
        raise Refused(400, "bad_filter", f"state {state!r}: one of {', '.join(STUDY_STATES)}")
    dates: dict[str, dt.date | None] = {}
    for name in ("since", "until"):
        value = params.get(name) or None
        try:
            dates[name] = dt.date.fromisoformat(value) if value else None
        except ValueError:
            raise Refused(400, "bad_filter", f"{name} {value!r}: a date as YYYY-MM-DD") from None
    return {"state": state, "reason": (params.get("reason") or "").strip()[:100] or None, **dates}


@page()
def studies_page(request: Request) -> Response:
    filters = _study_filters(request)
    rows = views.studies(request.app.state.store, show_identifiers=_show_ids(request), **filters)
    return render(
        request,
        "studies.html",
        {
            "studies": rows,
            "filters": filters,
            "states": STUDY_STATES,
            "show_ids": _show_ids(request),
        },
    )


@page()
def study_page(request: Request) -> Response:
    data = _study(request)
    return render(
        request,
        "study.html",
        {"s": data, "show_ids": _show_ids(request), "message": done_message(request.query_params)},
    )


def _study(request: Request) -> dict[str, Any]:
    try:
        return views.study(
            request.app.state.settings,
            request.app.state.store,
            request.path_params["key"],
            show_identifiers=_show_ids(request),
        )
    except views.NotFound as missing:
        raise Refused(404, "not_found", str(missing)) from None


@page()
def sc_image(request: Request) -> Response:
    try:
        png = views.sc_png(
            request.app.state.settings, request.app.state.store, request.path_params["key"]
        )
    except views.NotFound as missing:
        raise Refused(404, "not_found", str(missing)) from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@page()
def requery_page(request: Request) -> Response:
    data = views.requery(request.app.state.store)
    template = "requery_live.html" if request.headers.get("hx-request") else "requery.html"
    return render(request, template, {"r": data})


@page()
def reports_page(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    return render(
        request,
        "reports.html",
        {"reports": views.reports(settings), "folder": str(views.reports_dir(settings))},
    )


@page()
def report_file(request: Request) -> Response:
    try:
        path = views.report_file(
            request.app.state.settings, request.path_params["name"], request.path_params["file"]
        )
    except views.NotFound as missing:
        raise Refused(404, "not_found", str(missing)) from None
    response = FileResponse(path)
    response.headers.update({**SECURITY_HEADERS, "Content-Security-Policy": REPORT_CSP})
    return response


@page()
def models_page(request: Request) -> Response:
    return render(request, "models.html", {"models": views.models(request.app.state.settings)})


@page(Role.ADMIN)
def audit_log_page(request: Request) -> Response:
    return render(request, "audit_log.html", {"entries": views.audit_log(request.app.state.store)})


# -- actions (operator) ----------------------------------------------------------------------


def _action_target(request: Request) -> tuple[str, str]:
    """The study of an action's URL: (key, UID), or 404."""
    key = request.path_params["key"]
    try:
        return key, views.find_study(request.app.state.store, key)
    except views.NotFound as missing:
        raise Refused(404, "not_found", str(missing)) from None


#: What a study page says after an action: fixed texts, so a link cannot make the page say
#: anything else (``?done=CODE&n=NUMBER``).
DONE = {
    "reprocess": "job {n} queued",
    "reprocess_forced": "job {n} queued with the chosen series",
    "cancel": "job {n} cancelled",
    "retry": "{n} delivery(ies) queued again",
}

#: An action: (what DONE says, its number, the audit-log detail), or :class:`Refused`.
Action = Callable[[Store, str, str, FormData], tuple[str, int, dict[str, Any]]]


def done_message(params: Any) -> str | None:
    """The message of a study page's ``done``/``n`` query, if it is one of :data:`DONE`."""
    code, number = params.get("done"), params.get("n") or ""
    if code not in DONE or not NUMBER.fullmatch(number):
        return None
    return DONE[code].format(n=int(number))


def _act(request: Request, action: str, do: Action) -> Response:
    """Run an operator action on the study of the URL; record it whatever its outcome."""
    user: User = request.state.user
    store: Store = request.app.state.store
    key = request.path_params["key"]
    form: FormData = request.state.form
    try:
        key, study_uid = _action_target(request)
        code, number, detail = do(store, key, study_uid, form)
    except Refused as refusal:
        audit(
            request, user, action, key, "refused", {"status": refusal.status, "why": refusal.detail}
        )
        if _wants_json(request):
            return JSONResponse(
                {"error": refusal.code, "detail": refusal.detail}, status_code=refusal.status
            )
        return refused_page(request, refusal)
    audit(request, user, action, key, "ok", detail)
    if _wants_json(request):
        return JSONResponse({"ok": True, "detail": DONE[code].format(n=number), **detail})
    return RedirectResponse(f"/studies/{key}?done={code}&n={number}", status_code=303)


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def _reprocess(
    store: Store, key: str, study_uid: str, form: FormData
) -> tuple[str, int, dict[str, Any]]:
    arterial = str(form.get("arterial") or "").strip()
    portal_venous = str(form.get("portal_venous") or "").strip()
    if bool(arterial) != bool(portal_venous):
        raise Refused(
            400, "bad_series", "choose both the arterial and the portal-venous series, or neither"
        )
    forced = None
    if arterial:
        own = {s.series_uid: s for s in store.study_series(study_uid) if s.analysable}
        for role, uid in (("arterial", arterial), ("portal-venous", portal_venous)):
            if uid not in own:
                raise Refused(
                    400,
                    "bad_series",
                    f"the {role} series {uid_key(uid)} is not a CT series of study {key}",
                )
        if arterial == portal_venous:
            raise Refused(400, "bad_series", "the arterial and portal-venous series are the same")
        forced = (arterial, portal_venous)
    job_id = store.reprocess(study_uid, forced)
    chosen = {"arterial": uid_key(forced[0]), "portal_venous": uid_key(forced[1])} if forced else {}
    return "reprocess_forced" if forced else "reprocess", job_id, {"job_id": job_id, **chosen}


def _cancel(
    store: Store, key: str, study_uid: str, form: FormData
) -> tuple[str, int, dict[str, Any]]:
    raw = str(form.get("job_id") or "")
    if not NUMBER.fullmatch(raw):
        raise Refused(400, "bad_job", f"job {raw[:20]!r} is not a job number")
    job_id = int(raw)
    if job_id not in {job.id for job in store.list_jobs(1000, study_uid=study_uid)}:
        raise Refused(400, "bad_job", f"job {job_id} is not a job of study {key}")
    if not store.cancel_job(job_id):
        raise Refused(
            409, "not_queued", f"job {job_id} is not queued (only queued jobs can be cancelled)"
        )
    return "cancel", job_id, {"job_id": job_id}


def _retry(
    store: Store, key: str, study_uid: str, form: FormData
) -> tuple[str, int, dict[str, Any]]:
    failed = {
        item.id
        for item in store.list_outbox(include_sent=True, limit=10_000, study_uid=study_uid)
        if item.state == "failed"
    }
    raw = [str(v) for v in form.getlist("outbox_id")]
    if any(not NUMBER.fullmatch(v) for v in raw):
        raise Refused(400, "bad_outbox_item", "outbox items are numbers")
    wanted = {int(v) for v in raw} or failed
    if not wanted:
        raise Refused(409, "nothing_failed", f"study {key} has no failed deliveries")
    strangers = wanted - failed
    if strangers:
        raise Refused(
            400,
            "bad_outbox_item",
            f"outbox item(s) {', '.join(map(str, sorted(strangers)))} are not failed deliveries "
            f"of study {key}",
        )
    count = store.retry_failed_deliveries(sorted(wanted))
    return "retry", count, {"outbox_ids": sorted(wanted)}


@page(Role.OPERATOR)
def reprocess_action(request: Request) -> Response:
    return _act(request, "reprocess", _reprocess)


@page(Role.OPERATOR)
def cancel_action(request: Request) -> Response:
    return _act(request, "cancel_job", _cancel)


@page(Role.OPERATOR)
def retry_action(request: Request) -> Response:
    return _act(request, "retry_outbox", _retry)


# -- /api ------------------------------------------------------------------------------------


def _json(data: Any, status_code: int = 200) -> JSONResponse:
    return JSONResponse(json.loads(json.dumps(data, default=str)), status_code=status_code)


@api()
def api_me(request: Request) -> Response:
    user: User = request.state.user
    return _json({"name": user.name, "role": user.role.label, "via": user.via})


@api()
def api_overview(request: Request) -> Response:
    return _json(views.overview(request.app.state.settings, request.app.state.store))


@api()
def api_studies(request: Request) -> Response:
    filters = _study_filters(request)
    return _json(
        views.studies(request.app.state.store, show_identifiers=_show_ids(request), **filters)
    )


@api()
def api_study(request: Request) -> Response:
    return _json(_study(request))


@api()
def api_requery(request: Request) -> Response:
    return _json(views.requery(request.app.state.store))


@api()
def api_reports(request: Request) -> Response:
    return _json(views.reports(request.app.state.settings))


@api()
def api_models(request: Request) -> Response:
    return _json(views.models(request.app.state.settings))


@api(Role.ADMIN)
def api_audit_log(request: Request) -> Response:
    return _json(views.audit_log(request.app.state.store))


# -- the application -------------------------------------------------------------------------


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (an unknown path, a wrong method) as a page or as JSON."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "error")
    refusal = Refused(status, code, str(getattr(exc, "detail", "")))
    if request.url.path.startswith("/api"):
        response: Response = JSONResponse(
            {"error": refusal.code, "detail": refusal.detail}, status_code=status
        )
    else:
        response = await run_in_threadpool(refused_page, request, refusal)
    response.headers.update(headers)
    return response


async def server_error(request: Request, exc: Exception) -> Response:
    """A bug: one log line with the exception's type, a plain answer with the same headers."""
    log.error("console error", path=request.url.path, error=type(exc).__name__)
    return JSONResponse(
        {"error": "internal_error", "detail": "the console failed; see the node's log"},
        status_code=500,
        headers=SECURITY_HEADERS,
    )


def create_app(settings: Settings, store: Store) -> Starlette:
    """The console for one node's settings and store."""
    routes = [
        Route("/", overview_page),
        Route("/login", login_form_route, methods=["GET"]),
        Route("/login", login_route, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/studies", studies_page),
        Route("/studies/{key}", study_page),
        Route("/studies/{key}/sc.png", sc_image),
        Route("/studies/{key}/reprocess", reprocess_action, methods=["POST"]),
        Route("/studies/{key}/cancel", cancel_action, methods=["POST"]),
        Route("/studies/{key}/retry", retry_action, methods=["POST"]),
        Route("/requery", requery_page),
        Route("/reports", reports_page),
        Route("/reports/{name}/{file}", report_file),
        Route("/models", models_page),
        Route("/audit-log", audit_log_page),
        Route("/api/me", api_me),
        Route("/api/overview", api_overview),
        Route("/api/studies", api_studies),
        Route("/api/studies/{key}", api_study),
        Route("/api/requery", api_requery),
        Route("/api/reports", api_reports),
        Route("/api/models", api_models),
        Route("/api/audit-log", api_audit_log),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: server_error},
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=security_headers)],
    )
    app.state.settings = settings
    app.state.store = store
    app.state.limiter = LoginLimiter(settings.web.login_attempts, settings.web.login_window_s)
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals["study_key"] = study_key
    templates.env.globals["uid_key"] = uid_key
    templates.env.filters["percent"] = lambda v: "–" if v is None else f"{100 * v:.1f} %"
    app.state.templates = templates
    return app


async def security_headers(request: Request, call_next: AsyncHandler) -> Response:
    """Every answer gets :data:`SECURITY_HEADERS` (a report keeps its own policy)."""
    response = await call_next(request)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response
