"""serve: HTTP: the endpoints, the web config (TLS, basic auth), the live page and the Prometheus collectors."""
