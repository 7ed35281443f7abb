"""The AMQP trigger (RabbitMQ): a queue's messages as SCF CMQ events, and an AMQP dead-letter sink.

**Source** (``type = "amqp"``). It consumes one queue with manual acks and a
consumer QoS of ``prefetch`` unacknowledged messages, which is also the bound
on what it holds in memory. Each message becomes one CMQ record in the
publisher's shape: ``msgBody`` is the body as text, ``msgId`` the AMQP
``message_id`` (a random id when the publisher set none), ``publishTime`` the
AMQP ``timestamp`` (else the time it was received), ``requestId`` the
``correlation_id``, and ``msgTag`` the routing key (for messages that came
through an exchange) followed by the values of a ``tags`` or ``msgTag`` header
(a list, or a comma-separated string). ``topicName`` is the exchange (the queue
for messages published to it directly) and ``subscriptionName`` the queue.

- **Topology.** With ``declare = true`` (the default) the queue is declared
  durable (with ``queue_arguments``, e.g. ``{"x-queue-type" = "quorum"}``) and,
  when ``exchange`` is set, the exchange is declared durable with
  ``exchange_type`` (topic by default) and the queue bound to it with each
  ``routing_key`` (``"#"`` by default). Declaring is idempotent, and fails
  clearly when the queue exists with other settings. With ``declare = false``
  the queue and exchange must exist (checked passively); bindings are still made.
- **Acknowledgement.** A message is acked (``basic.ack``) only in ``ack()``,
  i.e. once its event is durably in the local queue. ``nack()`` requeues it
  (``basic.nack``, requeue); a message that was already redelivered is requeued
  after a one-second pause so a persistent failure cannot spin. A process that
  dies before acceptance leaves its messages unacked: the broker redelivers
  them. Delivery is at least once.
- **Bodies that are not UTF-8** are base64-encoded: ``msgBody`` is the base64
  text and ``msgTag`` carries ``msgBodyBase64`` (the record also has
  ``body_base64 = true`` for renderers that show it; the ``native`` format has
  ``body_base64``). Bodies that are not JSON are passed as text: CMQ bodies are
  strings. Bodies too large for an async event (128 KB) are dead-lettered by
  the core at once and the message is acked, so no poison message loops.
- **Connections.** ``connect()`` fails with a clear message for an unreachable
  broker, refused credentials, a missing virtual host, a missing queue; the
  daemon logs it and retries with backoff while other triggers run. When the
  connection or channel drops later, or the broker cancels the consumer (the
  queue was deleted), ``read()`` raises ``NotConnected`` and the next
  ``connect()`` starts over; unacked messages come back from the broker.
- **Secrets.** The URL's password comes from ``url``, ``url_file`` (the whole
  URL in a file) or ``password_file`` (replaces the URL's password), all read
  at ``connect()``. It is registered with the log redactor and never appears in
  messages: URLs are shown as ``amqp://user:***@host:port/vhost``.

**Dead-letter sink** (``dead_letter = "amqp://…"`` on a function): see
:class:`AmqpDeadLetterSink`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import json
import math
import urllib.parse
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from bridge.plugin import (
    DeadLetterContext,
    DeadLetterSink,
    Delivery,
    Duration,
    EndOfInput,
    Event,
    Kind,
    NotConnected,
    RelPath,
    SettleDelivery,
    Source,
    SourceContext,
    TriggerConfig,
    cmq_record,
    parse_sink,
    read_secret_file,
    register_secret,
    sink_error,
)

if TYPE_CHECKING:
    from aio_pika.abc import (
        AbstractChannel,
        AbstractConnection,
        AbstractExchange,
        AbstractIncomingMessage,
    )

#: the msgTag that marks a base64-encoded msgBody (the body was not UTF-8)
BASE64_TAG = "msgBodyBase64"
NACK_DELAY_S = 1.0  # before requeueing a message that was already redelivered
PUBLISH_TIMEOUT_S = 30.0  # dead letters: wait this long for the broker's confirm


class AmqpError(ConnectionError):
    """The AMQP broker could not be used (the message says why, without secrets)."""


# --- URLs and secrets -------------------------------------------------------------------------


def redact(url: str) -> str:
    """``amqp://user:***@host:5672/vhost``: the URL without its password (or query)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return "<invalid AMQP URL>"
    try:
        port: int | str | None = parts.port
    except ValueError:  # named as it is not: the rest still says which broker is meant
        port = "<invalid port>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{port}" if port else "")
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        netloc = f"{user}:***@{netloc}" if parts.password is not None else f"{user}@{netloc}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_url(url: str) -> None:
    """Raise ValueError (without the secret) unless ``url`` is an amqp(s):// URL with a host."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
    except ValueError:  # (urllib's reason may quote the userinfo: not said)
        raise ValueError("invalid AMQP URL (its host part cannot be read)") from None
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:  # (this reason quotes the port only)
        raise ValueError(f"invalid AMQP URL {redact(url.strip())}: {e}") from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"an AMQP URL starts with amqp:// or amqps://, not {parts.scheme}://")
    if not parts.hostname:
        raise ValueError(f"AMQP URL {redact(url)} has no host")


def with_password(url: str, password: str) -> str:
    """``url`` with its password replaced (URL-encoded)."""
    parts = urllib.parse.urlsplit(url)
    user = parts.username or "guest"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _register_secrets(url: str) -> None:
    password = urllib.parse.urlsplit(url).password
    if password:
        register_secret(password)
        register_secret(urllib.parse.unquote(password))


def explain(e: BaseException, where: str, *, user: str | None = None) -> str:
    """An operator's explanation of a connection or channel error (never the secret)."""
    import aiormq.exceptions as ae

    text = _broker_text(e)
    if isinstance(e, ae.ProbableAuthenticationError | ae.AuthenticationError):
        who = f" of user {user!r}" if user else ""
        return f"AMQP broker {where} refused the credentials{who} ({text})"
    if isinstance(e, TimeoutError):
        return f"AMQP broker {where} did not answer in time"
    if isinstance(e, ae.ChannelNotFoundEntity):
        return f"{where}: {text}"
    if isinstance(e, ae.ChannelPreconditionFailed):
        return (
            f"{where}: {text} (the queue or exchange exists with other settings; "
            "match them, or set declare = false)"
        )
    if isinstance(e, ae.ChannelAccessRefused):
        return f"{where}: permission denied: {text}"
    if isinstance(e, ae.ConnectionNotAllowed) or (
        isinstance(e, ae.InvalidFrameError) and "Connection.OpenOk" in text
    ):
        return (
            f"AMQP broker {where} refused to open the connection: does the virtual host "
            "exist, and may the user use it?"
        )
    if isinstance(e, ae.AMQPConnectionError | OSError):
        return f"cannot reach AMQP broker {where}: {text}"
    return f"AMQP broker {where}: {type(e).__name__}: {text}"


def _broker_text(e: BaseException) -> str:
    """The human part of an aio-pika/aiormq/OS error."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    args: tuple[Any, ...] = tuple(getattr(e, "args", ()))
    if len(args) == 2 and isinstance(args[1], str):
        return args[1]  # aiormq: (errno or code, "text")
    texts = [a for a in args if isinstance(a, str) and a]
    return texts[0] if texts else type(e).__name__


# --- config -----------------------------------------------------------------------------------


class AmqpConfig(TriggerConfig):
    """``[triggers.NAME]`` with ``type = "amqp"``."""

    url: str | None = Field(
        None,
        repr=False,
        description="Broker URL, amqp://user:password@host:5672/vhost (amqps:// for TLS; query "
        "parameters such as heartbeat=30 go to the client). Set url or url_file.",
    )
    url_file: RelPath | None = Field(
        None, description="File holding the broker URL (systemd LoadCredential)."
    )
    password_file: RelPath | None = Field(
        None, description="File holding the password; replaces the one in the URL."
    )
    queue: str = Field(min_length=1, max_length=255, description="The queue to consume.")
    declare: bool = Field(
        True,
        description="Declare the queue (durable) and the exchange (durable) if missing; "
        "false: they must exist.",
    )
    queue_arguments: dict[str, str | int | float | bool] = Field(
        {}, description='Arguments of the declared queue, e.g. {"x-queue-type" = "quorum"}.'
    )
    exchange: str | None = Field(
        None, min_length=1, max_length=255, description="Bind the queue to this exchange."
    )
    exchange_type: Literal["topic", "direct", "fanout", "headers"] = Field(
        "topic", description="Type of the declared exchange."
    )
    routing_key: list[str] | None = Field(
        None,
        description='Binding key(s) to the exchange; default "#" (every message of a topic '
        "exchange).",
    )
    prefetch: int = Field(
        100, ge=1, le=65535, description="Unacknowledged messages the broker may send ahead."
    )
    connect_timeout: Duration = Field(
        10.0, gt=0, description="How long connecting to the broker may take."
    )

    @field_validator("routing_key", mode="before")
    @classmethod
    def _one_or_more(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> AmqpConfig:
        if (self.url is None) == (self.url_file is None):
            raise ValueError("set exactly one of url and url_file")
        url = self.url if self.url is not None else read_secret_file(self.url_file)  # type: ignore[arg-type]
        try:
            check_url(url)
        except ValueError as e:
            where = f"url_file {self.url_file}: " if self.url_file is not None else "url: "
            raise ValueError(f"{where}{e}") from None
        if self.password_file is not None:
            read_secret_file(self.password_file)  # readable now, or a clear error
        if self.routing_key is not None and self.exchange is None:
            raise ValueError("routing_key needs an exchange to bind to")
        return self

    def broker_url(self) -> str:
        """The URL with its secret, read now from url_file/password_file (connect time)."""
        if self.url is not None:
            url = self.url.strip()
        else:
            assert self.url_file is not None
            url = read_secret_file(self.url_file)
        if self.password_file is not None:
            url = with_password(url, read_secret_file(self.password_file))
        return url


# --- events -----------------------------------------------------------------------------------


def _text(data: bytes) -> tuple[str, bool]:
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), True


def _clean(s: str) -> str:
    """A string safe to encode as UTF-8 JSON (lone surrogates replaced)."""
    if s.isascii():
        return s
    try:
        s.encode()
    except UnicodeEncodeError:
        return s.encode(errors="replace").decode()
    return s


def plain(value: Any, depth: int = 0) -> Any:
    """A JSON-compatible copy of an AMQP field value (headers may hold bytes, Decimals,
    datetimes...). Rendering must never fail, or the message would be requeued forever."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        text, b64 = _text(bytes(value))
        return {"base64": text} if b64 else text
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if depth > 16:
        return _clean(str(value))
    if isinstance(value, Mapping):
        return {_clean(str(k)): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v, depth + 1) for v in value]
    return _clean(str(value))


def header_tags(headers: Mapping[str, Any] | None) -> list[str]:
    """Tags a publisher put in a ``tags`` or ``msgTag`` header (a list or "a,b")."""
    out: list[str] = []
    for name in ("tags", "msgTag"):
        value = (headers or {}).get(name)
        if value is None:
            continue
        if isinstance(value, bytes | bytearray):
            value = bytes(value).decode(errors="replace")
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            items = [items]
        for item in items:
            text = plain(item)
            text = text if isinstance(text, str) else json.dumps(text)
            if text.strip():
                out.append(text.strip())
    return out


def message_event(
    trigger: str, queue: str, message: AbstractIncomingMessage, *, now: datetime | None = None
) -> Event:
    """The CMQ event of one AMQP message (see the module docstring for the mapping)."""
    body, b64 = _text(message.body)
    exchange = _clean(message.exchange or "")
    routing_key = _clean(message.routing_key or "")
    tags = [routing_key] if exchange and routing_key else []
    tags += header_tags(message.headers)
    if b64:
        tags.append(BASE64_TAG)
    ts = message.timestamp
    if isinstance(ts, datetime):
        published = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    else:  # AMQP timestamps are whole seconds; so is CMQ's publishTime
        published = (now or datetime.now(UTC)).replace(microsecond=0)
    msg_id = _clean(str(message.message_id)) if message.message_id else uuid.uuid4().hex
    rec = cmq_record(
        msg_id=msg_id,
        body=body,
        publish_time=published,
        topic=exchange or queue,
        subscription=queue,
        request_id=_clean(str(message.correlation_id or "")),
        tags=tags,
        type="topic" if exchange else "queue",
    )
    if b64:
        rec["body_base64"] = True
    native = {
        "queue": queue,
        "exchange": exchange,
        "routing_key": routing_key,
        "redelivered": bool(message.redelivered),
        "body": body,
        "body_base64": b64,
        "headers": plain(message.headers or {}),
        "properties": plain(
            {
                "message_id": message.message_id,
                "correlation_id": message.correlation_id,
                "content_type": message.content_type,
                "content_encoding": message.content_encoding,
                "timestamp": message.timestamp,
                "type": message.type,
                "app_id": message.app_id,
                "user_id": message.user_id,
                "reply_to": message.reply_to,
                "expiration": message.expiration,
                "priority": message.priority,
            }
        ),
    }
    return Event(kind=Kind.CMQ, trigger=trigger, time=published, records=(rec,), native=native)


# --- the source -------------------------------------------------------------------------------


class AmqpSource(Source[AmqpConfig]):
    """CMQ events from an AMQP queue, acked once accepted (see the module docstring).

    One ``read()`` at a time; ``close()`` makes a waiting ``read()`` raise ``EndOfInput``.
    """

    Config = AmqpConfig

    def __init__(self, config: AmqpConfig, ctx: SourceContext) -> None:
        super().__init__(config, ctx)
        self.where = (
            redact(config.url) if config.url is not None else f"(url_file {config.url_file})"
        )
        self._conn: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._generation = 0  # of the connection; callbacks of older ones are ignored
        self._buf: collections.deque[AbstractIncomingMessage] = collections.deque()
        self._signal = asyncio.Event()
        self._lost: str | None = "not connected"
        self._closed = False
        # counters (status)
        self.received = 0
        self.acked = 0
        self.requeued = 0
        self.connects = 0

    async def connect(self) -> None:
        if self._closed:
            return
        await self._disconnect()
        try:
            import aio_pika
        except ImportError:
            raise ImportError(
                "the amqp trigger needs aio-pika: pip install 'event-bridge[amqp]'"
            ) from None
        url = self.config.broker_url()
        _register_secrets(url)
        self.where = redact(url)
        user = urllib.parse.urlsplit(url).username
        try:
            conn = await aio_pika.connect(
                url,
                timeout=self.config.connect_timeout,
                client_properties={"connection_name": f"event-bridge trigger {self.ctx.name}"},
            )
        except Exception as e:
            raise AmqpError(explain(e, self.where, user=user)) from None
        self._generation += 1
        gen = self._generation
        try:
            channel = await conn.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=self.config.prefetch)
            queue = await channel.declare_queue(
                self.config.queue,
                durable=True,
                passive=not self.config.declare,
                arguments=dict(self.config.queue_arguments) or None,
            )
            if self.config.exchange is not None:
                exchange = await channel.declare_exchange(
                    self.config.exchange,
                    self.config.exchange_type,
                    durable=True,
                    passive=not self.config.declare,
                )
                for key in self.config.routing_key or ["#"]:
                    await queue.bind(exchange, key)
            conn.close_callbacks.add(lambda _s, e: self._lose(gen, "connection", e))
            channel.close_callbacks.add(lambda _s, e: self._lose(gen, "channel", e))
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(
                lambda _f: self._lose(gen, "consumer", "cancelled by the broker")
            )
            self._buf.clear()
            self._lost = None
            self._conn, self._channel = conn, channel
            await queue.consume(self._on_message, no_ack=False)
        except Exception as e:
            self._conn = self._channel = None
            self._lost = "not connected"
            await _close_quietly(conn)
            what = f"{self.where} queue {self.config.queue!r}"
            raise AmqpError(explain(e, what, user=user)) from None
        self.connects += 1
        if self.connects > 1:
            self.ctx.logger.info("trigger %s: reconnected to %s", self.ctx.name, self.where)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._lost is None and not self._closed:
            self._buf.append(message)
            self._signal.set()

    def _lose(self, gen: int, what: str, why: object) -> None:
        if gen != self._generation or self._lost is not None or self._closed:
            return  # an old connection, or one we are closing ourselves
        reason = _broker_text(why) if isinstance(why, BaseException) else str(why or "closed")
        self._lost = f"AMQP {what} to {self.where} lost: {reason}"
        # unacked messages come back from the broker; the channel they came on is gone
        self._buf.clear()
        self._signal.set()

    async def read(self) -> Delivery:
        while True:
            if self._closed:
                raise EndOfInput
            if self._lost is not None:
                raise NotConnected(self._lost)
            if self._buf:
                message = self._buf.popleft()
                self.received += 1
                event = message_event(self.ctx.name, self.config.queue, message)
                return SettleDelivery(
                    event, partial(self._ack, message), partial(self._nack, message), key=message
                )
            self._signal.clear()
            await self._signal.wait()

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        """``basic.ack``: the only place a message is settled for good."""
        try:
            await message.ack()
        except Exception as e:
            raise AmqpError(
                f"could not ack message {message.message_id or message.delivery_tag} "
                f"on {self.where} ({type(e).__name__}: {e}); the broker will deliver it "
                "again (a duplicate)"
            ) from None
        self.acked += 1

    async def _nack(self, message: AbstractIncomingMessage, error: BaseException | None) -> None:
        """A requeueing ``basic.nack``; never raises."""
        try:
            if message.redelivered:
                await asyncio.sleep(NACK_DELAY_S)  # a persistent failure must not spin
            await message.nack(requeue=True)
            self.requeued += 1
        except Exception as e:  # the channel is gone: the broker requeues it anyway
            self.ctx.logger.debug("nack failed (%s); the broker requeues the message", e)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._signal.set()
        await self._disconnect()

    async def _disconnect(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        self._generation += 1
        self._buf.clear()
        if conn is not None:
            await _close_quietly(conn)

    def sample_event(self, now: datetime) -> Event:
        rec = cmq_record(
            msg_id=uuid.uuid4().hex,
            body="sample message",
            publish_time=now,
            topic=self.config.exchange or self.config.queue,
            subscription=self.config.queue,
            type="topic" if self.config.exchange else "queue",
        )
        return Event(kind=Kind.CMQ, trigger=self.ctx.name, time=now, records=(rec,))

    def status(self) -> Mapping[str, Any]:
        return {
            "broker": self.where,
            "queue": self.config.queue,
            "connected": self._lost is None and not self._closed,
            "buffered": len(self._buf),
            "received": self.received,
            "acked": self.acked,
            "requeued": self.requeued,
            "connects": self.connects,
        }


async def _close_quietly(conn: AbstractConnection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 10.0)
    except Exception:  # closing a broken connection: nothing left to release
        pass


# --- the dead-letter sink -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SinkTarget:
    """Where an :class:`AmqpDeadLetterSink` publishes, parsed from its URL."""

    url: str  # the broker URL without the sink's own query parameters
    queue: str | None
    exchange: str | None
    routing_key: str
    password_file: Path | None


_SINK_PARAMS = ("queue", "exchange", "routing_key", "password_file")
_SINK_USAGE = "amqp://USER:PASS@HOST:5672/VHOST?queue=NAME (or ?exchange=NAME&routing_key=KEY)"


def parse_sink_url(spec: str) -> SinkTarget:
    """``amqp://user:pass@host:5672/vhost?queue=NAME`` or ``…?exchange=NAME&routing_key=KEY``
    (plus ``password_file=/path``); other query parameters go to the client. Raises
    ValueError (a :class:`SinkUrlError` naming the key and the bad part, without secrets)."""
    scheme = "amqps" if spec.strip().lower().startswith("amqps:") else "amqp"
    url = parse_sink(spec, scheme, usage=_SINK_USAGE)
    ours = {k: v for k, v in url.params.items() if k in _SINK_PARAMS}
    rest = [(k, v) for k, v in url.params.items() if k not in _SINK_PARAMS]
    queue, exchange = ours.get("queue") or None, ours.get("exchange") or None
    if (queue is None) == (exchange is None):
        raise sink_error(spec, "give either ?queue=NAME or ?exchange=NAME", _SINK_USAGE)
    if queue is not None and "routing_key" in ours:
        raise sink_error(spec, "routing_key goes with exchange, not with queue", _SINK_USAGE)
    parts = urllib.parse.urlsplit(url.text)
    pw = ours.get("password_file")
    return SinkTarget(
        url=urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest))),
        queue=queue,
        exchange=exchange,
        routing_key=queue if queue is not None else ours.get("routing_key", ""),
        password_file=Path(pw) if pw else None,
    )


class AmqpDeadLetterSink(DeadLetterSink):
    """Dead letters published to RabbitMQ: ``dead_letter = "amqp://…?queue=NAME"`` publishes
    to a durable queue (declared if missing) through the default exchange;
    ``"amqp://…?exchange=NAME&routing_key=KEY"`` publishes to an existing exchange.
    ``password_file=/path`` in the query replaces the URL's password.

    Each record is one persistent message: the JSON record as body
    (``application/json``), ``message_id`` = the record's ``RequestId``, headers
    ``ErrorClass``, ``FunctionName`` and ``TriggerName``. ``put`` returns only once the
    broker confirmed it (publisher confirms, mandatory routing) and raises otherwise —
    an unroutable record, a nack, a timeout, a lost connection — so the event stays in
    the local queue and dead-lettering is retried: nothing is lost.
    """

    def __init__(self, url: str, ctx: DeadLetterContext) -> None:
        super().__init__(url, ctx)
        self.target = parse_sink_url(url)
        self.where = redact(url)
        _register_secrets(url)
        self._conn: AbstractConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._lock: asyncio.Lock | None = None

    async def _open(self) -> AbstractExchange:
        import aio_pika

        url = self.target.url
        if self.target.password_file is not None:
            url = with_password(url, read_secret_file(self.target.password_file))
            _register_secrets(url)
        user = urllib.parse.urlsplit(url).username
        try:
            conn = await aio_pika.connect(
                url,
                timeout=PUBLISH_TIMEOUT_S,
                client_properties={"connection_name": "event-bridge dead letters"},
            )
        except Exception as e:
            raise AmqpError(explain(e, self.where, user=user)) from None
        try:
            channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
            exchange: AbstractExchange
            if self.target.queue is not None:
                await channel.declare_queue(self.target.queue, durable=True)
                exchange = channel.default_exchange
            else:
                assert self.target.exchange is not None
                exchange = await channel.get_exchange(self.target.exchange, ensure=True)
        except Exception as e:
            await _close_quietly(conn)
            raise AmqpError(explain(e, self.where, user=user)) from None
        self._conn, self._exchange = conn, exchange
        return exchange

    async def put(self, record: Mapping[str, Any]) -> None:
        import aio_pika

        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            exchange = self._exchange
            if exchange is None or self._conn is None or self._conn.is_closed:
                await self._reset()
                exchange = await self._open()
        body = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
        body_meta = record.get("Body", {})
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(record.get("RequestId", "")) or None,
            timestamp=datetime.now(UTC),
            headers={
                "ErrorClass": str(record.get("ErrorClass", "")),
                "FunctionName": str(body_meta.get("FunctionName", "")),
                "TriggerName": str(body_meta.get("TriggerName", "")),
            },
        )
        try:
            await asyncio.wait_for(
                exchange.publish(message, routing_key=self.target.routing_key, mandatory=True),
                PUBLISH_TIMEOUT_S,
            )
        except Exception as e:
            await self._reset()
            raise AmqpError(
                f"dead letter {record.get('RequestId')} was not confirmed by {self.where}: "
                f"{_publish_problem(e)}"
            ) from None

    async def _reset(self) -> None:
        conn, self._conn, self._exchange = self._conn, None, None
        if conn is not None:
            await _close_quietly(conn)

    async def close(self) -> None:
        await self._reset()


def _publish_problem(e: BaseException) -> str:
    import aiormq.exceptions as ae

    if isinstance(e, ae.PublishError):
        return "unroutable (no queue is bound for it)"
    if isinstance(e, ae.DeliveryError):
        return "the broker refused it (basic.nack)"
    if isinstance(e, TimeoutError):
        return f"no confirm within {PUBLISH_TIMEOUT_S:.0f}s"
    return f"{type(e).__name__}: {_broker_text(e)}"
