"""Stage 5 (GPU): TensorRT plans built where they run. builder.py, plans.py and gpu_probe.py are the
standard-library-only kit that the serving image runs (deploy/build_engines.py, the Kubernetes init container);
host.py is the build env's side."""
