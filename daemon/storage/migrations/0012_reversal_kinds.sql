-- Reversals become more than refunds (DESIGN.md "Reversals"):
--  * operation 'void': a charge cancelled before settlement, where the provider
--    supports it and it is cheaper for the merchant than a refund;
--  * state 'pending': the provider accepted the reversal but answers its outcome
--    later (Adyen's "[refund-received]" / "[cancel-received]"); its amount stays
--    reserved against the charge (invariant 7) until the outcome arrives;
--  * subscription_action: what a full refund of a renewal does to its
--    subscription once it succeeds (NULL: nothing; 'cancel' or 'pause').
-- MODIFY of an ENUM to a superset is a metadata change and re-runs harmlessly;
-- the new column is guarded by information_schema so a re-run after a crash completes.
ALTER TABLE reversals
    MODIFY operation ENUM('refund', 'void') NOT NULL DEFAULT 'refund',
    MODIFY state ENUM('queued', 'in_flight', 'succeeded', 'failed', 'unknown', 'pending') NOT NULL;

SET @payd_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.columns
      WHERE table_schema = DATABASE() AND table_name = 'reversals' AND column_name = 'subscription_action') = 0,
    'ALTER TABLE reversals
        ADD COLUMN subscription_action ENUM(''cancel'', ''pause'') NULL
            COMMENT ''what a full refund of a renewal does to its subscription once it succeeds''',
    'DO 0');
PREPARE payd_statement FROM @payd_ddl;
EXECUTE payd_statement;
DEALLOCATE PREPARE payd_statement;
