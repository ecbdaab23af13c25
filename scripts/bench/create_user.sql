-- pgbench script of scripts/bench.sh: the statement msys runs for CreateUser, with $1 = 'pgbench'
-- and $2 = a unique email. Keep it identical to the user role's SQL, or the ratio means nothing.
WITH u AS (
    INSERT INTO users (name, email) VALUES ('pgbench', 'pgbench-' || gen_random_uuid() || '@example.com')
    RETURNING id, name, email, version, created_at, updated_at
), o AS (
    INSERT INTO user_outbox (event_type, user_id, user_name, user_email, user_version, user_created_at, user_updated_at)
    SELECT 'msys.user.created.v1', id, name, email, version, created_at, updated_at FROM u
)
SELECT id, name, email, version, created_at, updated_at FROM u;
