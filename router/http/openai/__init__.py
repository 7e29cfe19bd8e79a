"""OpenAI's API: request parsing and response bodies (protocol.py), routes (routes.py), chat templates."""
