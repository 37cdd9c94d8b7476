"""A client of fulfillment-svc's query API (`coinflow.fulfillment.v1.Fulfillment`) for
internal services written in Python: a payer's entitlements, the ledger followed from a
cursor with `WatchEntitlements`, and credits spent with `Consume`.

Every call carries `authorization: Bearer <token>`, a token of the query role
(`FULFILLMENT_API_TOKENS`), the one role that may make all of these calls. Unary calls
have a deadline and are retried on UNAVAILABLE and DEADLINE_EXCEEDED: each is idempotent,
`Consume` through the idempotency key the caller chooses. The stubs are generated from
`proto/` with grpcio-tools on first use (`generate_stubs`), never committed.

As a command (one JSON object per line on stdout), with `FULFILLMENT_SERVER` (default
`127.0.0.1:50051`) and `FULFILLMENT_TOKEN`, like `fulfillment-svc`'s own CLI:

    python coinflow_client.py entitlements --wallet W
    python coinflow_client.py consume --wallet W --sku credits --quantity 5 --key order-123
    python coinflow_client.py watch --wallet W --after-seq 0
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import logging
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

log = logging.getLogger("coinflow_client")

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
PROTOS = "coinflow/fulfillment/v1"
# Where the stubs are generated unless COINFLOW_CLIENT_STUBS names another directory.
DEFAULT_STUBS = Path(__file__).resolve().parent / ".stubs"

RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# A watch is resumed after these; RESOURCE_EXHAUSTED is a replica's limit of streams.
WATCH_RESUMED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 5.0


def generate_stubs(out: Path, proto_root: Path = PROTO_ROOT) -> None:
    """Generates the Python modules (and `.pyi` types) of the protos into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p) for p in (proto_root / PROTOS).glob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--pyi_out={out}",
            *protos,
        ],
        check=True,
    )


@functools.cache
def _stubs() -> tuple[ModuleType, ModuleType]:
    """The messages and the service stub, generated first when missing or older than
    the protos."""
    out = Path(os.environ.get("COINFLOW_CLIENT_STUBS") or DEFAULT_STUBS)
    generated = out / PROTOS / "fulfillment_pb2_grpc.py"
    newest = max(p.stat().st_mtime for p in (PROTO_ROOT / PROTOS).glob("*.proto"))
    if not generated.exists() or generated.stat().st_mtime < newest:
        generate_stubs(out)
    sys.path.insert(0, str(out))
    package = PROTOS.replace("/", ".")
    return (
        importlib.import_module(f"{package}.fulfillment_pb2"),
        importlib.import_module(f"{package}.fulfillment_pb2_grpc"),
    )


def _code(error: grpc.RpcError) -> grpc.StatusCode:
    return error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN


def _pause(delay: float) -> float:
    """Sleeps about `delay` (with jitter) and returns the next, longer delay."""
    time.sleep(delay * random.uniform(0.5, 1.0))
    return min(delay * 2, MAX_BACKOFF)


@dataclass(frozen=True)
class Payer:
    """Whose balance: a wallet, or the merchant's own user id (`rawCustomerId`). Either
    names the whole account once a payment tied the two together."""

    wallet: str | None = None
    raw_customer_id: str | None = None

    def __post_init__(self) -> None:
        if bool(self.wallet) == bool(self.raw_customer_id):
            raise ValueError("set exactly one of wallet and raw_customer_id")

    def message(self) -> Any:
        pb, _ = _stubs()
        if self.wallet:
            return pb.Payer(wallet=self.wallet)
        return pb.Payer(raw_customer_id=self.raw_customer_id)


@dataclass(frozen=True)
class Entitlement:
    sku: str
    # Net; negative is debt (a chargeback revoked credits already spent).
    quantity: int
    debt: bool


@dataclass(frozen=True)
class Entry:
    """A ledger entry. `seq` is the cursor `watch` resumes from."""

    seq: int
    kind: str
    sku: str
    quantity: int
    payment_id: str
    wallet: str
    raw_customer_id: str | None
    actor: str

    @classmethod
    def of(cls, m: Any) -> Entry:
        return cls(
            seq=m.seq,
            kind=m.kind,
            sku=m.sku,
            quantity=m.quantity,
            payment_id=m.payment_id,
            wallet=m.wallet,
            raw_customer_id=m.raw_customer_id if m.HasField("raw_customer_id") else None,
            actor=m.actor,
        )


@dataclass(frozen=True)
class Spent:
    entry: Entry
    # The payer's net quantity of the sku now: after the spend, or after the original.
    balance: int
    # True when the key had been used: `entry` is the original spend, nothing was spent.
    duplicate: bool


class SpendRefused(Exception):
    """`Consume` said FAILED_PRECONDITION: the balance is too low, the sku is not
    consumable, or the key was used for a different spend. Retrying cannot help."""


class FulfillmentClient:
    """A channel to fulfillment-svc and the query-role token every call presents."""

    def __init__(
        self, target: str, token: str, *, timeout: float = 5.0, attempts: int = 4
    ) -> None:
        if not token:
            raise ValueError("a token of the query role is required")
        self._target = target
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout
        self._attempts = attempts
        # Keepalive pings notice a connection that died silently under a long watch.
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
            ],
        )
        self._stub = _stubs()[1].FulfillmentStub(self._channel)

    @classmethod
    def from_env(cls) -> FulfillmentClient:
        """`FULFILLMENT_SERVER` (default `127.0.0.1:50051`) and `FULFILLMENT_TOKEN`."""
        token = os.environ.get("FULFILLMENT_TOKEN", "")
        if not token:
            raise SystemExit("set FULFILLMENT_TOKEN to a token of the query role")
        return cls(os.environ.get("FULFILLMENT_SERVER", "127.0.0.1:50051"), token)

    def __repr__(self) -> str:
        return f"FulfillmentClient({self._target!r})"

    def __enter__(self) -> FulfillmentClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary(self, method: Callable[..., Any], request: Any) -> Any:
        """One call with a deadline per attempt, retried with backoff on RETRIED codes:
        only for requests that are safe to repeat."""
        delay, attempt = FIRST_BACKOFF, 1
        while True:
            try:
                return method(request, timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                code = _code(e)
                if code not in RETRIED or attempt == self._attempts:
                    raise
                log.warning("%s: %s, retrying", type(request).__name__, code.name)
            delay, attempt = _pause(delay), attempt + 1

    def entitlements(self, payer: Payer) -> list[Entitlement]:
        pb, _ = _stubs()
        request = pb.GetEntitlementsRequest(payer=payer.message())
        r = self._unary(self._stub.GetEntitlements, request)
        return [Entitlement(e.sku, e.quantity, e.debt) for e in r.entitlements]

    def latest_seq(self, payer: Payer | None = None) -> int:
        """The `seq` of the newest ledger entry (of `payer`), 0 when there is none: a
        cursor to `watch` what is committed from now on."""
        pb, _ = _stubs()
        request = pb.ListLedgerRequest(page_size=1)
        if payer is not None:
            request.payer.CopyFrom(payer.message())
        r = self._unary(self._stub.ListLedger, request)
        return r.entries[0].seq if r.entries else 0

    def consume(self, payer: Payer, sku: str, quantity: int, idempotency_key: str) -> Spent:
        """Spends `quantity` of a consumable sku. `idempotency_key` is the caller's id for
        this spend (say, the purchase's id in the game), the same on every retry: a spend
        repeated with it (by this client after a lost answer, or by the caller after a
        crash) returns the original with `duplicate` set and spends nothing more."""
        if not idempotency_key:
            raise ValueError("idempotency_key is required: your id for this spend")
        pb, _ = _stubs()
        request = pb.ConsumeRequest(
            payer=payer.message(), sku=sku, quantity=quantity, idempotency_key=idempotency_key
        )
        try:
            r = self._unary(self._stub.Consume, request)
        except grpc.RpcError as e:
            if _code(e) == grpc.StatusCode.FAILED_PRECONDITION and isinstance(e, grpc.Call):
                raise SpendRefused(e.details()) from e
            raise
        return Spent(Entry.of(r.entry), r.balance, r.duplicate)

    def watch(
        self, payer: Payer | None = None, after_seq: int = 0, *, follow_for: float | None = None
    ) -> Iterator[Entry]:
        """The ledger entries (of `payer`) committed after `after_seq`, oldest first, as
        they commit: forever, or for `follow_for` seconds. A stream that breaks
        (UNAVAILABLE, a replica's stream limit, or a replica ending it as it shuts down)
        is resumed after the last entry yielded, so none is missed or repeated."""
        pb, _ = _stubs()
        cursor = after_seq
        deadline = None if follow_for is None else time.monotonic() + follow_for
        delay = FIRST_BACKOFF
        while deadline is None or time.monotonic() < deadline:
            request = pb.WatchEntitlementsRequest(after_seq=cursor)
            if payer is not None:
                request.payer.CopyFrom(payer.message())
            remaining = None if deadline is None else deadline - time.monotonic()
            call = self._stub.WatchEntitlements(request, timeout=remaining, metadata=self._metadata)
            try:
                for message in call:
                    entry = Entry.of(message)
                    cursor, delay = entry.seq, FIRST_BACKOFF
                    yield entry
                why = "the server ended the stream"
            except grpc.RpcError as e:
                code = _code(e)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
                    return
                if code not in WATCH_RESUMED:
                    raise
                why = code.name
            finally:
                call.cancel()
            log.warning("watch interrupted (%s); resuming after seq %d", why, cursor)
            delay = _pause(delay)


def _json(value: Entitlement | Entry | Spent) -> str:
    return json.dumps(dataclasses.asdict(value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("entitlements", "consume", "watch"):
        command = commands.add_parser(name)
        who = command.add_mutually_exclusive_group(required=name != "watch")
        who.add_argument("--wallet")
        who.add_argument("--customer", help="rawCustomerId")
        if name == "consume":
            command.add_argument("--sku", required=True)
            command.add_argument("--quantity", type=int, required=True)
            command.add_argument("--key", required=True, help="your id for this spend")
        if name == "watch":
            command.add_argument("--after-seq", type=int, default=0)
            command.add_argument("--for", dest="follow_for", type=float, help="seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    payer = Payer(args.wallet, args.customer) if args.wallet or args.customer else None
    with FulfillmentClient.from_env() as client:
        if args.command == "watch":
            for entry in client.watch(payer, args.after_seq, follow_for=args.follow_for):
                print(_json(entry), flush=True)
            return 0
        if payer is None:
            parser.error("name the payer: --wallet or --customer")
        if args.command == "entitlements":
            for e in client.entitlements(payer):
                print(_json(e), flush=True)
            return 0
        try:
            print(_json(client.consume(payer, args.sku, args.quantity, args.key)), flush=True)
        except SpendRefused as e:
            print(f"refused: {e}", file=sys.stderr)
            return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
