"""Framed pickle messages between the suite and its worker processes: a 4-byte big-endian length, then
the pickle. Both sides are trusted r1kit code; untrusted text only travels inside the messages."""

from __future__ import annotations

import pickle
import struct
from typing import Any, BinaryIO

HEADER = struct.Struct(">I")


def encode_frame(message: Any) -> bytes:
    """A message as one frame: length header + pickle."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


def read_frame(stream: BinaryIO) -> Any:
    """Next message from a blocking framed stream; None at end of stream."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (length,) = HEADER.unpack(header)
    return pickle.loads(stream.read(length))


def split_frames(buffer: bytearray) -> list[Any]:
    """Remove every complete frame from the front of `buffer` and return their messages."""
    messages = []
    while len(buffer) >= HEADER.size:
        (length,) = HEADER.unpack_from(buffer)
        if len(buffer) < HEADER.size + length:
            break
        messages.append(pickle.loads(bytes(buffer[HEADER.size : HEADER.size + length])))
        del buffer[: HEADER.size + length]
    return messages
