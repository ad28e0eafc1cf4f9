-- digest: schema created by the migration runner; tables arrive with the features that need them.
CREATE TABLE IF NOT EXISTS service_info (key text PRIMARY KEY, value text NOT NULL);
INSERT INTO service_info (key, value) VALUES ('service', 'digest') ON CONFLICT (key) DO NOTHING;
