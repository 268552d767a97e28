-- Bulk rollback (payd rollback, docs/runbook.md section 3).
--
-- ix_attempts_finished: a rollback selects succeeded charges by completion time.
-- Without it the only way in is ix_attempts_recheck (state, recheck_at), whose
-- range for state = 'succeeded' is every charge ever taken (EXPLAIN: type range,
-- rows ~ all succeeded attempts, "Using where"); with it a time window reads only
-- its own rows (EXPLAIN: range on ix_attempts_finished, rows ~ the window).
SET @payd_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.statistics
      WHERE table_schema = DATABASE() AND table_name = 'attempts' AND index_name = 'ix_attempts_finished') = 0,
    'ALTER TABLE attempts ADD INDEX ix_attempts_finished (state, finished_at)',
    'DO 0');
PREPARE payd_statement FROM @payd_ddl;
EXECUTE payd_statement;
DEALLOCATE PREPARE payd_statement;

-- A named run and the charges it froze when it started: a resumed run works on
-- the same charges with the same amounts, whatever has changed since, and
-- `payd rollback --report RUN` reads its outcome later. Each item's refund key
-- is deterministic (rollback:RUN:KEY), so the daemon's claim deduplicates a
-- refund published twice (a run killed between the broker's confirm and the
-- write of published_at); published_at only spares a resumed run that work.
CREATE TABLE IF NOT EXISTS rollback_runs (
    id                BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    name              VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    filters           TEXT NOT NULL COMMENT 'the selection, as JSON',
    reason            VARCHAR(255) NULL,
    created_by        VARCHAR(255) NULL,
    created_at        DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    UNIQUE KEY uq_rollback_runs_name (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS rollback_items (
    run_id            BIGINT UNSIGNED NOT NULL,
    attempt_id        BIGINT UNSIGNED NOT NULL,
    charge_key        VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    refund_key        VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    provider          VARCHAR(64) CHARACTER SET ascii NOT NULL,
    currency          CHAR(3) CHARACTER SET ascii NOT NULL,
    charged_minor     BIGINT UNSIGNED NOT NULL,
    -- What remained unreversed when the run started: the refund's amount; 0 when
    -- the charge was already wholly reversed (nothing is published for it).
    remaining_minor   BIGINT UNSIGNED NOT NULL,
    published_at      DATETIME(6) NULL,
    PRIMARY KEY (run_id, attempt_id),
    KEY ix_rollback_items_refund (refund_key)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
