-- Failover routing: which provider connection an attempt was actually sent to,
-- when it is not the one requested. Written before the call to the secondary,
-- so reconciliation always asks the connection that may have charged.
-- Guarded by information_schema so a re-run after a crash completes instead of failing.
SET @payd_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.columns
      WHERE table_schema = DATABASE() AND table_name = 'attempts' AND column_name = 'routed_provider') = 0,
    'ALTER TABLE attempts ADD COLUMN routed_provider VARCHAR(64) CHARACTER SET ascii NULL AFTER provider',
    'DO 0');
PREPARE payd_statement FROM @payd_ddl;
EXECUTE payd_statement;
DEALLOCATE PREPARE payd_statement;
