-- Tenants, devices, API keys, agent credentials and the tunnel registry.
-- The same SQL runs on Postgres and SQLite. Times are milliseconds since the
-- Unix epoch (BIGINT). Deleted devices keep their row (deleted_at), so a
-- device id (its subdomain label) is never reused; an agent credential or key
-- is revoked by setting revoked_at. One live agent credential per device.

CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

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

CREATE TABLE agent_credentials (
    id            TEXT PRIMARY KEY,
    device_id     TEXT NOT NULL REFERENCES devices (id),
    secret_digest TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    revoked_at    BIGINT
);
CREATE UNIQUE INDEX agent_credentials_live ON agent_credentials (device_id) WHERE revoked_at IS NULL;

CREATE TABLE tunnels (
    device_id     TEXT PRIMARY KEY REFERENCES devices (id),
    epoch         BIGINT NOT NULL,
    edge_instance TEXT NOT NULL,
    connected_at  BIGINT NOT NULL
);
