"""ChestX-ray14 (NIH) fine-tuning: labels, data, patient-wise splits, input pipeline."""
