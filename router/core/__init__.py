"""The router's core: the engine loop, scheduler, KV cache manager, output processor, request
state and the step cost model. It knows nothing of HTTP (no aiohttp, no pydantic, nothing from
the routes): the HTTP side hands it `GenerationRequest`s and reads `TokenEvent`s back."""
