-- Idempotency keys of CreateUser (the `idempotency-key` metadata): a retry of
-- a create whose answer was lost finds its key here and gets the same user.
ALTER TABLE users ADD COLUMN request_id TEXT;
CREATE UNIQUE INDEX users_request_id_key ON users (request_id) WHERE request_id IS NOT NULL;
