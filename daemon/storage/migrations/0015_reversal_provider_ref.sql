-- A provider's notification names a reversal by payd's key where the provider echoes
-- it, else by the provider's own reference of the reversal (Adyen's pspReference of a
-- refund whose key payd had to shorten): storage.reversals.settle_by_notice. Without
-- this index that second match read the whole table under a lock.
-- Guarded by information_schema so a re-run after a crash completes.
SET @payd_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.statistics
      WHERE table_schema = DATABASE() AND table_name = 'reversals'
        AND index_name = 'ix_reversals_provider_ref') = 0,
    'ALTER TABLE reversals ADD INDEX ix_reversals_provider_ref (provider, provider_ref)',
    'DO 0');
PREPARE payd_statement FROM @payd_ddl;
EXECUTE payd_statement;
DEALLOCATE PREPARE payd_statement;
