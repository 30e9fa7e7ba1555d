"""Offline retrieval on the results: choose an index (:mod:`~pipelines.index.select`), build it on
the cluster (:mod:`~pipelines.index.build`), open and search it (:mod:`~pipelines.index.open`,
re-exported here), from the command line (:mod:`~pipelines.index.search_cli`) or as the seed's
small search engine (:mod:`~pipelines.index.search_engine`)."""

from pipelines.index.open import *  # noqa: F401,F403
from pipelines.index.open import __all__  # noqa: F401
