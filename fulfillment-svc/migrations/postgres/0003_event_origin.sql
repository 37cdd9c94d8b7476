-- Where an event came from: `coinflow` (a signed webhook through the edge) or `recovery`
-- (`fulfillment-svc recover --direct` recorded the packet from Coinflow's delivery log,
-- authenticated by Coinflow's merchant API rather than by a webhook signature). Set from
-- the caller's credential, never from the request.
ALTER TABLE events ADD COLUMN origin TEXT NOT NULL DEFAULT 'coinflow'
    CHECK (origin IN ('coinflow', 'recovery'));
