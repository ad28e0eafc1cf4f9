"""Local emulators of the services Metis talks to (Anthropic, Jira, Slack, SMTP, Confluence, Salesforce).

Each emulator is a small HTTP (or SMTP) server speaking the real wire protocol, so the real clients
reach it by URL only. Tests and `make up` start them as a process with `python -m emulators`;
service code never imports this package.
"""
