-- The message of the commit a build ran (first 4 KiB), shown on the pages.
ALTER TABLE builds ADD COLUMN commit_message TEXT;
