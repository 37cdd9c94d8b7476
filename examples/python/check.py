"""The scenario `tests/tests/it/python_client.rs` runs with this client against the real
services, one JSON object per step on stdout (the test checks each against the ledger):

1. `entitlements`: the payer's balances;
2. `cursor`: the `seq` of the payer's newest ledger entry;
3. `consume` twice: one spend sent twice with the same idempotency key;
4. `entitlements` again;
5. `watched`: the payer's entries after the cursor, each as it arrives, until `--follow`
   of them were seen (the test breaks the connection in between).

`FULFILLMENT_SERVER` and `FULFILLMENT_TOKEN` (a query-role token) as for the client.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any

from coinflow_client import FulfillmentClient, Payer


def emit(step: str, **fields: Any) -> None:
    print(json.dumps({"step": step, **fields}), flush=True)


def balances(client: FulfillmentClient, payer: Payer) -> list[dict[str, Any]]:
    return [dataclasses.asdict(e) for e in client.entitlements(payer)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wallet", required=True)
    parser.add_argument("--sku", default="credits")
    parser.add_argument("--quantity", type=int, required=True)
    parser.add_argument("--key", required=True, help="the spend's idempotency key")
    parser.add_argument("--follow", type=int, required=True, help="entries to watch")
    parser.add_argument("--follow-secs", type=float, default=60.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    payer = Payer(wallet=args.wallet)
    with FulfillmentClient.from_env() as client:
        emit("entitlements", entitlements=balances(client, payer))
        cursor = client.latest_seq(payer)
        emit("cursor", seq=cursor)
        for attempt in (1, 2):
            spent = client.consume(payer, args.sku, args.quantity, args.key)
            emit("consume", attempt=attempt, **dataclasses.asdict(spent))
        emit("entitlements", entitlements=balances(client, payer))
        seen = 0
        for entry in client.watch(payer, cursor, follow_for=args.follow_secs):
            emit("watched", entry=dataclasses.asdict(entry))
            seen += 1
            if seen == args.follow:
                return 0
    print(f"saw {seen} of {args.follow} entries in {args.follow_secs} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
