-- Operator actions on attempts (docs/runbook.md): who did what to which attempt,
-- when and why. Written in the same commit as the change it records, never
-- updated or deleted. Settling a stuck unknown is the first action; reversals
-- add theirs under their own ``action`` name. Runs on MySQL 8 and MariaDB 10.11+.
CREATE TABLE IF NOT EXISTS attempt_audit (
    id                BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    attempt_id        BIGINT UNSIGNED NOT NULL,
    idempotency_key   VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    action            VARCHAR(32) CHARACTER SET ascii NOT NULL,
    state_before      VARCHAR(16) CHARACTER SET ascii NULL,
    state_after       VARCHAR(16) CHARACTER SET ascii NULL,
    operator          VARCHAR(128) NOT NULL,
    via               VARCHAR(128) NOT NULL
                      COMMENT 'cli@HOST or control:INSTANCE: where the order came from',
    reason            VARCHAR(255) NOT NULL,
    provider_ref      VARCHAR(128) NULL,
    created_at        DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    KEY ix_attempt_audit_key (idempotency_key, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
