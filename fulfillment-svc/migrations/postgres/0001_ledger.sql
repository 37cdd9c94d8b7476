-- Every delivery Coinflow made, once per transport identity, with the exact body.
CREATE TABLE events (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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
    received_at_us  BIGINT  NOT NULL,
    recorded_at_us  BIGINT  NOT NULL,
    raw_body        BYTEA   NOT NULL
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
    recorded_at_us  BIGINT  NOT NULL
);

-- One review decision per held payment.
CREATE TABLE reviews (
    payment_id      TEXT    PRIMARY KEY,
    decision        TEXT    NOT NULL CHECK (decision IN ('approved', 'rejected')),
    operator        TEXT    NOT NULL,
    note            TEXT    NOT NULL,
    item            TEXT,
    recorded_at_us  BIGINT  NOT NULL
);

-- The append-only ledger. Net entitlements are sums over it. A payment's entries are
-- numbered 1, 2, 3... (entry_no); the unique key makes a second writer of the same entry
-- fail instead of doubling a grant. Consumption rows have no payment and are idempotent on
-- their key.
CREATE TABLE ledger (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payment_id      TEXT,
    entry_no        BIGINT,
    kind            TEXT    NOT NULL CHECK (kind IN ('grant', 'revoke', 'restore', 'reject', 'consume')),
    sku             TEXT    NOT NULL,
    quantity        BIGINT  NOT NULL,
    wallet          TEXT    NOT NULL,
    raw_customer_id TEXT,
    item            TEXT    NOT NULL DEFAULT '',
    catalog_version TEXT    NOT NULL DEFAULT '',
    event_key       TEXT    REFERENCES events (event_key),
    actor           TEXT    NOT NULL,
    note            TEXT,
    idempotency_key TEXT    UNIQUE,
    recorded_at_us  BIGINT  NOT NULL,
    UNIQUE (payment_id, entry_no),
    CHECK ((payment_id IS NULL) = (kind = 'consume'))
);
CREATE INDEX ledger_by_payment ON ledger (payment_id, seq);
CREATE INDEX ledger_by_wallet ON ledger (wallet, sku, seq);
CREATE INDEX ledger_by_customer ON ledger (raw_customer_id, sku, seq) WHERE raw_customer_id IS NOT NULL;

CREATE FUNCTION coinflow_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are immutable (the ledger is append-only)', TG_TABLE_NAME;
END;
$$;
CREATE TRIGGER events_immutable BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION coinflow_immutable();
CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION coinflow_immutable();
CREATE TRIGGER plans_immutable BEFORE UPDATE ON plans
    FOR EACH ROW EXECUTE FUNCTION coinflow_immutable();
CREATE TRIGGER reviews_immutable BEFORE UPDATE ON reviews
    FOR EACH ROW EXECUTE FUNCTION coinflow_immutable();
