-- A ticket accepted for triage whose run guardrails refused (kill switch, exhausted budget, ...) or could not
-- open (guardrails unavailable): recorded as 'refused' with guardrails' code and detail; nothing was triaged.
ALTER TABLE intake DROP CONSTRAINT IF EXISTS intake_outcome_check;
ALTER TABLE intake ADD CONSTRAINT intake_outcome_check
    CHECK (outcome IN ('accepted', 'duplicate', 'rejected', 'refused'));
ALTER TABLE intake ADD COLUMN IF NOT EXISTS detail text;
