-- The duplicate flow's Jira deliveries (n8n/workflows/dedupe-jira-webhook.json → POST /v1/intake/jira-webhook):
-- every delivery is recorded with its outcome, including rejected signatures, ignored issue types and runs
-- that guardrails refused; each issue is claimed once, so a redelivery never searches or proposes twice.
CREATE TABLE IF NOT EXISTS intake (
    id          bigserial PRIMARY KEY,
    delivery_id text,
    event       text,
    issue_key   text,
    issue_id    text,
    outcome     text        NOT NULL CHECK (outcome IN ('accepted', 'duplicate', 'ignored', 'rejected', 'refused')),
    reason      text,
    detail      text,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS intake_received_idx ON intake (received_at DESC);

-- One row per issue accepted for a duplicate check. A claim never completed (the flow died) can be taken again
-- after its lease; a completed one never; a refused run gives its claim up.
CREATE TABLE IF NOT EXISTS claims (
    issue_key    text PRIMARY KEY,
    issue_id     text,
    delivery_id  text,
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    attempts     integer     NOT NULL DEFAULT 1,
    completed_at timestamptz,
    run_id       text,
    verdict      text
);
