"""The local HTTP server: ingest and status API, the status page, Prometheus metrics, and the page's static files."""
