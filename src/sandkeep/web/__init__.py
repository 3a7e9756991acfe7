"""sandkeep's web UI: server-rendered pages (Jinja2 + vendored htmx) for instance owners and admins.

:func:`sandkeep.web.routes.create_web_router` builds the routes (the API app includes them);
:func:`sandkeep.web.auth.issue_login_code` mints the one-time sign-in links ``sandkeep serve`` prints.
"""
