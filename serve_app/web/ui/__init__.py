"""The web UI: server-rendered pages for the people who review, on the public API."""
