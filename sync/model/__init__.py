"""The pure middle of the pipeline: what flows between the source and the sink.

Nothing here does I/O or imports a producer or a database: resource specs, the batches
a producer hands to the writer, the normalizers, and the value objects of a run.
"""
