"""The report of an experiment, from MLflow records alone (`ich report`; the phases: soups/report/build.py).

snapshot (MLflow read once) ─▶ selection (by val) ─▶ predictions (logits: cache first) ─▶ sections (figures,
tables) ─▶ render (Markdown/HTML); build runs them and logs the report run; cli is `ich report`.
"""
