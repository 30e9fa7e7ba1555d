"""``clip-etl train``: training or fine-tuning on Ray Train (:mod:`~pipelines.train.job`), with
freshly generated image-caption pairs (:mod:`~pipelines.train.synthetic_pairs`)."""
