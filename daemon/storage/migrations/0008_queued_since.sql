-- While an attempt is queued, recheck_at holds since when (a release writes it),
-- and the orphan sweep fails rows queued longer than [pipeline]
-- queued_orphan_after_s. Rows queued before this column had that meaning carry
-- NULL: give them their last change as the time, so the sweep sees them too.
-- The (state, recheck_at) index serves the WHERE; re-running changes nothing.
UPDATE attempts SET recheck_at = updated_at WHERE state = 'queued' AND recheck_at IS NULL;
