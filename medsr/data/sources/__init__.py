"""Where raw images come from: the embedded sample, a local folder, or Kaggle.

Each source fills ``data/raw/<modality>`` for the ingest stage and fails with a
:class:`medsr.data.sources.errors.SourceError` whose message is one line that names the fix.
"""
