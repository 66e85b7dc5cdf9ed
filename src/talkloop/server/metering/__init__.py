"""Metering: prices and per-row cost, quotas and budgets (reserve, then settle), usage reports.

`Metering` (in `hooks`) plugs all of it, with rate limits and serving metrics, into every
metered request through the ledger's `MeterHooks`.
"""
