"""Typed payloads without generated code: message classes built from descriptors.

``ListJobTypes`` describes each job type's input and output messages with a
serialized ``FileDescriptorSet``; :func:`message_class` turns it into a message
class in a private descriptor pool, so a client with no .proto files can build
inputs (for example from JSON) and read outputs.
"""

from __future__ import annotations

import functools

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

__all__ = ["from_json", "message_class", "to_json"]


@functools.lru_cache(maxsize=64)
def _pool(descriptor_set: bytes) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(descriptor_set).file:
        pool.Add(file)  # the server sends dependencies first
    return pool


def message_class(descriptor_set: bytes, full_name: str) -> type[Message]:
    """The message class ``full_name`` as described by ``descriptor_set``.

    Raises:
        KeyError: the set does not define ``full_name``.
    """
    descriptor = _pool(descriptor_set).FindMessageTypeByName(full_name)
    cls: type[Message] = message_factory.GetMessageClass(descriptor)
    return cls


def from_json(descriptor_set: bytes, full_name: str, text: str) -> any_pb2.Any:
    """``text`` (protobuf JSON) parsed as ``full_name`` and packed into an ``Any``.

    Raises:
        google.protobuf.json_format.ParseError: ``text`` does not fit the message.
    """
    message = json_format.Parse(text, message_class(descriptor_set, full_name)())
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_json(descriptor_set: bytes, payload: any_pb2.Any) -> str:
    """The protobuf JSON of a packed message described by ``descriptor_set``."""
    message = message_class(descriptor_set, payload.TypeName())()
    payload.Unpack(message)
    # The .proto's own field names (hex_digest), as everywhere else the CLI prints JSON.
    return json_format.MessageToJson(message, indent=None, preserving_proto_field_name=True)
