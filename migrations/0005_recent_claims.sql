-- The edge's periodic check of its claims asks only for claims made
-- recently by other instances (most checks find none); a full listing of
-- its claims is rarer. This index keeps the recent ones cheap to find with
-- tens of thousands of devices.
CREATE INDEX tunnels_connected_at ON tunnels (connected_at);
