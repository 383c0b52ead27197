"""What a run keeps on disk and how it survives faults: atomic checkpoints and resume
(`checkpoints`, `bn_weights`), divergence and preemption (`faults`), the stream order that
makes a resumed run read the same batches (`data_order`), what a run records (`run_record`)
and file handling in shared folders that follows no planted link (`safe_files`).
"""
