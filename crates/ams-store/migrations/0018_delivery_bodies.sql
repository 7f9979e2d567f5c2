-- The delivery log keeps bodies only while they may be replayed: none for pings, ignored
-- deliveries and duplicates, and an accepted or refused one's until it is older than
-- delivery_body_max_age_days. The partial index finds the bodies to drop without a scan.
UPDATE deliveries SET body = NULL
    WHERE body IS NOT NULL
      AND (verdict NOT IN ('accepted', 'refused') OR length(body) = 0);
CREATE INDEX IF NOT EXISTS deliveries_with_body ON deliveries (received_at)
    WHERE body IS NOT NULL;
