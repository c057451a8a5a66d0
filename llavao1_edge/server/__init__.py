"""`llavao1-edge serve`: the runtime as a local HTTP server (the `server` extra: Starlette and uvicorn).

    config.py      ServerConfig: where it listens, who may call it, its limits
    workers.py     one set of weights, N llama.cpp contexts, a bounded queue; searches run in threads
    requests.py    OpenAI and Ollama request bodies -> a Job (image, question, history, search settings)
    stream.py      the chosen text -> reasoning (SUMMARY, CAPTION, REASONING) and content (CONCLUSION)
    openai_api.py  GET /v1/models, POST /v1/chat/completions (JSON or server-sent events)
    ollama_api.py  POST /api/chat (JSON or NDJSON), GET /api/tags, POST /api/show, GET /api/version
    app.py         the Starlette app: routes, the page, host check, API key, CORS, errors; run()
    page.html      the page at GET /: ask about an image and watch the search choose each stage
"""
