"""Stage 2: the calibration tensor from real images with the serving letterbox; calibration/tuning splits."""
