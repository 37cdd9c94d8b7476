-- Each chargeback is its own dispute, named by its data.chargebackId (lifecycle.rs), so a
-- payment's facts need the id of each of its chargeback events. Events recorded from now on
-- store it as they arrive; this fills it in for the events recorded before, from their
-- exact raw bodies.
--
-- Why the backfill is safe:
-- - It spells out what each row already holds (its raw body, which never changes) in a
--   column that did not exist; no recorded fact changes. The immutability trigger is
--   dropped for this one statement and recreated in the same transaction (sqlx runs a
--   migration in one), so no other write ever runs without it: DROP TRIGGER locks the
--   table until the commit, so replicas still serving wait for the migration rather than
--   write around it.
-- - It reads only chargeback events. Their bodies parsed as v2 envelopes when they arrived
--   (a body that does not is stored with an empty event type), so they are JSON without
--   repeated keys; coinflow_chargeback_id still turns any failure (not UTF-8, not JSON, a
--   string PostgreSQL cannot hold) into "no id", so no body can fail the migration.
-- - It takes what the live path takes (coinflow_shared's Data::str): a non-empty string,
--   anything else is no id (the dispute "").
ALTER TABLE events ADD COLUMN chargeback_id TEXT;

-- data.chargebackId of a raw body, or NULL.
CREATE FUNCTION coinflow_chargeback_id(body BYTEA) RETURNS TEXT LANGUAGE plpgsql AS $$
DECLARE
    id JSON;
BEGIN
    id := convert_from(body, 'UTF8')::json -> 'data' -> 'chargebackId';
    IF json_typeof(id) = 'string' THEN
        RETURN NULLIF(id #>> '{}', '');
    END IF;
    RETURN NULL;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END;
$$;

DROP TRIGGER events_immutable ON events;
UPDATE events SET chargeback_id = found.id
FROM (
    SELECT seq, coinflow_chargeback_id(raw_body) AS id FROM events
    WHERE event_type LIKE '%Chargeback%'
) AS found
WHERE events.seq = found.seq AND found.id IS NOT NULL;
CREATE TRIGGER events_immutable BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION coinflow_immutable();

-- Replicas of the previous release go on recording events until they are replaced, and
-- they leave this column NULL: their chargebacks would count as the dispute "" and could
-- keep a payment disputed after its real dispute was won. So an insert that leaves it NULL
-- on a chargeback event gets it from the body, and every writer, old or new, stores the
-- same thing. (SQLite has one process, migrated before it starts: it needs no such
-- trigger.)
CREATE FUNCTION coinflow_fill_chargeback_id() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.chargeback_id := coinflow_chargeback_id(NEW.raw_body);
    RETURN NEW;
END;
$$;
CREATE TRIGGER events_chargeback_id BEFORE INSERT ON events
    FOR EACH ROW WHEN (NEW.chargeback_id IS NULL AND NEW.event_type LIKE '%Chargeback%')
    EXECUTE FUNCTION coinflow_fill_chargeback_id();
