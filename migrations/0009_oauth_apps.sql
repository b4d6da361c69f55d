-- Apps that ask an owner for access (OAuth 2.0 authorization code with
-- PKCE): the apps an operator registered, the one-use codes an owner's
-- consent gives (digests only, 2 minutes), and which keys an app holds.

CREATE TABLE oauth_apps (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    redirect_uris TEXT NOT NULL,
    scopes        TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    revoked_at    BIGINT
);

CREATE TABLE oauth_codes (
    id             TEXT PRIMARY KEY,
    secret_digest  TEXT NOT NULL,
    app_id         TEXT NOT NULL REFERENCES oauth_apps (id),
    tenant_id      TEXT NOT NULL REFERENCES tenants (id),
    device_ids     TEXT NOT NULL,
    scope          TEXT NOT NULL,
    redirect_uri   TEXT NOT NULL,
    code_challenge TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    used_at        BIGINT
);

CREATE TABLE oauth_grants (
    key_id     TEXT PRIMARY KEY REFERENCES api_keys (id),
    app_id     TEXT NOT NULL REFERENCES oauth_apps (id),
    code_id    TEXT NOT NULL,
    tenant_id  TEXT NOT NULL REFERENCES tenants (id),
    created_at BIGINT NOT NULL
);
CREATE INDEX oauth_grants_tenant ON oauth_grants (tenant_id);
CREATE INDEX oauth_grants_code ON oauth_grants (code_id);
