-- Every delivery Coinflow made, once per transport identity, with the exact body.
CREATE TABLE events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_key       TEXT    NOT NULL UNIQUE,
    event_type      TEXT    NOT NULL,
    category        TEXT    NOT NULL,
    created_raw     TEXT    NOT NULL,
    payment_id      TEXT,
    wallet          TEXT,
    raw_customer_id TEXT,
    outcome         TEXT    NOT NULL,
    held_reason     TEXT,
    received_at_us  INTEGER NOT NULL,
    recorded_at_us  INTEGER NOT NULL,
    raw_body        BLOB    NOT NULL
);
CREATE INDEX events_by_payment ON events (payment_id, seq);

-- The append-only grant ledger. Net entitlements are sums over it. entry_no numbers a
-- payment's entries 1, 2, 3...; the unique key makes a second writer of the same entry
-- fail instead of doubling a grant.
CREATE TABLE ledger (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    payment_id      TEXT    NOT NULL,
    entry_no        INTEGER NOT NULL,
    kind            TEXT    NOT NULL,
    sku             TEXT    NOT NULL,
    quantity        INTEGER NOT NULL,
    wallet          TEXT    NOT NULL,
    raw_customer_id TEXT,
    item            TEXT    NOT NULL,
    catalog_version TEXT    NOT NULL,
    event_key       TEXT    NOT NULL REFERENCES events (event_key),
    recorded_at_us  INTEGER NOT NULL,
    UNIQUE (payment_id, entry_no)
);
CREATE INDEX ledger_by_wallet ON ledger (wallet, sku);
CREATE INDEX ledger_by_customer ON ledger (raw_customer_id, sku) WHERE raw_customer_id IS NOT NULL;

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are immutable'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'events are immutable'); END;
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
