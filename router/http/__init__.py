"""The router's HTTP side: the aiohttp app (app.py), middleware and errors, TGI's and OpenAI's
routes and request/response protocols (tgi/, openai/), and the OpenAPI document. It hands the
engine (router.core) GenerationRequests and turns its events into responses."""
