"""The HTTP server: SGLang-style /generate, OpenAI /v1/*, health, model and server info, Prometheus /metrics."""
