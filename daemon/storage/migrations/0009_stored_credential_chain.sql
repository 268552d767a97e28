-- Stored-credential chains (docs/subscriptions.md, "Stored-credential chains").
-- A merchant-initiated payment must reference the approved payment its chain
-- started with or last continued (Checkout.com previous_payment_id; card-scheme
-- rules for stored credentials, Visa in particular). Each approval of a
-- subscription's attempt keeps the provider's payment reference here, with the
-- provider and payment method it belongs to: a renewal carries it only while
-- both are still the subscription's, so a new card starts a new chain.
-- Nullable columns at the end: both servers add them without rebuilding the
-- table. Guarded by information_schema so a re-run after a crash completes.
SET @payd_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.columns
      WHERE table_schema = DATABASE() AND table_name = 'subscriptions' AND column_name = 'chain_ref') = 0,
    'ALTER TABLE subscriptions
        ADD COLUMN chain_provider VARCHAR(64) NULL
            COMMENT ''the provider connection chain_ref belongs to'',
        ADD COLUMN chain_payment_method VARCHAR(255) NULL
            COMMENT ''the payment method chain_ref was approved with'',
        ADD COLUMN chain_ref VARCHAR(255) NULL
            COMMENT ''the provider reference of the last approved payment (NULL: no chain yet)''',
    'DO 0');
PREPARE payd_statement FROM @payd_ddl;
EXECUTE payd_statement;
DEALLOCATE PREPARE payd_statement;
