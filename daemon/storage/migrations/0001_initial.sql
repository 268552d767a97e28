-- payd's initial schema. Runs on MySQL 8 and MariaDB 10.11+.
-- Sized for 30M subscriptions and tens of millions of attempts: every query on
-- the hot path or in a periodic scan is served by one of the indexes below.

CREATE TABLE IF NOT EXISTS subscriptions (
    id                BIGINT UNSIGNED NOT NULL,
    status            ENUM('active', 'past_due', 'canceled', 'paused') NOT NULL DEFAULT 'active',
    plan              VARCHAR(64) CHARACTER SET ascii NULL,
    provider          VARCHAR(64) CHARACTER SET ascii NOT NULL,
    payment_method    VARCHAR(255) NOT NULL,
    customer_ref      VARCHAR(255) NULL,
    amount_minor      BIGINT UNSIGNED NOT NULL,
    currency          CHAR(3) CHARACTER SET ascii NOT NULL,
    paid_cycle        INT UNSIGNED NOT NULL DEFAULT 0,
    current_period_end DATETIME(6) NULL,
    -- When the next renewal or dunning try is due; NULL when nothing is due
    -- (canceled, paused). The scheduler scans this index only.
    next_attempt_at   DATETIME(6) NULL,
    created_at        DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at        DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    KEY ix_subscriptions_due (next_attempt_at, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS attempts (
    id                BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    idempotency_key   VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    subscription_id   BIGINT UNSIGNED NULL,
    cycle             INT UNSIGNED NULL,
    provider          VARCHAR(64) CHARACTER SET ascii NOT NULL,
    amount_minor      BIGINT UNSIGNED NOT NULL,
    currency          CHAR(3) CHARACTER SET ascii NOT NULL,
    payment_method    VARCHAR(255) NOT NULL,
    customer_ref      VARCHAR(255) NULL,
    metadata          TEXT NULL,
    state             ENUM('queued', 'in_flight', 'succeeded', 'declined', 'failed', 'unknown') NOT NULL,
    outcome           VARCHAR(32) CHARACTER SET ascii NULL,
    decline_code      VARCHAR(64) NULL,
    provider_ref      VARCHAR(128) NULL,
    reason            VARCHAR(255) NULL,
    claimed_by        VARCHAR(96) NULL,
    claimed_at        DATETIME(6) NULL,
    tries             SMALLINT UNSIGNED NOT NULL DEFAULT 0,   -- provider calls made
    reconcile_tries   SMALLINT UNSIGNED NOT NULL DEFAULT 0,
    -- When the row needs attention next: the lease expiry while in_flight, the
    -- next lookup while unknown, NULL otherwise. One index serves both scans.
    recheck_at        DATETIME(6) NULL,
    created_at        DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at        DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    finished_at       DATETIME(6) NULL,
    -- 1 while this attempt holds its (subscription, cycle): it is being sent, may
    -- have charged, or did. The unique key below then admits no second such
    -- attempt for the cycle: the database itself refuses a double charge.
    cycle_guard       TINYINT AS (CASE WHEN subscription_id IS NOT NULL
                                        AND state IN ('in_flight', 'succeeded', 'unknown')
                                       THEN 1 END) STORED,
    PRIMARY KEY (id),
    UNIQUE KEY uq_attempts_idempotency_key (idempotency_key),
    UNIQUE KEY uq_attempts_cycle_charge (subscription_id, cycle, cycle_guard),
    KEY ix_attempts_recheck (state, recheck_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS outbox (
    id                BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    event_id          CHAR(36) CHARACTER SET ascii NOT NULL,
    -- 'events': the payd.events exchange; 'attempts': the payd.attempts queue.
    target            ENUM('events', 'attempts') NOT NULL,
    routing_key       VARCHAR(128) CHARACTER SET ascii NOT NULL,
    payload           MEDIUMBLOB NOT NULL,
    created_at        DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
