"""``clip-etl demo``: generated sample data (:mod:`~pipelines.demo.sample_data`) through the whole
job with the bundled model (:mod:`~pipelines.demo.run`)."""
