"""Bybit v5 linear (USDT-margined perpetuals): pure parsers and sequence rules."""
