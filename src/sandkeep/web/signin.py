"""Sign-in pages: ``/`` (where to go), ``/login`` (paste a token), ``/login/once/<code>`` (one-time links; the
GET is a confirmation page so link previewers do not use the code, the POST signs in), ``/logout``."""

from __future__ import annotations

from datetime import datetime
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from sandkeep.engine.service import Actor
from sandkeep.web.auth import (
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    BadToken,
    actor_from_api_token,
    end_session,
    login_csrf_ok,
    new_login_csrf,
    new_session_cookie,
)
from sandkeep.web.ui import UiDep, WebUI, _cookie_would_be_dropped, _safe_next, log

router = APIRouter(include_in_schema=False)


def client_of(request: Request) -> str:
    return request.client.host if request.client else "?"


def set_login_csrf(response: Response, token: str) -> None:
    response.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=3600, path="/login", secure=True, httponly=True,
                        samesite="lax")


def login_page(ui: WebUI, request: Request, *, error: str = "", status: int = 200,
               next_url: str | None = None) -> Response:
    token = new_login_csrf()
    response = ui.render("login.html", request=request, session=None, status=status, error=error,
                         login_csrf=token, next_url=next_url or "", insecure_origin=_cookie_would_be_dropped(request))
    set_login_csrf(response, token)
    return response


def throttled(ui: WebUI, request: Request) -> Response | None:
    """429 with Retry-After when this client failed to sign in too often recently."""
    wait = ui.throttle.retry_after(client_of(request))
    if wait is None:
        return None
    log.warning("web.signin_throttled", client=client_of(request), retry_after=wait)
    return ui.render("error.html", request=request, session=None, status=429,
                     headers={"Retry-After": str(wait)}, title="Too many sign-in attempts",
                     message=f"Too many failed sign-ins from your address. Try again in {wait} seconds.",
                     link=("/login", "Sign in"))


def failed_signin(ui: WebUI, request: Request, how: str) -> None:
    ui.throttle.failed(client_of(request))
    log.info("web.signin_failed", client=client_of(request), how=how)


def home_for(actor: Actor) -> str:
    return "/ui/admin/" if actor.is_admin else "/ui/"


def start_session(ui: WebUI, actor: Actor, target: str, not_after: datetime | None = None,
                  token_jti: str | None = None) -> Response:
    value, sess = new_session_cookie(ui.rt, actor, not_after=not_after, token_jti=token_jti)
    response = RedirectResponse(target, status_code=303, headers=ui.headers())
    max_age = max(1, int((sess.expires_at - ui.rt.clock.now()).total_seconds()))
    response.set_cookie(SESSION_COOKIE, value, max_age=max_age, path="/", secure=True, httponly=True,
                        samesite="lax")
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login", secure=True, httponly=True, samesite="lax")
    return response


@router.get("/", response_model=None)
async def root(request: Request, ui: UiDep) -> Response:
    session = ui.session(request)
    return RedirectResponse(home_for(session.actor) if session else "/login", status_code=303)


@router.get("/login", response_model=None)
async def login_get(request: Request, ui: UiDep) -> Response:
    session = ui.session(request)
    if session is not None:
        return RedirectResponse(_safe_next(request.query_params.get("next")) or home_for(session.actor),
                                status_code=303)
    return login_page(ui, request, next_url=_safe_next(request.query_params.get("next")))


@router.post("/login", response_model=None)
async def login_post(request: Request, ui: UiDep) -> Response:
    form = await request.form()
    data = {k: v for k, v in form.items() if isinstance(v, str)}
    next_url = _safe_next(data.get("next"))
    if not login_csrf_ok(request.cookies.get(LOGIN_CSRF_COOKIE), data.get(CSRF_FIELD)):
        return login_page(ui, request, status=403, next_url=next_url,
                          error="The sign-in form expired or was not sent from this site (CSRF check). "
                                "It has been reloaded: paste your token again.")
    blocked = throttled(ui, request)
    if blocked is not None:
        return blocked
    try:
        actor, record = actor_from_api_token(ui.rt, data.get("token", ""))
    except BadToken as exc:
        failed_signin(ui, request, "token")
        return login_page(ui, request, status=401, error=str(exc), next_url=next_url)
    return start_session(ui, actor, next_url or home_for(actor), not_after=record.expires_at, token_jti=record.jti)


def code_gone(ui: WebUI, request: Request) -> Response:
    return ui.render("error.html", request=request, session=ui.session(request), status=410,
                     title="Sign-in link expired",
                     message="This one-time sign-in link was already used or has expired. Restart "
                             "`sandkeep serve` for fresh links, or sign in with a token.",
                     link=("/login", "Sign in with a token"))


def code_actor(ui: WebUI, request: Request, code: str, *, consume: bool) -> Actor | Response:
    """Who ``code`` signs in (consuming it when ``consume``), or the 429 / 410 page to answer instead."""
    blocked = throttled(ui, request)
    if blocked is not None:
        return blocked
    credentials = ui.rt.credentials
    actor = credentials.redeem_login_code(code) if consume else credentials.peek_login_code(code)
    if actor is None:
        failed_signin(ui, request, "code")
        return code_gone(ui, request)
    return actor


@router.get("/login/once/{code}", response_model=None)
async def login_once(request: Request, code: str, ui: UiDep) -> Response:
    """A confirmation page: opening (or previewing) the link does not use the code; its POST does."""
    actor = code_actor(ui, request, code, consume=False)
    if not isinstance(actor, Actor):
        return actor
    token = new_login_csrf()
    response = ui.render("login_once.html", request=request, session=None, who=actor, login_csrf=token,
                         action_url=f"/login/once/{quote(code, safe='')}")
    set_login_csrf(response, token)
    return response


@router.post("/login/once/{code}", response_model=None)
async def login_once_post(request: Request, code: str, ui: UiDep) -> Response:
    form = await request.form()
    data = {k: v for k, v in form.items() if isinstance(v, str)}
    if not login_csrf_ok(request.cookies.get(LOGIN_CSRF_COOKIE), data.get(CSRF_FIELD)):
        return ui.render("error.html", request=request, session=None, status=403, title="Form expired",
                         message="This sign-in confirmation was not sent from this site (CSRF check). "
                                 "Open the sign-in link again.", link=(request.url.path, "Open the link again"))
    actor = code_actor(ui, request, code, consume=True)
    if not isinstance(actor, Actor):
        return actor
    return start_session(ui, actor, home_for(actor))


@router.post("/logout", response_model=None)
async def logout(request: Request, ui: UiDep) -> Response:
    session = ui.session(request)
    if session is not None:
        _, ok = await ui.form_and_csrf(request, session)
        if not ok:
            return ui.csrf_failed(request, session)
        end_session(ui.rt, session.sid)
    response = RedirectResponse("/login", status_code=303, headers=ui.headers())
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="lax")
    return response
