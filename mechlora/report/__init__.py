"""Self-contained HTML reports (plotly), one module per pipeline step."""

from mechlora.report.page import Page

__all__ = ["Page"]
