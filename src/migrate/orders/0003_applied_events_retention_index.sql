-- applied_events is pruned by age (version gating makes a redelivered
-- event harmless once its id is forgotten); this index finds the old rows.
CREATE INDEX applied_events_applied_at ON applied_events (applied_at);
