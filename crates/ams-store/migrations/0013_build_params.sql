-- The parameters a trigger gave a build (`-p NAME=VALUE`), as a JSON object; NULL: none.
ALTER TABLE builds ADD COLUMN params TEXT;
