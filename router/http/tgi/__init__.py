"""TGI's API: request validation (protocol.py) and the generation routes (routes.py)."""
