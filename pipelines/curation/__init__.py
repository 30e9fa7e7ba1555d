"""Curation on the embeddings a run wrote: semantic dedup, CLIP-score filtering, heads.

None of these ever deletes a result row: each writes its own decision (a ``keep`` flag with its
reason) beside ``OUTPUT/results/``.
"""
