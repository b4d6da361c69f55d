-- Tenants, devices, API keys, agent credentials and the tunnel registry.
-- Times are milliseconds since the Unix epoch (BIGINT), the same on SQLite.

CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

-- A device is one printer behind one agent. Its id is its subdomain label.
-- Deleted devices keep their row (deleted_at), so an id is never reused.
CREATE TABLE devices (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants (id),
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    deleted_at  BIGINT
);
CREATE UNIQUE INDEX devices_live_name ON devices (tenant_id, name) WHERE deleted_at IS NULL;

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants (id),
    device_id     TEXT REFERENCES devices (id),
    scope         TEXT NOT NULL CHECK (scope IN ('read', 'control')),
    label         TEXT NOT NULL,
    secret_digest TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT,
    last_used_at  BIGINT,
    revoked_at    BIGINT
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
CREATE INDEX api_keys_revoked_at ON api_keys (revoked_at) WHERE revoked_at IS NOT NULL;

-- One live credential per device; rotation revokes the old one.
CREATE TABLE agent_credentials (
    id            TEXT PRIMARY KEY,
    device_id     TEXT NOT NULL REFERENCES devices (id),
    secret_digest TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    revoked_at    BIGINT
);
CREATE UNIQUE INDEX agent_credentials_live ON agent_credentials (device_id) WHERE revoked_at IS NULL;

-- Which edge instance holds a device's tunnel, fenced by epoch (scale-out).
CREATE TABLE tunnels (
    device_id     TEXT PRIMARY KEY REFERENCES devices (id),
    epoch         BIGINT NOT NULL,
    edge_instance TEXT NOT NULL,
    connected_at  BIGINT NOT NULL
);

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
