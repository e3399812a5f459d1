"""The record: checkpoints and soups in MLflow. tags (the ich.* vocabulary) ◀ registry (log, search, download,
verify_pulled of LoggedModels) ─▶ retry (call_with_retry) · signing (what is trusted) · provenance · lineage · gc.
"""
