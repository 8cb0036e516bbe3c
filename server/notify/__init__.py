"""Outbound alert notifications, one module per step: ``payloads`` (a transition as the body
of a generic JSON, Slack or Alertmanager webhook), ``signing`` (HMAC headers),
``delivery`` (one POST with retries) and ``worker`` (the background thread that sends the
outbox rows ingest wrote). Inbound webhooks are ``server/inbound.py``."""
