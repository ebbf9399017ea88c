"""Stage 6: one server lifecycle - the embedded tritonserver, docker compose, S3 repositories, Kubernetes/KServe."""
