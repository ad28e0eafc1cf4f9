-- Every digest a job produced, complete, with its renderings; health history; the embedding cache.
CREATE TABLE digests (
    id               uuid PRIMARY KEY,
    kind             text NOT NULL CHECK (kind IN ('monitor', 'weekly', 'patterns', 'health')),
    -- The guardrails run that produced it (n8n opens it); a retried call returns the same digest.
    run_id           text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    as_of            timestamptz NOT NULL,
    params           jsonb NOT NULL,
    summary          jsonb NOT NULL,
    data             jsonb NOT NULL,
    narrative        text NOT NULL,
    narrative_mode   text NOT NULL CHECK (narrative_mode IN ('llm', 'offline')),
    narrative_reason text NOT NULL,
    narrative_model  text,
    slack            jsonb NOT NULL,
    email_subject    text NOT NULL,
    email_html       text NOT NULL,
    email_text       text NOT NULL,
    markdown         text NOT NULL
);
CREATE UNIQUE INDEX digests_kind_run_id ON digests (kind, run_id) WHERE run_id IS NOT NULL;
CREATE INDEX digests_kind_created ON digests (kind, created_at DESC);

CREATE TABLE health_scores (
    digest_id  uuid NOT NULL REFERENCES digests (id) ON DELETE CASCADE,
    client     text NOT NULL,
    name       text NOT NULL,
    as_of      timestamptz NOT NULL,
    score      numeric(4, 1) NOT NULL CHECK (score >= 0 AND score <= 100),
    components jsonb NOT NULL,
    PRIMARY KEY (digest_id, client)
);
CREATE INDEX health_scores_client_as_of ON health_scores (client, as_of DESC);

-- Pattern detection embeds summary + description start; unchanged tickets are never embedded twice.
CREATE TABLE embeddings (
    model        text NOT NULL,
    key          text NOT NULL,
    content_hash bytea NOT NULL,
    vector       bytea NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, key)
);
