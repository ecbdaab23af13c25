-- The W3C trace context of the request that made the change, written in the
-- same statement as the outbox row and published with the event as the
-- CloudEvents distributed-tracing extension (ce_traceparent, ce_tracestate).
-- NULL when the caller sent none.
ALTER TABLE user_outbox
    ADD COLUMN traceparent TEXT,
    ADD COLUMN tracestate  TEXT;
