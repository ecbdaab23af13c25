-- Retention prunes published rows by age on its own schedule; this index
-- keeps finding them cheap however large the table grows.
CREATE INDEX user_outbox_published_at ON user_outbox (published_at) WHERE published_at IS NOT NULL;
