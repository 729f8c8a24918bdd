"""Server-rendered web pages of ``lorahub serve`` under ``/ui/``: browse adapters by base,
see what fits what and where each adapter came from (``pages.py``)."""

from __future__ import annotations

from .pages import PREFIX, WebPages, is_page

__all__ = ["PREFIX", "WebPages", "is_page"]
