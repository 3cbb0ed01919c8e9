"""The database side: the writer, the store, the dialects, schema state and migrations.
Consumes the batches of sync.model.batches; never imports the source."""
