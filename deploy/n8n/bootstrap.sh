#!/bin/sh
# One-shot set-up of n8n for docker-compose.yml (the `n8n-setup` service, same image as n8n):
# credentials from the environment, then every workflow in /metis/workflows imported and published.
# n8n itself starts only after this succeeds. Mirrors devstack/n8n.py, which does the same locally.
set -eu
: "${METIS_TOKEN_N8N:?METIS_TOKEN_N8N is required}"

umask 077
cred_dir=$(mktemp -d)
trap 'rm -rf "$cred_dir"' EXIT INT TERM

# The credential ids and names below are the ones workflow files reference (devstack/n8n.py).
node -e '
const creds = [{id: "metisN8nToken01", name: "Metis n8n token", type: "httpHeaderAuth",
                data: {name: "Authorization", value: "Bearer " + process.env.METIS_TOKEN_N8N}}];
if (process.env.METIS_SMTP_HOST) {
  creds.push({id: "metisSmtp000001", name: "Metis SMTP", type: "smtp",
              data: {host: process.env.METIS_SMTP_HOST, port: Number(process.env.METIS_SMTP_PORT || 587),
                     user: process.env.METIS_SMTP_USER || "", password: process.env.METIS_SMTP_PASSWORD || "",
                     secure: process.env.METIS_SMTP_SECURE === "true"}});
}
process.stdout.write(JSON.stringify(creds));
' > "$cred_dir/credentials.json"
n8n import:credentials --input="$cred_dir/credentials.json"
rm -rf "$cred_dir"

n8n import:workflow --separate --input=/metis/workflows
for file in /metis/workflows/*.json; do
  id=$(node -e 'process.stdout.write(String(require(process.argv[1]).id))' "$file")
  n8n publish:workflow --id="$id"
done
