"""The web dashboard of ``ajs serve --dashboard HOST:PORT`` (see :mod:`ajs_grpc.faces.dashboard.app`)."""

from ajs_grpc.faces.dashboard.app import Dashboard
from ajs_grpc.faces.dashboard.serve import dashboard_for, serve_with_dashboard

__all__ = ["Dashboard", "dashboard_for", "serve_with_dashboard"]
