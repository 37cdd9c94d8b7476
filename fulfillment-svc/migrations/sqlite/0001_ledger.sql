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
    refund_status   TEXT,
    outcome         TEXT    NOT NULL,
    held_reason     TEXT,
    received_at_us  INTEGER NOT NULL,
    recorded_at_us  INTEGER NOT NULL,
    raw_body        BLOB    NOT NULL
);
CREATE INDEX events_by_payment ON events (payment_id, seq);
CREATE INDEX events_held ON events (outcome, seq) WHERE outcome = 'held';

-- What a payment is worth, fixed once: by the first Settled that matched the catalog, or
-- by an operator's approval. Later catalog changes never reprice a payment.
CREATE TABLE plans (
    payment_id      TEXT    PRIMARY KEY,
    source          TEXT    NOT NULL CHECK (source IN ('catalog', 'review')),
    item            TEXT    NOT NULL,
    catalog_version TEXT    NOT NULL,
    grants          TEXT    NOT NULL, -- JSON [{"sku": .., "quantity": ..}]
    wallet          TEXT    NOT NULL,
    raw_customer_id TEXT,
    recorded_at_us  INTEGER NOT NULL
);

-- One review decision per held payment.
CREATE TABLE reviews (
    payment_id      TEXT    PRIMARY KEY,
    decision        TEXT    NOT NULL CHECK (decision IN ('approved', 'rejected')),
    operator        TEXT    NOT NULL,
    note            TEXT    NOT NULL,
    item            TEXT,
    recorded_at_us  INTEGER NOT NULL
);

-- The append-only ledger. Net entitlements are sums over it. A payment's entries are
-- numbered 1, 2, 3... (entry_no); the unique key makes a second writer of the same entry
-- fail instead of doubling a grant. Consumption rows have no payment and are idempotent on
-- their key.
CREATE TABLE ledger (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    payment_id      TEXT,
    entry_no        INTEGER,
    kind            TEXT    NOT NULL CHECK (kind IN ('grant', 'revoke', 'restore', 'reject', 'consume')),
    sku             TEXT    NOT NULL,
    quantity        INTEGER NOT NULL,
    wallet          TEXT    NOT NULL,
    raw_customer_id TEXT,
    item            TEXT    NOT NULL DEFAULT '',
    catalog_version TEXT    NOT NULL DEFAULT '',
    event_key       TEXT    REFERENCES events (event_key),
    actor           TEXT    NOT NULL,
    note            TEXT,
    idempotency_key TEXT    UNIQUE,
    recorded_at_us  INTEGER NOT NULL,
    UNIQUE (payment_id, entry_no),
    CHECK ((payment_id IS NULL) = (kind = 'consume'))
);
CREATE INDEX ledger_by_payment ON ledger (payment_id, seq);
CREATE INDEX ledger_by_wallet ON ledger (wallet, sku, seq);
CREATE INDEX ledger_by_customer ON ledger (raw_customer_id, sku, seq) WHERE raw_customer_id IS NOT NULL;

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are immutable'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'events are immutable'); END;
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER plans_no_update BEFORE UPDATE ON plans
BEGIN SELECT RAISE(ABORT, 'plans are immutable'); END;
CREATE TRIGGER reviews_no_update BEFORE UPDATE ON reviews
BEGIN SELECT RAISE(ABORT, 'reviews are immutable'); END;
