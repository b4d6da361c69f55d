-- Agent pairing by code (RFC 8628's device authorization grant). An agent
-- without a credential asks for a pairing and polls with its device code;
-- the owner enters the user code in the console and picks the device.
-- Both codes are stored as SHA-256 digests only. A pairing lives 15
-- minutes and gives one agent credential, once.

CREATE TABLE pairings (
    id               TEXT PRIMARY KEY,
    secret_digest    TEXT NOT NULL,
    user_code_digest TEXT NOT NULL UNIQUE,
    created_at       BIGINT NOT NULL,
    expires_at       BIGINT NOT NULL,
    interval_ms      BIGINT NOT NULL,
    last_poll_at     BIGINT,
    state            TEXT NOT NULL,
    tenant_id        TEXT REFERENCES tenants (id),
    device_id        TEXT,
    decided_at       BIGINT,
    requested_from   TEXT NOT NULL
);
CREATE INDEX pairings_expires_at ON pairings (expires_at);
