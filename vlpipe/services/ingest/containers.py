"""Compressed streams (Ogg/WebM Opus, MP3) decoded with PyAV as their chunks arrive.

A container demuxer wants to pull bytes; producers push chunks. `ContainerDecoder` joins
the two: chunks go into a blocking buffer that PyAV reads from on the decoder's own thread,
and decoded mono PCM16 comes back through a queue. `feed()` waits until the demuxer has
taken every byte given so far and asks for more, then returns all that those bytes
decode to: what comes out does not depend on thread timing, and a stream whose producer
pauses (a call waiting for its answer) is not left with its last words undecoded.
`close()` returns the rest.
"""

from __future__ import annotations

import io
import queue
import threading

import av
import numpy as np

DEMUXERS = {"ogg": "ogg", "webm": "matroska", "mp3": "mp3"}
Decoded = tuple[int, np.ndarray]


class ContainerError(ValueError):
    """The stream could not be demuxed or decoded; the message says why."""


class _ChunkPipe(io.RawIOBase):
    """Bytes written by the producer side, read (blocking) by the demuxer thread."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._closed_for_writing = False
        self._starved = False  # the reader waits for bytes nobody has written yet
        self._reader_gone = False
        self._ready = threading.Condition()

    def readable(self) -> bool:
        return True

    def write_chunk(self, data: bytes) -> None:
        with self._ready:
            self._data += data
            self._starved = False
            self._ready.notify_all()

    def finish(self) -> None:
        with self._ready:
            self._closed_for_writing = True
            self._ready.notify_all()

    def reader_gone(self) -> None:
        with self._ready:
            self._reader_gone = True
            self._ready.notify_all()

    def wait_until_starved(self, timeout: float) -> None:
        """Until the reader has taken every byte and waits for more, or has stopped."""
        with self._ready:
            self._ready.wait_for(lambda: self._starved or self._reader_gone, timeout)

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        with self._ready:
            while not self._data and not self._closed_for_writing:
                self._starved = True
                self._ready.notify_all()
                self._ready.wait()
            n = min(len(buffer), len(self._data))
            buffer[:n] = self._data[:n]
            del self._data[:n]
            return n


class ContainerDecoder:
    """Decodes one compressed stream fed in chunks; mono PCM16 samples out."""

    def __init__(self, fmt: str) -> None:
        self.format = fmt
        self._pipe = _ChunkPipe()
        self._out: queue.Queue[Decoded | Exception | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._done = False

    def feed(self, data: bytes, timeout: float = 2.0) -> list[Decoded]:
        """Add a chunk; all the PCM the stream's bytes so far decode to (waiting at most
        `timeout` s for the decoder). Raises ContainerError on a broken stream."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._decode, daemon=True, name="container")
            self._thread.start()
        self._pipe.write_chunk(data)
        self._pipe.wait_until_starved(timeout)
        return self._drain(block=False)

    def close(self, timeout: float = 10.0) -> list[Decoded]:
        """End of stream: the rest of the PCM."""
        if self._thread is None:
            return []
        self._pipe.finish()
        self._thread.join(timeout)
        return self._drain(block=False)

    def _drain(self, block: bool) -> list[Decoded]:
        out: list[Decoded] = []
        while True:
            try:
                item = self._out.get(block=block)
            except queue.Empty:
                return out
            if item is None:
                self._done = True
                return out
            if isinstance(item, Exception):
                raise ContainerError(f"{self.format} stream: {item}") from None
            out.append(item)

    def _decode(self) -> None:
        try:
            with av.open(self._pipe, mode="r", format=DEMUXERS[self.format]) as container:
                if not container.streams.audio:
                    raise ContainerError("no audio track")
                stream = container.streams.audio[0]
                resampler = av.AudioResampler(format="s16", layout="mono")
                for frame in container.decode(stream):
                    for mono in resampler.resample(frame):
                        pcm = mono.to_ndarray().reshape(-1).astype(np.float32)
                        self._out.put((mono.sample_rate, pcm))
        except Exception as exc:  # av's errors, a truncated stream, no audio track
            self._out.put(exc)
        finally:
            self._out.put(None)
            self._pipe.reader_gone()
