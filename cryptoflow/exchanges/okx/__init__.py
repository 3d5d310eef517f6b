"""OKX v5 perpetual swaps: pure parsers, sequence rules and the book checksum."""
