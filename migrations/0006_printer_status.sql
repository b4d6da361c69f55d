-- What the edge last heard of each device's printer connection: its state
-- as the agent reported it (idle, connecting, up, down, or silent when the
-- edge's watchdog found it so), the reason and detail of the last failure
-- (free of secrets), and since when the printer has been silent.
-- `relayctl device show` reads it.
CREATE TABLE printer_status (
    device_id    TEXT PRIMARY KEY REFERENCES devices (id),
    state        TEXT NOT NULL,
    reason       TEXT,
    detail       TEXT,
    silent_since BIGINT,
    updated_at   BIGINT NOT NULL
);

-- The printer's reconnects by cause (a down report's reason, or
-- silent_<watchdog>), counted in one statement each.
CREATE TABLE printer_reconnects (
    device_id TEXT NOT NULL REFERENCES devices (id),
    cause     TEXT NOT NULL,
    count     BIGINT NOT NULL,
    PRIMARY KEY (device_id, cause)
);
