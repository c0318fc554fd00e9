"""The ingest service: audio from any producer, normalized to fixed PCM16 or G.711 frames."""
