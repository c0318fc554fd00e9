"""vlpipe: real-time voice AI behind Redis Streams."""

__version__ = "0.1.0"
