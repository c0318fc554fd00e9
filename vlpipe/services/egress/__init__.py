"""Egress: transcripts and audio from the broker's events, to every consumer."""
