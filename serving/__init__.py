"""The server behind serve.py, split the way serving engines are: schema.py declares the request bodies
(pydantic), engine.py schedules requests over the slots of a KV cache its runner owns and detokenizes
each answer incrementally, http.py holds the routes, streaming and the drain on SIGTERM.

    python serve.py --adapters DIR      # the command; it imports this package

Read next: serving/schema.py.
"""
