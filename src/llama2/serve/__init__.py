"""`llama2 serve`: an OpenAI-compatible HTTP server with continuous batching, streaming and a web chat page.

    from llama2.serve import ServeOptions, build_app, BackgroundServer
    app = build_app(model, tokenizer, ServeOptions(model_name="tiny", max_batch=16))
    with BackgroundServer(app) as server:      # uvicorn on 127.0.0.1 and a free port, in a thread
        print(server.url)                       # point openai.OpenAI(base_url=server.url + "/v1") at it

One worker thread owns the generation Engine (inference/engine.py) and runs its decode steps; requests join and
leave the batch between steps (worker.py). The endpoints and errors are in app.py and protocol.py.
"""

from .app import create_app
from .protocol import ApiError, Defaults
from .server import BackgroundServer, ServeOptions, bind, build_app, run
from .worker import ModelWorker

__all__ = ["create_app", "build_app", "run", "bind", "BackgroundServer", "ServeOptions", "Defaults", "ApiError",
           "ModelWorker"]
