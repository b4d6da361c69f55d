-- Every claim of a device is announced on channel relay_tunnels as
-- "<device id> <epoch> <instance id>": the previous owner fences its stale
-- tunnel at once instead of at its next periodic check.
CREATE FUNCTION relay_announce_claim() RETURNS trigger AS $$
BEGIN
    IF NEW.released_at IS NULL THEN
        PERFORM pg_notify('relay_tunnels', NEW.device_id || ' ' || NEW.epoch || ' ' || NEW.edge_instance);
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER tunnels_claimed AFTER INSERT OR UPDATE ON tunnels
    FOR EACH ROW EXECUTE FUNCTION relay_announce_claim();
