-- The replica stores only what the user service could have written: the same
-- limits as its validation (src/user/domain.rs). The consumer checks them
-- when it decodes a record; these constraints make a record that slips past
-- (or a future limit) a permanent apply error (SQLSTATE 23514) that is
-- dead-lettered, never a half-stored user.
ALTER TABLE known_users
    ADD CONSTRAINT known_users_id_positive      CHECK (user_id > 0),
    ADD CONSTRAINT known_users_version_positive CHECK (version > 0),
    ADD CONSTRAINT known_users_name_length      CHECK (char_length(name) BETWEEN 1 AND 200),
    ADD CONSTRAINT known_users_email_length     CHECK (char_length(email) BETWEEN 1 AND 254);
ALTER TABLE deleted_users
    ADD CONSTRAINT deleted_users_id_positive CHECK (user_id > 0);
