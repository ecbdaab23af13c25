-- pgbench script of scripts/bench.sh: the statement msys runs for CreateUser (src/user/repo.rs,
-- CREATE), for a batch of one: name 'pgbench', a unique email, no key and no trace context. Keep
-- it identical to the user role's SQL, or the ratio means nothing.
WITH input AS MATERIALIZED (
    SELECT nextval(pg_get_serial_sequence('users', 'id')) AS id, *
      FROM unnest(ARRAY['pgbench'], ARRAY['pgbench-' || gen_random_uuid() || '@example.com'], ARRAY[NULL::text],
                  ARRAY[NULL::text], ARRAY[NULL::text])
           WITH ORDINALITY AS t(name, email, request_id, tp, ts, ord)
), u AS (
    INSERT INTO users (id, name, email, request_id)
    SELECT id, name, email, request_id FROM input ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING id, name, email, version, created_at, updated_at
), o AS (
    INSERT INTO user_outbox (event_type, user_id, user_name, user_email, user_version, user_created_at, user_updated_at,
                             traceparent, tracestate)
    SELECT 'msys.user.created.v1', u.id, u.name, u.email, u.version, u.created_at, u.updated_at, input.tp, input.ts
      FROM u JOIN input USING (id) ORDER BY id
)
SELECT input.ord, u.id, u.name, u.email, u.version, u.created_at, u.updated_at FROM u JOIN input USING (id);
