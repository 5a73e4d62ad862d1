"""Control messages: typed, frozen dataclasses carried as CBOR maps inside frames.

Each message class is registered under a 16-bit type code with ``@message(code, name)``.
Field types come from the class annotations and are checked on decode, table-driven: one
validator per annotation, built once at registration.  Unknown keys are ignored (so a newer
peer may add optional fields); a missing field without a default, a value of the wrong type,
an unknown type code or bad CBOR raise ``ProtocolError`` with a specific message.

The message table itself (who sends what, and the replies) is in ``docs/protocol.md`` and in
the modules that speak each protocol (``login_server/protocol.py`` for login).
"""

from __future__ import annotations

import dataclasses
import io
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, Union, dataclass_transform

import cbor2

from overlay.errors import ProtocolError
from overlay.framing import MAX_DATAGRAM_PAYLOAD, Frame

Validator = Callable[[Any, str], Any]
M = TypeVar("M", bound="Message")
R = TypeVar("R", bound="Record")

_REGISTRY: dict[int, type[Message]] = {}
_BY_NAME: dict[str, type[Message]] = {}


class MessageError(ProtocolError):
    """A message is malformed."""

    code = "bad-message"


class UnknownMessageType(MessageError):
    """A message of a type this software does not know."""

    code = "unknown-type"


class Record:
    """A typed CBOR map: the base of messages and of structures nested in them."""

    _validators: ClassVar[dict[str, Validator]] = {}
    _required: ClassVar[frozenset[str]] = frozenset()

    def to_map(self) -> dict[str, Any]:
        return {
            f.name: _encode_value(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }

    @classmethod
    def from_map(cls: type[R], document: Any) -> R:
        if not isinstance(document, dict):
            raise MessageError(f"{_label(cls)} payload is not a map.")
        values: dict[str, Any] = {}
        for name, validate in cls._validators.items():
            if name in document:
                values[name] = validate(document[name], f"{_label(cls)}.{name}")
            elif name in cls._required:
                raise MessageError(f"{_label(cls)} lacks the field '{name}'.")
        return cls(**values)


class Message(Record):
    TYPE: ClassVar[int] = -1
    NAME: ClassVar[str] = "?"
    #: True for replies (pong, error, ...): a datagram endpoint routes them to the waiting request.
    REPLY: ClassVar[bool] = False

    def to_frame(self) -> Frame:
        return Frame(self.TYPE, bytes(cbor2.dumps(self.to_map(), canonical=True)))

    def __bytes__(self) -> bytes:
        return bytes(self.to_frame())


def _label(cls: type) -> str:
    return str(getattr(cls, "NAME", cls.__name__))


def _encode_value(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_map()
    if isinstance(value, tuple | list):
        return [_encode_value(v) for v in value]
    return value


def _scalar(kind: type) -> Validator:
    def check(value: Any, where: str) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise MessageError(f"{where} is too large for a float.") from None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise MessageError(f"{where} must be {kind.__name__}, not {type(value).__name__}.")
        return value

    return check


def _sequence(item: Validator) -> Validator:
    def check(value: Any, where: str) -> Any:
        if not isinstance(value, list):
            raise MessageError(f"{where} must be a list, not {type(value).__name__}.")
        return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))

    return check


def _optional(inner: Validator) -> Validator:
    def check(value: Any, where: str) -> Any:
        return None if value is None else inner(value, where)

    return check


def _nested(kind: type[Record]) -> Validator:
    def check(value: Any, where: str) -> Any:
        return kind.from_map(value)

    return check


def _validator_for(annotation: Any) -> Validator:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {annotation!r}")
        return _optional(_validator_for(args[0]))
    if origin is tuple:
        items = typing.get_args(annotation)
        if len(items) != 2 or items[1] is not Ellipsis:
            raise TypeError(f"only tuple[X, ...] is supported, not {annotation!r}")
        return _sequence(_validator_for(items[0]))
    if isinstance(annotation, type) and issubclass(annotation, Record):
        return _nested(annotation)
    if annotation in (int, str, bytes, bool, float):
        return _scalar(annotation)
    raise TypeError(f"unsupported field type {annotation!r}")


def _prepare(cls: type[R]) -> type[R]:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    cls._validators = {f.name: _validator_for(hints[f.name]) for f in fields}
    cls._required = frozenset(
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    return cls


@dataclass_transform(frozen_default=True)
def record(cls: type[R]) -> type[R]:
    """Class decorator for a nested structure."""
    return _prepare(dataclasses.dataclass(frozen=True)(cls))


@dataclass_transform(frozen_default=True)
def message(type_code: int, name: str, *, reply: bool = False) -> Callable[[type[M]], type[M]]:
    """Class decorator: a frozen dataclass registered under ``type_code``."""

    def register(cls: type[M]) -> type[M]:
        if type_code in _REGISTRY or name in _BY_NAME:
            raise ValueError(f"message type {type_code:#06x}/{name} registered twice")
        cls.TYPE = type_code
        cls.REPLY = reply
        cls.NAME = name
        _prepare(dataclasses.dataclass(frozen=True)(cls))
        _REGISTRY[type_code] = cls
        _BY_NAME[name] = cls
        return cls

    return register


def decode(frame: Frame) -> Message:
    """The message a frame carries; ``ProtocolError`` when it carries none we know."""
    cls = _REGISTRY.get(frame.type)
    if cls is None:
        raise UnknownMessageType(f"Unknown message type {frame.type:#06x}.")
    stream = io.BytesIO(frame.payload)
    try:
        document = cbor2.CBORDecoder(stream).decode()
    except Exception:  # noqa: BLE001 - cbor2 raises many types on garbage
        raise MessageError(f"{cls.NAME} payload is not valid CBOR.") from None
    if stream.tell() != len(frame.payload):
        raise MessageError(f"{cls.NAME} payload has bytes after its CBOR map.")
    return cls.from_map(document)


def parse_datagram(data: bytes) -> Message:
    return decode(Frame.parse(data, MAX_DATAGRAM_PAYLOAD))


def message_types() -> dict[int, type[Message]]:
    return dict(_REGISTRY)


def name_of(type_code: int) -> str:
    cls = _REGISTRY.get(type_code)
    return cls.NAME if cls is not None else f"type {type_code:#06x}"


# -- messages common to every protocol ----------------------------------------------------


@message(0x0001, "error", reply=True)
class Error(Message):
    """The reply to a request that failed: names the request and says why."""

    rid: int
    request: str
    code: str
    message: str
    retry_after: float | None = None


@message(0x0002, "ping")
class Ping(Message):
    rid: int


@message(0x0003, "pong", reply=True)
class Pong(Message):
    rid: int
    time: float
