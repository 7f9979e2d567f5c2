-- Per-project levels. Until now a user had one level for all of its projects (the described
-- system's users.json shape: `level` and a list of names in `projects`). From here on
-- `projects` holds a JSON object of per-project levels, {"app": 3, "lib": 1}, and `level` only
-- says whether the user is SERVER ADMIN (5) or not (0). Each listed project takes the user's
-- old level; a SERVER ADMIN covers every project and keeps no list. A row whose `projects` is
-- not a JSON list is left alone: the reader gives it no project rights.
UPDATE users
SET projects = CASE
        WHEN level = 5 THEN '{}'
        ELSE (SELECT json_group_object(j.value, users.level)
              FROM json_each(users.projects) AS j
              WHERE j.type = 'text')
    END,
    level = CASE WHEN level = 5 THEN 5 ELSE 0 END
WHERE json_valid(projects) AND json_type(projects) = 'array';
