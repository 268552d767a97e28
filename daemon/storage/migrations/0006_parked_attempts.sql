-- Parking: an unknown attempt whose lookup raised (an adapter bug, a row the
-- adapter cannot handle) stays unknown (it may have charged) but is taken out
-- of automatic reconciliation, with the reason, until an operator acts.
-- Parked rows have recheck_at NULL, so the (state, recheck_at) index that
-- serves the reconciler's scan also finds them.
-- Guarded by information_schema so a re-run after a crash completes instead of failing.
SET @payd_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.columns
      WHERE table_schema = DATABASE() AND table_name = 'attempts' AND column_name = 'parked_at') = 0,
    'ALTER TABLE attempts ADD COLUMN parked_at DATETIME(6) NULL, ADD COLUMN reconcile_error VARCHAR(255) NULL',
    'DO 0');
PREPARE payd_statement FROM @payd_ddl;
EXECUTE payd_statement;
DEALLOCATE PREPARE payd_statement;
