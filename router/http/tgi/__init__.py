"""TGI's API: request validation (protocol.py), response bodies (responses.py) and the generation
routes (routes.py)."""
