"""Image features as a data set: frozen pretrained extractors (`extractors`), vector shards with a
manifest (`vector_shards`) and the extraction job over image shards (`extract`)."""
