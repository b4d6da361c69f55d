-- Several edge instances: each keeps a lease row, renewed every few seconds;
-- nothing is routed to an instance whose lease has expired. `tunnels` says
-- which instance holds each device's agent (claimed in one statement when a
-- HELLO is accepted, epoch = previous + 1); `released_at` is set when that
-- tunnel ends on its instance.
CREATE TABLE edge_instances (
    id           TEXT PRIMARY KEY,
    peer_address TEXT NOT NULL,
    started_at   BIGINT NOT NULL,
    lease_until  BIGINT NOT NULL
);

ALTER TABLE tunnels ADD COLUMN released_at BIGINT;
CREATE INDEX tunnels_edge_instance ON tunnels (edge_instance);
