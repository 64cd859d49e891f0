"""OpenAI-compatible HTTP serving (chapter 10).

    minillm/engine/async_llm.py   AsyncLLM: one loop steps the engine, coroutines stream (the engine side)
    protocol.py                   request bodies and OpenAI-shaped errors
    openai_api.py                 /v1/completions and /v1/chat/completions: JSON or Server-Sent Events
    serving_models.py             the models a request's `model` may name: the base model and its LoRA adapters
    metrics.py                    /metrics in Prometheus text
    app.py                        the FastAPI app: routes, API key, body limit, lifespan
    playground.html               the page at /: a streaming chat beside the live engine
    server.py                     uvicorn in the foreground or in a background thread
    cli.py                        `minillm serve`
"""
