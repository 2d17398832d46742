"""The local API server: OpenAI- and Ollama-compatible HTTP endpoints over the loaded model.

Only this package knows HTTP. It runs on starlette + uvicorn and drives the same ChatPipeline the app uses, through
the same EngineQueue, so the window and API clients take turns on one engine.

    config.py      what the server listens on and lets in (ServerConfig), checked before it starts
    host.py        where the model comes from: the window's ChatService, or a model loaded for `serve`
    models.py      the models offered (the loaded one first) and which one a request may use
    requests.py    the neutral form of a chat request (turns, sampling, stop strings), shared by both dialects
    images.py      image parts of a request (data URIs, base64, optional http(s)) to bytes
    openai_api.py  /v1/*: request parsing and response shapes of the OpenAI dialect
    ollama_api.py  /api/*: the same for Ollama's dialect
    jobs.py        one generation on a worker thread: queue turn, prompt, stream, cancel
    errors.py      an HTTP error with a client-fit message; the app's errors mapped to statuses
    guard.py       Host/Origin checks, API key, body cap
    access_log.py  one log line per request (never its content)
    app.py         the ASGI app: routes, middleware, error bodies
    runner.py      binds the socket and runs uvicorn on a thread (`serve`, the app's toggle, tests)
    bench.py       `owl-desktop bench serve`: the API against the engine directly
"""
