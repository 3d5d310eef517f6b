"""KuCoin Futures: pure parsers and sequence rules."""
