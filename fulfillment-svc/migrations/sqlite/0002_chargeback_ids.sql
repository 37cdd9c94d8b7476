-- Each chargeback is its own dispute, named by its data.chargebackId (lifecycle.rs), so a
-- payment's facts need the id of each of its chargeback events. Events recorded from now on
-- store it as they arrive; this fills it in for the events recorded before, from their
-- exact raw bodies.
--
-- Why the backfill is safe:
-- - It spells out what each row already holds (its raw body, which never changes) in a
--   column that did not exist; no recorded fact changes. The immutability trigger is
--   dropped for this one statement and recreated in the same transaction (sqlx runs a
--   migration in one), so no other write ever runs without it.
-- - It reads only chargeback events. Their bodies parsed as v2 envelopes when they arrived
--   (a body that does not is stored with an empty event type), so they are JSON without
--   repeated keys; json_valid still guards every read, so no body can fail the migration.
-- - It takes what the live path takes (coinflow_shared's Data::str): a non-empty string,
--   anything else is no id (the dispute ""). One difference is left: SQLite matches the key
--   as spelled, so a body that wrote it with escapes ("chargeback\u0049d") reads as having
--   no id here; Coinflow does not write keys that way.
ALTER TABLE events ADD COLUMN chargeback_id TEXT;

DROP TRIGGER events_no_update;
UPDATE events
SET chargeback_id =
    CASE WHEN json_valid(CAST(raw_body AS TEXT)) THEN
        CASE WHEN json_type(CAST(raw_body AS TEXT), '$.data.chargebackId') = 'text' THEN
            NULLIF(json_extract(CAST(raw_body AS TEXT), '$.data.chargebackId'), '')
        END
    END
WHERE event_type LIKE '%Chargeback%';
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are immutable'); END;
