-- Reversals (refunds) of succeeded charges, one row per reversal's idempotency key.
-- A table of their own rather than attempts rows with an operation column: every
-- scan, claim, lease and subscription effect on attempts stays a charge's, and the
-- sum that invariant 7 bounds is one index range (original_attempt_id, state).
-- Written before any provider call, as an attempt is; the claim locks the charged
-- attempt's row (FOR UPDATE) and sums this table's reservations in the same commit.

CREATE TABLE IF NOT EXISTS reversals (
    id                  BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    idempotency_key     VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    original_idempotency_key VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    -- NULL only when the request named no known charge (refused at once).
    original_attempt_id BIGINT UNSIGNED NULL,
    operation           ENUM('refund') NOT NULL DEFAULT 'refund',
    provider            VARCHAR(64) CHARACTER SET ascii NULL,
    amount_minor        BIGINT UNSIGNED NOT NULL,
    currency            CHAR(3) CHARACTER SET ascii NULL,
    reason              VARCHAR(255) NULL,
    -- queued: released unsent (drain, halt), its amount still reserved.
    state               ENUM('queued', 'in_flight', 'succeeded', 'failed', 'unknown') NOT NULL,
    outcome             VARCHAR(32) CHARACTER SET ascii NULL,
    decline_code        VARCHAR(64) NULL,
    provider_ref        VARCHAR(128) NULL,
    result_reason       VARCHAR(255) NULL,
    claimed_by          VARCHAR(96) NULL,
    claimed_at          DATETIME(6) NULL,
    tries               SMALLINT UNSIGNED NOT NULL DEFAULT 0,
    reconcile_tries     SMALLINT UNSIGNED NOT NULL DEFAULT 0,
    -- The lease's end while in_flight, the next lookup while unknown, NULL otherwise.
    recheck_at          DATETIME(6) NULL,
    created_at          DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at          DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    finished_at         DATETIME(6) NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_reversals_idempotency_key (idempotency_key),
    KEY ix_reversals_original (original_attempt_id, state),
    KEY ix_reversals_recheck (state, recheck_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
