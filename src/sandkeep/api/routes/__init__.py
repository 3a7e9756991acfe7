"""The HTTP API's routers, one module per area; :func:`sandkeep.api.app.create_app` includes them all."""
