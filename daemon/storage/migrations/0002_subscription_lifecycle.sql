-- Subscription lifecycle, renewals and dunning (docs/subscriptions.md).
-- Runs on MySQL 8 and MariaDB 10.11+. DDL commits on its own, and the runner
-- records this file only after it applied, so each change is one statement
-- guarded by a look at information_schema: a run that died half-way is
-- completed by the next one instead of failing on "duplicate column".

-- One ALTER, so the columns arrive together or not at all. All have defaults
-- (or are NULL), which both servers add without rebuilding the table.
SET @payd_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.columns
      WHERE table_schema = DATABASE() AND table_name = 'subscriptions' AND column_name = 'pending_key') = 0,
    'ALTER TABLE subscriptions
        ADD COLUMN card_brand VARCHAR(16) CHARACTER SET ascii NULL
            COMMENT ''visa, mastercard, amex, discover or other (NULL: unknown), picks the retry budget'',
        ADD COLUMN interval_unit ENUM(''day'', ''week'', ''month'', ''year'') NOT NULL DEFAULT ''month'',
        ADD COLUMN interval_count SMALLINT UNSIGNED NOT NULL DEFAULT 1,
        ADD COLUMN billing_anchor DATETIME(6) NULL
            COMMENT ''period c ends at billing_anchor + (c - anchor_cycle) intervals'',
        ADD COLUMN anchor_cycle INT UNSIGNED NOT NULL DEFAULT 0,
        ADD COLUMN pending_key VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NULL
            COMMENT ''idempotency key of the dispatched try the subscription waits on'',
        ADD COLUMN next_try SMALLINT UNSIGNED NOT NULL DEFAULT 0
            COMMENT ''try number of the next new dispatch in this cycle'',
        ADD COLUMN dunning_step SMALLINT UNSIGNED NOT NULL DEFAULT 0
            COMMENT ''soft declines so far in this cycle: index into the retry schedule'',
        ADD COLUMN status_reason VARCHAR(255) NULL,
        ADD COLUMN status_changed_at DATETIME(6) NULL',
    'DO 0');
PREPARE payd_statement FROM @payd_ddl;
EXECUTE payd_statement;
DEALLOCATE PREPARE payd_statement;

-- The retry budget counts a payment method's attempts in the trailing 30 days
-- before every dispatch: a range on this index, covering (no row reads).
SET @payd_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.statistics
      WHERE table_schema = DATABASE() AND table_name = 'attempts' AND index_name = 'ix_attempts_budget') = 0,
    'ALTER TABLE attempts ADD INDEX ix_attempts_budget (payment_method, created_at, outcome)',
    'DO 0');
PREPARE payd_statement FROM @payd_ddl;
EXECUTE payd_statement;
DEALLOCATE PREPARE payd_statement;
