-- Tries the scheduler (or payd retry) dispatched carry the time they were queued
-- in recheck_at from now on, so the orphan sweep sees them. Rows dispatched
-- before that carry NULL: give them their last change as the time. A queued row
-- set aside as unreadable also has NULL, but with its reason: it stays out.
-- The (state, recheck_at) index serves the WHERE; re-running changes nothing.
UPDATE attempts SET recheck_at = updated_at
 WHERE state = 'queued' AND recheck_at IS NULL AND reason IS NULL;
