"""Data: sources, preparation into token shards, and readers of prepared data."""
