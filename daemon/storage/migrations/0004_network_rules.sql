-- Card-network retry rules (docs/subscriptions.md, "Card-network retry rules").
-- Runs on MySQL 8 and MariaDB 10.11+; each change is one statement guarded by a
-- look at information_schema, so a run that died half-way completes on the next.

-- Why and until when a card network's limit holds a subscription's due try back.
-- Nullable columns at the end: both servers add them without rebuilding the table.
SET @payd_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.columns
      WHERE table_schema = DATABASE() AND table_name = 'subscriptions' AND column_name = 'deferred_by') = 0,
    'ALTER TABLE subscriptions
        ADD COLUMN deferred_by VARCHAR(32) CHARACTER SET ascii NULL
            COMMENT ''the network rule that last held back a due try (NULL: none)'',
        ADD COLUMN deferred_until DATETIME(6) NULL
            COMMENT ''when that rule lets the try go''',
    'DO 0');
PREPARE payd_statement FROM @payd_ddl;
EXECUTE payd_statement;
DEALLOCATE PREPARE payd_statement;

-- The network counters (declines per card in 24 hours and 30 days, declined
-- reattempts per card, amount and currency in 30 days) read a payment method's
-- recent attempts from this index alone: a range on (payment_method, created_at),
-- outcome, amount and currency in the entries, no row reads. Built online.
SET @payd_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.statistics
      WHERE table_schema = DATABASE() AND table_name = 'attempts' AND index_name = 'ix_attempts_network') = 0,
    'ALTER TABLE attempts ADD INDEX ix_attempts_network (payment_method, created_at, outcome, amount_minor, currency)',
    'DO 0');
PREPARE payd_statement FROM @payd_ddl;
EXECUTE payd_statement;
DEALLOCATE PREPARE payd_statement;

-- Its predecessor is a prefix of it: dropping it saves a write per attempt.
SET @payd_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.statistics
      WHERE table_schema = DATABASE() AND table_name = 'attempts' AND index_name = 'ix_attempts_budget') > 0,
    'ALTER TABLE attempts DROP INDEX ix_attempts_budget',
    'DO 0');
PREPARE payd_statement FROM @payd_ddl;
EXECUTE payd_statement;
DEALLOCATE PREPARE payd_statement;
