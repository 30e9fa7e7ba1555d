"""The batch job, one module per stage, in the order the data passes through them.

1. :mod:`~pipelines.etl.read`: the manifest's footers -> the shard plan; Ray read tasks, one per shard.
   :mod:`~pipelines.etl.webdataset`: the same for tar shards (``input.format=webdataset``).
2. :mod:`~pipelines.etl.lease`: one live run per output (``OUTPUT/_lease.json``).
3. :mod:`~pipelines.etl.model`: the one model of the run, resolved for the actors.
4. :mod:`~pipelines.etl.decode`: CPU tasks: fetch, decode, resize/crop to uint8, tokenize.
5. :mod:`~pipelines.etl.embed` and :mod:`~pipelines.etl.label`: the model actors.
6. :mod:`~pipelines.etl.write`: CPU tasks write result pieces; compaction of a covered shard.
7. :mod:`~pipelines.etl.commit`: the driver commits shards from piece metadata.

:mod:`~pipelines.etl.job` wires them together and writes the run record.
"""
