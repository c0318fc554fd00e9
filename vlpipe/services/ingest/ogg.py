"""Ogg Opus framing (RFC 3533, RFC 7845): stream bytes in, Opus packets out, as they arrive.

`OggOpusReader` follows the first logical stream whose first packet is an `OpusHead` and
yields each packet as soon as its last segment has arrived. FFmpeg's Ogg demuxer (which PyAV
wraps) cannot be used here: it hands out a page's packets only once the whole page is in
(a page from ffmpeg's muxer holds a second of audio), and a new owner cannot resume it in
the middle of a page. This reader's `carry()` is exactly what is in flight between two
chunks (the lacing values still to come, a partial packet, bytes of an unfinished page
header), so a new owner built with `OggOpusReader.resume(header, carry)` continues where
the old one stopped. Pure: no I/O, no threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlpipe.services.ingest.framing import Packet, b64, unb64

CAPTURE = b"OggS"
PAGE_HEADER = 27  # bytes before the lacing values
CONTINUED, FIRST = 0x01, 0x02  # header_type flags


@dataclass
class OggOpusReader:
    """Opus packets of one Ogg stream fed in chunks cut anywhere."""

    serial: int | None = None
    """Serial number of the Opus stream followed; None until its OpusHead page."""
    head: bytes = b""
    """That stream's identification header (OpusHead), which configures the decoder."""
    tags_seen: bool = False
    """The comment header (OpusTags, which may span pages) is behind us: packets are audio."""
    _buf: bytearray = field(default_factory=bytearray)  # bytes not yet read
    _lacing: bytes | None = None  # lacing values of the current page still to read
    _page_serial: int = 0
    _page_first: bool = False  # the current page is a stream's first page
    _packet: bytearray = field(default_factory=bytearray)  # packet being assembled
    _open: bool = False  # the last segment read was 255 bytes: the packet goes on
    _dropping: bool = False  # the packet in progress began before we synced: drop it
    _started: bool = False  # any byte seen (the first must start a page)

    def feed(self, data: bytes) -> tuple[list[Packet], list[str]]:
        """Packets completed by `data`, and the problems met (in plain words)."""
        self._buf += data
        packets: list[Packet] = []
        problems: list[str] = []
        while True:
            if self._lacing is None:
                if not self._start_page(problems):
                    break
            elif not self._read_segments(packets, problems):
                break
        return packets, problems

    # ------------------------------------------------------------------ new owner

    def header(self) -> dict[str, Any]:
        """What is learned once per stream: its serial number and OpusHead."""
        if self.serial is None:
            return {}
        return {"serial": self.serial, "head": b64(self.head)}

    def carry(self) -> dict[str, Any]:
        """What is in flight between two chunks; small (< one packet plus a page header)."""
        return {
            "buf": b64(self._buf),
            "lacing": None if self._lacing is None else b64(self._lacing),
            "page": [self._page_serial, self._page_first],
            "packet": b64(self._packet),
            "flags": [self._open, self._dropping, self.tags_seen, self._started],
        }

    @classmethod
    def resume(cls, header: dict[str, Any], carry: dict[str, Any]) -> OggOpusReader:
        """A reader continuing from another's `header()` and `carry()` (ValueError if bad)."""
        reader = cls()
        if header:
            reader.serial = int(header["serial"])
            reader.head = unb64(header["head"])
        if carry:
            reader._buf = bytearray(unb64(carry["buf"]))
            lacing = carry["lacing"]
            reader._lacing = None if lacing is None else unb64(lacing)
            reader._page_serial, reader._page_first = int(carry["page"][0]), bool(carry["page"][1])
            reader._packet = bytearray(unb64(carry["packet"]))
            flags = [bool(f) for f in carry["flags"]]
            reader._open, reader._dropping, reader.tags_seen, reader._started = flags
        return reader

    # ------------------------------------------------------------------ internals

    def _start_page(self, problems: list[str]) -> bool:
        """Read the next page header and its lacing values, or skip bytes that are not a
        page; False when more bytes are needed."""
        buf = self._buf
        if len(buf) <= len(CAPTURE):  # the capture pattern and the version byte
            return False
        if buf[:4] != CAPTURE or buf[4] != 0:
            at = buf.find(CAPTURE, 1)
            skipped = at if at > 0 else len(buf) - (len(CAPTURE) - 1)
            del buf[:skipped]
            if not self._started:
                problems.append("not an Ogg stream: it does not start with an Ogg page ('OggS')")
            else:
                problems.append(f"{skipped} bytes that are not Ogg pages skipped")
            self._started = True
            return at > 0
        self._started = True
        if len(buf) < PAGE_HEADER or len(buf) < PAGE_HEADER + buf[26]:
            return False
        flags = buf[5]
        serial = int.from_bytes(buf[14:18], "little")
        self._lacing = bytes(buf[PAGE_HEADER : PAGE_HEADER + buf[26]])
        del buf[: PAGE_HEADER + len(self._lacing)]
        self._page_serial = serial
        self._page_first = bool(flags & FIRST)
        if self._page_first:
            self._reset_packet()
        elif serial == self.serial:
            if flags & CONTINUED and not self._open:
                self._dropping = True  # its start was before the stream's bytes we saw
            elif not flags & CONTINUED and self._open:
                problems.append("an Ogg packet was cut short (a page is missing)")
                self._reset_packet()
        elif self.serial is None:
            problems.append("Ogg audio before the stream's OpusHead page (its first page)")
        return True

    def _read_segments(self, packets: list[Packet], problems: list[str]) -> bool:
        """Read the current page's segments; False when the rest has not arrived yet."""
        assert self._lacing is not None
        ours = self._page_first or self._page_serial == self.serial
        lacing = self._lacing
        done = 0
        for size in lacing:
            if len(self._buf) < size:
                break
            if ours:
                self._packet += self._buf[:size]
                self._open = size == 255
                if not self._open:
                    self._packet_done(bytes(self._packet), packets, problems)
                    self._packet.clear()
            del self._buf[:size]
            done += 1
        self._lacing = lacing[done:] if done < len(lacing) else None
        return self._lacing is None

    def _packet_done(self, packet: bytes, packets: list[Packet], problems: list[str]) -> None:
        if self._dropping:
            self._dropping = False
            return
        if self._page_first:
            # A stream's first page holds only its identification header (RFC 7845 §3). A
            # new OpusHead starts a new stream (a producer that restarted its recorder).
            if packet.startswith(b"OpusHead"):
                self.serial, self.head = self._page_serial, packet
                self.tags_seen = False
                packets.append(Packet("head", packet))
            elif self.serial is None:
                problems.append(f"Ogg stream of another codec ({packet[:8]!r}); only Opus")
            return
        if not self.tags_seen:
            self.tags_seen = True  # OpusTags: nothing the decoder needs
            return
        packets.append(Packet("audio", packet))

    def _reset_packet(self) -> None:
        self._packet.clear()
        self._open = self._dropping = False
