"""Data: source readers (`glow.data.sources`), the shard layout and manifest reader (`manifest`),
shard writing (`shards`), bounded shard reading (`shard_read`) and the training / evaluation
streams (`streams`)."""
