"""The HTTP server (OpenAI-compatible completions with datastores)."""
