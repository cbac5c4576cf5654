"""`specialize serve`: an OpenAI-compatible HTTP server for a run.

    specialize serve --model runs/faq --port 8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "faq", "messages": [{"role": "user", "content": "How do I reset my password?"}]}'

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (streaming or not; tools, response_format,
logprobs), `POST /v1/completions` (raw prompt, no template; logprobs), `GET /health`. Chat prompts are rendered by the
run's own template, so answers equal `specialize generate`; greedy unless `temperature` > 0.

One worker thread owns the model and one running batch (continuous batching): requests wait
in a bounded queue and join the batch at the next token boundary, streamed or not, each with
its own sampling settings, and leave it as soon as their answer ends. A full queue answers 503 at once
rather than letting latency grow without bound. A body over --max-body-bytes is refused (413)
before it is read, a request whose headers or body arrive too slowly is cut off (408), and
parsing, rendering and tokenising run off the event loop, so /health stays fast. Errors use OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`; tracebacks stay in the server log.

    schema.py       request bodies, response and stream-chunk shapes (logprobs too), `APIError` (OpenAI's error shape)
    tools.py        tools, tool_choice and response_format → what to render, enforce and parse; streamed calls
    constrained.py  llguidance grammars (JSON schema, tool calls, no tool call), one matcher per request
    worker.py       `Worker`: the one thread that owns the model, a bounded queue feeding the running batch
    decode.py       `RunningBatch`: rows join (prefill + merge) and leave at token boundaries, one KV cache;
                    each row masked by its own grammar, with its own logprobs
    limits.py       what one client may cost: body-size cap (413), deadlines for receiving a request (408)
    gate.py         API key and request-log middleware, noticing clients that left
    app.py          FastAPI routes, `serve()`
"""

from specialize.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
