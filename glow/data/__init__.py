"""Data: source readers (`glow.data.sources`), shard writing (`shards`), bounded shard
reading (`shard_read`) and the training / evaluation streams (`streams`)."""
