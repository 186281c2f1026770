"""Data: readers, cleaning, packing into ArrayRecord shards, the Grain loader, the demo corpus."""
