"""cardq over HTTP: the REST API for apps in any language, /metrics, /healthz and /readyz, and the status page.

The supervisor runs it as one more permanent child (server.py) when [http] enabled = true. It calls the public
Python API (cardq.api.Queue) and nothing below it: no SQL here. Starlette routes the requests, uvicorn serves
them (httptools parses; see server.py for the header deadline it adds); blocking calls (SQLite, the actors'
sockets) run on a bounded thread pool so the event loop only ever waits on sockets.
"""
