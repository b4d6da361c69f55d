-- Revocations are announced on channel relay_revocations as "<kind>:<id>",
-- whoever makes them (the service, relayctl, or plain SQL).
CREATE FUNCTION relay_announce_revocation() RETURNS trigger AS $$
BEGIN
    IF TG_TABLE_NAME = 'devices' THEN
        IF NEW.deleted_at IS NOT NULL AND OLD.deleted_at IS NULL THEN
            PERFORM pg_notify('relay_revocations', 'device:' || NEW.id);
        END IF;
    ELSIF NEW.revoked_at IS NOT NULL AND OLD.revoked_at IS NULL THEN
        PERFORM pg_notify('relay_revocations', TG_ARGV[0] || ':' || NEW.id);
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER api_keys_revoked AFTER UPDATE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION relay_announce_revocation('api_key');
CREATE TRIGGER agent_credentials_revoked AFTER UPDATE ON agent_credentials
    FOR EACH ROW EXECUTE FUNCTION relay_announce_revocation('agent_credential');
CREATE TRIGGER devices_deleted AFTER UPDATE ON devices
    FOR EACH ROW EXECUTE FUNCTION relay_announce_revocation('device');
