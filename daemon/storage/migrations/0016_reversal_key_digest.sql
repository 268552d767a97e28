-- Two lookups on reversals that had no index of their own:
--  * key_sha256: the SHA-256 (hex) of payd's key, computed by the database. A provider
--    that limits references (Adyen: 80 characters) is sent a key longer than that as
--    "payd-<sha256 hex>"; its notification echoes that reference, and
--    storage.reversals.settle_by_notice finds the reversal through this column even
--    while no provider reference has been recorded yet (in flight, unknown).
--  * original_idempotency_key: storage.reversals.reversals_of lists a charge's
--    reversals by it (payd refund, payd attempts show); without an index a full scan.
-- Each guarded by information_schema so a re-run after a crash completes.
SET @payd_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.columns
      WHERE table_schema = DATABASE() AND table_name = 'reversals' AND column_name = 'key_sha256') = 0,
    'ALTER TABLE reversals
        ADD COLUMN key_sha256 CHAR(64) CHARACTER SET ascii COLLATE ascii_bin
            AS (SHA2(idempotency_key, 256)) STORED
            COMMENT ''SHA-256 hex of idempotency_key: a shortened provider reference is payd- and this''',
    'DO 0');
PREPARE payd_statement FROM @payd_ddl;
EXECUTE payd_statement;
DEALLOCATE PREPARE payd_statement;

SET @payd_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.statistics
      WHERE table_schema = DATABASE() AND table_name = 'reversals'
        AND index_name = 'ix_reversals_key_sha256') = 0,
    'ALTER TABLE reversals ADD INDEX ix_reversals_key_sha256 (key_sha256)',
    'DO 0');
PREPARE payd_statement FROM @payd_ddl;
EXECUTE payd_statement;
DEALLOCATE PREPARE payd_statement;

SET @payd_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.statistics
      WHERE table_schema = DATABASE() AND table_name = 'reversals'
        AND index_name = 'ix_reversals_original_key') = 0,
    'ALTER TABLE reversals ADD INDEX ix_reversals_original_key (original_idempotency_key)',
    'DO 0');
PREPARE payd_statement FROM @payd_ddl;
EXECUTE payd_statement;
DEALLOCATE PREPARE payd_statement;
