"""The local Voice Live engine: an offline server speaking the Voice Live realtime protocol.

Run it with `vlpipe engine` or `python -m vlpipe.services.engine`; start it inside a test
with `vlpipe.services.engine.server.running_engine`. See docs/engine.md.
"""
